"""CMMD: the RBF MMD of Jayasumana et al. 2024 equals a direct computation on the same embeddings; the CLIP
embedder loads a tiny random open_clip model from a local file and its embeddings are the model's, normalised."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from eval import panel
from eval.cmmd import ClipImageFeatures, mmd_rbf

from test_clipscore import TINY, tiny_clip  # noqa: F401 - the same tiny open_clip model and its fixture


def _unit(n: int, dim: int = 16, shift: float = 0.0, seed: int = 0) -> torch.Tensor:
    x = torch.randn(n, dim, generator=torch.Generator().manual_seed(seed)) + shift
    return x / x.norm(dim=1, keepdim=True)


def _direct_mmd(x: np.ndarray, y: np.ndarray, sigma: float = 10.0) -> float:
    """The V-statistic by explicit pairs: every k(a, b) = exp(-|a - b|^2 / (2 sigma^2)), diagonals included."""
    k = lambda a, b: np.exp(-((a[:, None, :] - b[None, :, :]) ** 2).sum(-1) / (2 * sigma ** 2))  # noqa: E731
    return 1000 * (k(x, x).mean() + k(y, y).mean() - 2 * k(x, y).mean())


def test_mmd_rbf_is_the_reference_estimator():
    x, y = _unit(60, seed=1), _unit(80, shift=0.5, seed=2)
    assert mmd_rbf(x, y) == pytest.approx(_direct_mmd(x.double().numpy(), y.double().numpy()), rel=1e-9)
    assert mmd_rbf(x, x) == pytest.approx(0, abs=1e-9)
    assert mmd_rbf(x, y) == pytest.approx(mmd_rbf(y, x), rel=1e-12) and mmd_rbf(x, y) > 0.1
    # through the panel: the same number, with a bootstrap SE that shrinks with more samples
    out = {n: panel.panel(_unit(n, shift=0.5, seed=n), _unit(400, seed=3),
                          panel.PanelSettings(metrics=("cmmd",), n_boot=30)) for n in (50, 800)}
    ref = _unit(400, seed=3)
    assert out[50]["cmmd"] == pytest.approx(_direct_mmd(_unit(50, shift=0.5, seed=50).double().numpy(),
                                                        ref.double().numpy()), rel=1e-9)
    assert out[800]["cmmd_se"] < 0.5 * out[50]["cmmd_se"]


def test_clip_features_load_from_a_file_and_give_cmmd_of_the_embeddings(tiny_clip):
    from torchvision.transforms.functional import to_pil_image

    from eval.extractors import load_any_extractor
    from harness.hashing import sha256_file

    _, weights, model = tiny_clip
    model.eval()
    ext = load_any_extractor(f"clip-{TINY}", str(weights))
    assert isinstance(ext, ClipImageFeatures) and ext.dim == 16 and ext.checksum == sha256_file(weights)
    g = torch.Generator().manual_seed(0)
    a = torch.randint(0, 256, (6, 3, 40, 48), dtype=torch.uint8, generator=g)
    b = torch.randint(0, 128, (7, 3, 40, 48), dtype=torch.uint8, generator=g)
    fa, fb = ext(a), ext(b)
    torch.testing.assert_close(fa.norm(dim=1), torch.ones(6))
    with torch.no_grad():
        direct = model.encode_image(torch.stack([ext.scorer.preprocess(to_pil_image(im)) for im in a]))
    torch.testing.assert_close(fa, direct / direct.norm(dim=1, keepdim=True))
    out = panel.panel(fa, fb, panel.PanelSettings(metrics=("cmmd",), n_boot=0))
    assert out["cmmd"] == pytest.approx(_direct_mmd(fa.double().numpy(), fb.double().numpy()), rel=1e-6)
