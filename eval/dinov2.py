"""FD-DINOv2 (Stein et al. 2023, arXiv 2306.04675): the Frechet distance on DINOv2 ViT features, through
torch-fidelity's `dinov2-vit-{s,b,l,g}-14` extractors.

torch-fidelity 0.4 builds its DINOv2 extractor with `torch.hub.load("facebookresearch/dinov2", "dinov2_vitl14")`
(feature_extractor_dinov2.py) and refuses a local weights path (NotImplementedError). Here the same extractor class
(its forward: TF1-compatible bilinear resize to 224, ImageNet normalisation, the backbone's CLS output) gets its
backbone from the hub code in torch.hub's cache, built without weights, and loads them from a file: `weights` if
given, else torch.hub's checkpoint folder, where torch-fidelity's own download puts them. Both need the model
code that torch.hub caches under $TORCH_HOME/hub/facebookresearch_dinov2_main (a checkout of
github.com/facebookresearch/dinov2); either missing is a one-line error naming what is expected where.
"""
from __future__ import annotations

import sys
import warnings
from contextlib import redirect_stdout
from pathlib import Path

import torch

from harness.errors import FluidbenchError

DINOV2_URL = "https://dl.fbaipublicfiles.com/dinov2"  # dinov2/hub/utils.py: _DINOV2_BASE_URL


def hub_repo_dir() -> Path:
    """Where torch.hub keeps facebookresearch/dinov2's code (its `<owner>_<repo>_<branch>` naming)."""
    return Path(torch.hub.get_dir()) / "facebookresearch_dinov2_main"


def weights_file(name: str) -> str:
    """The published weights file of a torch-fidelity DINOv2 name, e.g. dinov2_vitl14_pretrain.pth."""
    from torch_fidelity.feature_extractor_dinov2 import MODEL_METADATA

    if name not in MODEL_METADATA:
        raise FluidbenchError(f"--extractor {name}: unknown DINOv2 model (expected one of "
                              f"{', '.join(MODEL_METADATA)})")
    return f"{MODEL_METADATA[name]}_pretrain.pth"


def _weights_path(name: str, weights: str | Path | None) -> Path:
    expected = weights_file(name)
    url = f"{DINOV2_URL}/{expected.removesuffix('_pretrain.pth')}/{expected}"
    if weights is not None:
        if not Path(weights).is_file():
            raise FluidbenchError(f"--weights {weights}: file not found (expected DINOv2's {expected} from {url})")
        return Path(weights)
    cached = Path(torch.hub.get_dir()) / "checkpoints" / expected
    if not cached.is_file():
        raise FluidbenchError(f"DINOv2 weights {expected} not found in {cached.parent}; download it from {url} "
                              f"and pass --weights PATH")
    return cached


def build_backbone(name: str, weights: str | Path | None = None) -> torch.nn.Module:
    """facebookresearch's DINOv2 backbone from torch.hub's cached code, with weights from a local file."""
    from torch_fidelity.feature_extractor_dinov2 import MODEL_METADATA

    path = _weights_path(name, weights)
    repo = hub_repo_dir()
    if not (repo / "hubconf.py").is_file():
        raise FluidbenchError(f"DINOv2 model code not found at {repo} (torch.hub's cache of facebookresearch/dinov2: "
                              f"put a checkout of github.com/facebookresearch/dinov2 there)")
    with redirect_stdout(sys.stderr), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="xFormers is not available")
        model = torch.hub.load(str(repo), MODEL_METADATA[name], source="local", pretrained=False)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        model.load_state_dict(state, strict=True)
    except Exception as e:  # a truncated file, a pickle with code, another model's keys: one line
        raise FluidbenchError(f"{path}: not a DINOv2 {MODEL_METADATA[name]} state dict "
                              f"({str(e).splitlines()[0][:200]})") from None
    return model


def _torch_fidelity_extractor(name: str, backbone: torch.nn.Module):
    """torch-fidelity's FeatureExtractorDinoV2 around `backbone`: its forward exactly, without its download."""
    from torch_fidelity.feature_extractor_base import FeatureExtractorBase
    from torch_fidelity.feature_extractor_dinov2 import FeatureExtractorDinoV2

    class LocalDinoV2(FeatureExtractorDinoV2):
        def __init__(self):  # what FeatureExtractorDinoV2.__init__ does, with the backbone given
            FeatureExtractorBase.__init__(self, name, ["dinov2"])
            self.feature_extractor_internal_dtype = torch.float32
            self.model = backbone
            self.to(self.feature_extractor_internal_dtype)
            self.requires_grad_(False)
            self.eval()

    return LocalDinoV2()


class DinoV2Features:
    """torch-fidelity's DINOv2 ViT features (CLS token) of uint8 images, behind eval.fid's FeatureExtractor."""

    def __init__(self, name: str = "dinov2-vit-l-14", weights: str | Path | None = None,
                 device: str | torch.device = "cpu"):
        from harness.hashing import sha256_file

        backbone = build_backbone(name, weights)
        self.net = _torch_fidelity_extractor(name, backbone).to(device)
        self.name = name
        self.dim = int(backbone.embed_dim)
        self.checksum = sha256_file(_weights_path(name, weights))

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        device = next(self.net.parameters()).device
        (features,) = self.net(images.to(device))
        return features  # (B, dim) float32
