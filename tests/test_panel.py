"""The metric panel: each metric equals its library's computation (and a direct one) on the same features, and the
bootstrap standard error tracks the true sampling error and shrinks as the number of generated samples grows."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from eval import panel
from eval.fid import FeatureStats, fid_between
from harness.errors import FluidbenchError


def _features(n: int, dim: int = 8, shift: float = 0.0, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    mix = torch.eye(dim) + 0.3 * torch.randn(dim, dim, generator=torch.Generator().manual_seed(99))
    return (torch.randn(n, dim, generator=g) @ mix + shift).float()


def _direct_kid(x: np.ndarray, y: np.ndarray) -> float:
    """Unbiased MMD^2 with k(a, b) = (a.b / d + 1)^3 over the whole sets (Binkowski et al. 2018, eq. 3-4)."""
    x, y = x.astype(np.float64), y.astype(np.float64)
    d = x.shape[1]
    kxx, kyy, kxy = ((x @ x.T) / d + 1) ** 3, ((y @ y.T) / d + 1) ** 3, ((x @ y.T) / d + 1) ** 3
    m, n = len(x), len(y)
    return ((kxx.sum() - np.trace(kxx)) / (m * (m - 1)) + (kyy.sum() - np.trace(kyy)) / (n * (n - 1))
            - 2 * kxy.mean())


def test_kid_equals_torch_fidelity_and_the_direct_mmd():
    from torch_fidelity.metric_kid import kid_features_to_metric

    gen, ref = _features(300, shift=0.4, seed=1), _features(400, seed=2)
    ours = panel.kid(gen, ref, subsets=20, subset_size=100, seed=3)  # float64 kernels vs its float32 ones
    lib = kid_features_to_metric(gen, ref, kid_subsets=20, kid_subset_size=100, rng_seed=3, verbose=False)
    assert ours == pytest.approx(lib["kernel_inception_distance_mean"], rel=1e-5) and ours > 0.01
    # Subsets as large as both sets: one MMD equals torch-fidelity's 100 identical ones, and the direct formula.
    gen, ref = gen[:200], ref[:200]
    whole = panel.kid(gen, ref, subsets=100, subset_size=1000)
    lib = kid_features_to_metric(gen, ref, kid_subsets=100, kid_subset_size=200, verbose=False)
    assert whole == pytest.approx(lib["kernel_inception_distance_mean"], rel=1e-5)  # float32 sums, reordered
    assert whole == pytest.approx(_direct_kid(gen.numpy(), ref.numpy()), rel=1e-4)


def test_precision_recall_equals_torch_fidelity_and_a_direct_count():
    from torch_fidelity.metric_prc import calculate_precision_recall_part, prc_features_to_metric

    gen, ref = _features(150, shift=0.8, seed=1), _features(200, seed=2)
    ours = panel.precision_recall(gen, ref, k=3)
    lib = prc_features_to_metric(gen, ref, prc_neighborhood=3, prc_batch_size=10000, save_cpu_ram=False,
                                 verbose=False)
    assert ours == {"precision": lib["precision"], "recall": lib["recall"]}
    part = calculate_precision_recall_part(gen, ref, neighborhood=3, batch_size=64)  # the library's other path
    assert (ours["precision"], ours["recall"]) == pytest.approx(part, abs=1e-12)
    # Direct: a generated point is precise if inside some real point's 3-NN ball (the point itself excluded).
    d_rr, d_gr = torch.cdist(ref, ref), torch.cdist(gen, ref)
    radius = d_rr.kthvalue(4, dim=1).values
    precision = (d_gr <= radius[None]).any(1).float().mean().item()
    assert ours["precision"] == pytest.approx(precision, abs=1e-12) and 0.05 < precision < 0.95


def test_density_coverage_equal_prdc_and_a_direct_count():
    from prdc import compute_prdc

    gen, ref = _features(150, shift=0.8, seed=1), _features(200, seed=2)
    ours = panel.density_coverage(gen, ref, k=5)
    lib = compute_prdc(ref.numpy(), gen.numpy(), nearest_k=5)
    assert ours == {"density": pytest.approx(lib["density"], abs=1e-12),
                    "coverage": pytest.approx(lib["coverage"], abs=1e-12)}
    d_rr, d_rg = torch.cdist(ref.double(), ref.double()), torch.cdist(ref.double(), gen.double())
    radius = d_rr.kthvalue(6, dim=1).values  # 5th neighbour besides the point itself
    inside = d_rg < radius[:, None]          # (real, generated)
    assert ours["density"] == pytest.approx(inside.sum(0).double().mean().item() / 5, abs=1e-6)
    assert ours["coverage"] == pytest.approx(inside.any(1).double().mean().item(), abs=1e-6)


def test_panel_fid_equals_eval_fid_and_standardised_fid_ignores_units():
    gen, ref = _features(300, shift=0.5, seed=1), _features(400, seed=2)
    out = panel.panel(gen, ref, panel.PanelSettings(metrics=("fid",), n_boot=0))
    a, b = FeatureStats(8), FeatureStats(8)
    a.update(gen)
    b.update(ref)
    assert out["fid"] == pytest.approx(fid_between(a, b), rel=1e-12) and "fid_se" not in out
    # Rescaling every dimension (the extractor's units) moves raw FID, not the standardised one.
    scale = torch.linspace(0.1, 30, 8)
    scaled = panel.panel(gen * scale, ref * scale, panel.PanelSettings(metrics=("fid",), n_boot=0))
    assert scaled["fid"] > 10 * out["fid"]
    assert scaled["fid_standardised"] == pytest.approx(out["fid_standardised"], rel=1e-5)


def test_frechet_to_a_fixed_reference_is_eval_fids_distance():
    from eval.fid import fid_between

    gen, ref = _features(300, dim=16, shift=0.5, seed=1), _features(500, dim=16, seed=2)
    a, b = FeatureStats(16), FeatureStats(16)
    a.update(gen)
    b.update(ref)
    fast = panel.FrechetToReference(b, torch.device("cpu"))
    assert fast(gen) == pytest.approx(fid_between(a, b), rel=1e-8)
    scale = np.sqrt(np.diagonal(b.cov))
    assert panel.FrechetToReference(b, torch.device("cpu"), scale)(gen) == pytest.approx(
        panel.fid_standardised(a, b), rel=1e-8)


def test_bootstrap_se_tracks_the_sampling_error_and_shrinks_with_n():
    ref = _features(1000, seed=0)
    settings = panel.PanelSettings(metrics=("fid", "kid", "precision", "recall", "density", "coverage"),
                                   n_boot=40, kid_subsets=5)
    se = {n: panel.panel(_features(n, shift=0.3, seed=n), ref, settings) for n in (100, 400, 1600)}
    for metric in ("fid", "kid", "recall", "density", "coverage", "precision"):
        a, b, c = (se[n][f"{metric}_se"] for n in (100, 400, 1600))
        assert c < 0.7 * a, (metric, a, b, c)  # 16x the samples: about a quarter of the error
        if metric in ("fid", "kid"):
            assert c < b < a, (metric, a, b, c)  # 4x the samples: about half the error
    # The bootstrap estimates the spread over fresh draws of the generated set (the reference fixed).
    fresh = [panel.panel(_features(400, shift=0.3, seed=1000 + s), ref,
                         panel.PanelSettings(metrics=("fid", "kid"), n_boot=0, kid_subsets=5)) for s in range(30)]
    for metric in ("fid", "kid"):
        true_se = np.std([f[metric] for f in fresh], ddof=1)
        assert 0.5 * true_se < se[400][f"{metric}_se"] < 2.0 * true_se, (metric, true_se, se[400])


def test_panel_rejects_bad_input_with_one_line():
    with pytest.raises(FluidbenchError, match="metrics: unknown is"):
        panel.PanelSettings(metrics=("fid", "is"))
    with pytest.raises(FluidbenchError, match="n_boot=1"):
        panel.PanelSettings(n_boot=1)
    with pytest.raises(FluidbenchError, match="dimensions"):
        panel.panel(_features(10, dim=4), _features(10, dim=8))
