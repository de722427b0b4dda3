"""FID's feature extractors behind one small interface (`FeatureExtractor`): `inception`, torch-fidelity's
`inception-v3-compat` (TF 2015-12-05 weights, 2048-d pool features), the network behind the reference TF
FID, which resizes to 299 internally with TF1's bilinear rule; `shapes`, the ShapesT2I domain extractor of
eval/shapes_features.py (its penultimate layer).
"""
from __future__ import annotations

import io
import pickle
import sys
from pathlib import Path
from typing import Protocol

import torch

from harness.errors import FluidbenchError
from harness.hashing import sha256_file


# torch-fidelity's published weights (torch_fidelity.feature_extractor_inceptionv3.URL_INCEPTION_V3); the
# suffix is the start of the file's sha256, torch.hub's naming convention.
INCEPTION_WEIGHTS_FILE = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_URL = f"https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/{INCEPTION_WEIGHTS_FILE}"
INCEPTION_NAME = "inception-v3-compat"


class FeatureExtractor(Protocol):
    """A frozen network mapping uint8 images (B, 3, H, W) to float features (B, dim)."""

    name: str       # recorded in every protocol, e.g. "inception-v3-compat", "shapes-v1"
    dim: int
    checksum: str   # sha256 of the weights file: part of the reference-statistics key

    def __call__(self, images: torch.Tensor) -> torch.Tensor: ...


def inception_weights_path(path: str | Path | None = None) -> Path:
    """The Inception weights file: `path` if given, else torch-fidelity's own download location (downloading there)."""
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise FluidbenchError(f"--inception-weights {path}: file not found (expected torch-fidelity's "
                                  f"{INCEPTION_WEIGHTS_FILE} from {INCEPTION_URL})")
        return path
    # The same place torch_fidelity's load_state_dict_from_url uses: $TORCH_HOME/hub/checkpoints/.
    cached = Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_WEIGHTS_FILE
    if cached.is_file():
        return cached
    try:
        cached.parent.mkdir(parents=True, exist_ok=True)
        torch.hub.download_url_to_file(INCEPTION_URL, str(cached), progress=sys.stderr.isatty())
    except Exception as e:  # no network (urllib raises several types): one clear line instead of a trace
        raise FluidbenchError(f"Inception weights {INCEPTION_WEIGHTS_FILE} not found in {cached.parent} and the "
                              f"download from {INCEPTION_URL} failed ({type(e).__name__}); download it elsewhere "
                              f"and pass --inception-weights PATH") from None
    return cached


class InceptionFeatures:
    """torch-fidelity's TF-compatible InceptionV3, 2048-d pool3 features of uint8 images."""

    name = INCEPTION_NAME
    dim = 2048

    def __init__(self, weights: str | Path | None = None, device: str | torch.device = "cpu"):
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

        path = inception_weights_path(weights)
        self.checksum = sha256_file(path)
        try:
            # torch-fidelity would torch.load(weights_only=False) the file itself, which runs any pickled code
            # it holds: we read it with weights_only=True and hand the library our re-serialised tensors
            state = torch.load(path, map_location="cpu", weights_only=True)
            if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
                raise KeyError("expected a flat dict of tensors")
            buffer = io.BytesIO()
            torch.save(state, buffer)
            buffer.seek(0)
            self.net = FeatureExtractorInceptionV3(INCEPTION_NAME, ["2048"], feature_extractor_weights_path=buffer)
        except (RuntimeError, KeyError, EOFError, pickle.UnpicklingError) as e:
            raise FluidbenchError(f"{path}: not a torch-fidelity InceptionV3 state dict "
                                  f"({' '.join(str(e).split())[:200]})") from None
        self.net.to(device)

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        device = next(self.net.parameters()).device
        (features,) = self.net(images.to(device))
        return features  # (B, 2048) float32


def load_extractor(name: str, weights: str | Path | None = None,
                   device: str | torch.device = "cpu") -> FeatureExtractor:
    """`inception` (weights: torch-fidelity's .pth file) or `shapes` (weights: a train-features folder)."""
    if name in ("inception", INCEPTION_NAME):
        return InceptionFeatures(weights, device)
    if name == "shapes" or name.startswith("shapes-"):
        from eval.shapes_features import load_shapes_features

        if weights is None:
            raise FluidbenchError("--features: the shapes extractor needs the folder written by "
                                  "`fluidbench eval train-features`")
        return load_shapes_features(weights, device)
    raise FluidbenchError(f"--extractor {name}: unknown (expected 'inception' or 'shapes')")
