"""FD-DINOv2's extractor: torch-fidelity's DINOv2 extractor with the backbone's weights from a local file gives
torch-fidelity's own features bit for bit (random weights saved as the published state dict), and every missing
piece is a one-line error naming what is expected where."""
from __future__ import annotations

import os
import shutil
from pathlib import Path
from urllib.error import URLError

import pytest
import torch

from eval.dinov2 import DinoV2Features, hub_repo_dir
from harness.errors import FluidbenchError


# torch.hub's entry point for facebookresearch/dinov2's first release (its hubconf.py of April 2023), over the model
# code of that release as PyPI's `dinov2` 0.0.1.dev2 ships it (`make test` installs it): the ViT-S/14 backbone with
# its published settings, weights through torch.hub's checkpoint cache as the hub's own entry point loads them.
HUBCONF = """dependencies = ["torch"]


def dinov2_vits14(*, pretrained=True, **kwargs):
    import torch
    from dinov2.models import vision_transformer as vits

    model = vits.vit_small(patch_size=14, img_size=518, init_values=1.0, block_chunks=0, **kwargs)
    if pretrained:
        url = "https://dl.fbaipublicfiles.com/dinov2/dinov2_vits14/dinov2_vits14_pretrain.pth"
        model.load_state_dict(torch.hub.load_state_dict_from_url(url, map_location="cpu"))
    return model
"""


def _dinov2_code(tmp_path: Path) -> Path | None:
    """facebookresearch/dinov2's code: a checkout at $FLUIDBENCH_DINOV2_REPO or in torch.hub's cache, else the
    `dinov2` package's model code behind HUBCONF."""
    for candidate in (os.environ.get("FLUIDBENCH_DINOV2_REPO"), hub_repo_dir()):
        if candidate and (Path(candidate) / "hubconf.py").is_file():
            return Path(candidate)
    try:
        import dinov2.models.vision_transformer  # noqa: F401
    except ImportError:
        return None
    (tmp_path / "dinov2-hub").mkdir()
    (tmp_path / "dinov2-hub" / "hubconf.py").write_text(HUBCONF)
    return tmp_path / "dinov2-hub"


def test_local_weights_give_torch_fidelitys_features_bit_for_bit(tmp_path, monkeypatch):
    from torch_fidelity.feature_extractor_dinov2 import FeatureExtractorDinoV2

    code = _dinov2_code(tmp_path)
    if code is None:  # `make test` installs the package: a skip here means the venv was made another way
        pytest.skip("facebookresearch/dinov2's code is not on this machine (torch.hub's cache, "
                    "$FLUIDBENCH_DINOV2_REPO or the `dinov2` package), and nothing is downloaded in a test")
    hub = tmp_path / "torch" / "hub"
    shutil.copytree(code, hub / "facebookresearch_dinov2_main", ignore=shutil.ignore_patterns(".git"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))

    def offline(url, *args, **kwargs):  # torch.hub asks github for the default branch first; the test machine
        raise URLError(f"no network in a test: {url}")  # is offline, so it falls back to the cache, as here

    monkeypatch.setattr(torch.hub, "urlopen", offline)
    with torch.random.fork_rng():
        torch.manual_seed(0)  # the hub code initialises from the global generator
        model = torch.hub.load(str(hub / "facebookresearch_dinov2_main"), "dinov2_vits14", source="local",
                               pretrained=False)
    (hub / "checkpoints").mkdir()
    torch.save(model.state_dict(), hub / "checkpoints" / "dinov2_vits14_pretrain.pth")  # the published format
    local = tmp_path / "elsewhere.pth"
    shutil.copy(hub / "checkpoints" / "dinov2_vits14_pretrain.pth", local)

    theirs = FeatureExtractorDinoV2("dinov2-vit-s-14", ["dinov2"])  # torch.hub.load from the cache, as it ships
    images = torch.randint(0, 256, (3, 3, 40, 56), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    (expected,) = theirs(images)
    from_file, from_cache = DinoV2Features("dinov2-vit-s-14", local), DinoV2Features("dinov2-vit-s-14")
    assert expected.shape == (3, 384) and from_file.dim == 384
    assert torch.equal(from_file(images), expected) and torch.equal(from_cache(images), expected)
    # the file is really what is read: other weights, other features
    state = {k: v + 0.01 if v.is_floating_point() else v for k, v in model.state_dict().items()}
    torch.save(state, tmp_path / "other.pth")
    assert not torch.equal(DinoV2Features("dinov2-vit-s-14", tmp_path / "other.pth")(images), expected)
    assert from_file.checksum != DinoV2Features("dinov2-vit-s-14", tmp_path / "other.pth").checksum
    torch.save({"not": torch.zeros(1)}, tmp_path / "wrong.pth")
    with pytest.raises(FluidbenchError, match="not a DINOv2 dinov2_vits14 state dict"):
        DinoV2Features("dinov2-vit-s-14", tmp_path / "wrong.pth")


def test_missing_pieces_are_one_line_errors(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    with pytest.raises(FluidbenchError, match=r"DINOv2 weights dinov2_vitl14_pretrain.pth not found in .*checkpoints"):
        DinoV2Features("dinov2-vit-l-14")
    with pytest.raises(FluidbenchError, match=r"--weights .*nope.pth: file not found \(expected DINOv2's "
                                              r"dinov2_vitb14_pretrain.pth"):
        DinoV2Features("dinov2-vit-b-14", tmp_path / "nope.pth")
    (tmp_path / "w.pth").write_bytes(b"")
    with pytest.raises(FluidbenchError, match="DINOv2 model code not found at .*facebookresearch_dinov2_main"):
        DinoV2Features("dinov2-vit-s-14", tmp_path / "w.pth")
    with pytest.raises(FluidbenchError, match="unknown DINOv2 model"):
        DinoV2Features("dinov2-vit-h-14")
