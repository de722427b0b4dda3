"""Compute-optimal fits on synthetic runs drawn from a known L(N, D): the parametric fit recovers its
parameters within their intervals, the IsoFLOP profiles and the fit find N_opt(C) within 10%."""
from __future__ import annotations

import math

import numpy as np
import pytest

from harness.compute_optimal import PARAMS, fit_parabola, fit_parametric, isoflop_frontier, pooled_sigma, vertex

# Hoffmann et al. 2022's fitted law (their eq. 10): the ground truth of the synthetic runs
TRUE = {"E": 1.69, "A": 406.4, "B": 410.7, "alpha": 0.34, "beta": 0.28}
BUDGETS = [1e17, 4e17, 1.6e18, 6.4e18]


def true_loss(n, d):
    return TRUE["E"] + TRUE["A"] * np.asarray(n) ** -TRUE["alpha"] + TRUE["B"] * np.asarray(d) ** -TRUE["beta"]


def true_n_opt(c, k=6.0):
    """argmin_N L(N, C / (k N)) in closed form (Hoffmann et al., appendix D.2)."""
    a, b = TRUE["alpha"], TRUE["beta"]
    return (a * TRUE["A"] / (b * TRUE["B"])) ** (1 / (a + b)) * (c / k) ** (b / (a + b))


def isoflop_runs(seed: int, noise: float = 0.005, spread: float = 6.0):
    """Five sizes per budget from N_opt / spread to N_opt * spread, D = C / 6N, lognormal loss noise."""
    rng = np.random.default_rng(seed)
    rows = []
    for c in BUDGETS:
        for f in np.geomspace(1 / spread, spread, 5):
            n = true_n_opt(c) * f
            d = c / (6 * n)
            rows.append((n, d, c, float(true_loss(n, d) * math.exp(rng.normal(0, noise)))))
    return [np.array(v) for v in zip(*rows)]


@pytest.fixture(scope="module")
def synthetic():
    n, d, c, loss = isoflop_runs(seed=0)
    return n, d, c, loss, fit_parametric(n, d, loss, c, n_boot=200, seed=0)


def test_parametric_fit_recovers_every_parameter_within_its_interval(synthetic):
    *_, fit = synthetic
    for name in PARAMS:
        lo, hi = fit.intervals[name]
        assert lo <= TRUE[name] <= hi, (name, TRUE[name], lo, hi)
        assert lo < getattr(fit, name) < hi
    assert fit.n_boot >= 190
    assert fit.flops_k == pytest.approx(6.0) and fit.flops_gamma == pytest.approx(1.0)
    assert fit.residual_sigma < 0.05  # ~0.5% noise on losses near 2-3


def test_parametric_n_opt_within_10_percent_with_an_interval_around_the_truth(synthetic):
    *_, fit = synthetic
    for c in BUDGETS:
        assert fit.n_opt(c) == pytest.approx(true_n_opt(c), rel=0.10)
        lo, hi = fit.n_opt_interval(c)
        assert lo <= true_n_opt(c) <= hi
        assert fit.l_opt(c) == pytest.approx(float(true_loss(true_n_opt(c), c / (6 * true_n_opt(c)))), rel=0.01)


def test_a_wrong_model_is_not_recovered():
    """The test above could fail: runs from a law with twice the data exponent give intervals that exclude
    the Chinchilla values."""
    n, d, c, _ = isoflop_runs(seed=0)
    loss = TRUE["E"] + TRUE["A"] * n ** -TRUE["alpha"] + TRUE["B"] * d ** -(2 * TRUE["beta"])
    fit = fit_parametric(n, d, loss, c, n_boot=50, seed=0)
    lo, hi = fit.intervals["beta"]
    assert not lo <= TRUE["beta"] <= hi


def test_isoflop_profiles_find_n_opt_within_10_percent_and_the_frontier_exponent(synthetic):
    n, d, c, loss, _ = synthetic
    frontier = isoflop_frontier(n, loss, c, n_boot=300, seed=0)
    assert frontier.sigma_from == "profiles" and 0 < frontier.sigma < 0.05
    assert [p.budget for p in frontier.profiles] == BUDGETS
    for profile in frontier.profiles:
        assert profile.n_opt == pytest.approx(true_n_opt(profile.budget), rel=0.10)
        assert profile.n_opt_lo < profile.n_opt < profile.n_opt_hi
        assert profile.interior and profile.sizes == 5 and profile.with_minimum == 1.0
    exponent = TRUE["beta"] / (TRUE["alpha"] + TRUE["beta"])  # N_opt ~ C^(beta / (alpha + beta))
    assert frontier.n_opt.a == pytest.approx(exponent, rel=0.10)
    assert frontier.n_opt.a_lo < frontier.n_opt.a < frontier.n_opt.a_hi
    assert frontier.l_opt.a < 0 and frontier.l_opt.a_lo < frontier.l_opt.a < frontier.l_opt.a_hi
    lo, hi = frontier.n_opt.predict_interval(BUDGETS[-1])
    assert lo < frontier.n_opt.predict(BUDGETS[-1]) < hi


def test_n_opt_follows_the_runs_own_flop_accounting():
    """With C = 3 N^1.1 D (not 6ND) the closed-form optimum is the numerical argmin of L(N, C / (3 N^1.1))."""
    rng = np.random.default_rng(1)
    n = np.geomspace(1e7, 1e9, 4).repeat(3)
    d = np.tile([2e9, 8e9, 3.2e10], 4) * rng.uniform(0.9, 1.1, 12)
    loss = true_loss(n, d)
    fit = fit_parametric(n, d, loss, 3.0 * n ** 1.1 * d, n_boot=0)
    assert fit.flops_k == pytest.approx(3.0) and fit.flops_gamma == pytest.approx(1.1)
    c = 1e20
    grid = np.geomspace(1e6, 1e12, 200001)
    numeric = grid[np.argmin(fit.predict(grid, c / (3.0 * grid ** 1.1)))]
    assert fit.n_opt(c) == pytest.approx(numeric, rel=1e-3)


def test_parabola_vertex_and_no_minimum():
    n = np.array([1e5, 1e6, 1e7])
    coef = fit_parabola(n, 0.1 * (np.log(n) - math.log(3e6)) ** 2 + 2.0)
    n_opt, l_opt = vertex(coef)
    assert n_opt == pytest.approx(3e6, rel=1e-9) and l_opt == pytest.approx(2.0)
    assert all(math.isnan(v) for v in vertex(fit_parabola(n, -np.log(n) ** 2)))
    # a budget whose loss still falls at the largest size: its minimum lies outside the sizes measured
    frontier = isoflop_frontier(n, 0.1 * (np.log(n) - math.log(3e8)) ** 2 + 2.0, [1.0] * 3, sigma=0.01, n_boot=50)
    assert not frontier.profiles[0].interior and frontier.profiles[0].n_opt > 1e7


def test_the_frontier_leaves_out_budgets_whose_minimum_lies_outside_the_sizes(synthetic):
    """An extrapolated vertex is not a measurement: moving one budget's sizes so that its minimum lies below
    them leaves the frontier on the other budgets; with fewer than two bracketed budgets there is none."""
    n, d, c, loss, _ = synthetic
    frontier = isoflop_frontier(n, loss, c, n_boot=100, seed=0)
    last = c == BUDGETS[-1]
    shifted = n.copy()
    shifted[last] = n[last] * 40      # every size of the largest budget well above its optimum
    d_shifted = np.where(last, c / (6 * shifted), d)
    loss_shifted = np.where(last, true_loss(shifted, d_shifted), loss)
    moved = isoflop_frontier(shifted, loss_shifted, c, n_boot=100, seed=0)
    assert not moved.profiles[-1].interior and moved.profiles[-1].n_opt < moved.profiles[-1].n_min
    assert [p.interior for p in moved.profiles[:-1]] == [True] * 3
    assert moved.n_opt.points == 3 and frontier.n_opt.points == 4
    on_three = isoflop_frontier(n[~last], loss[~last], c[~last], n_boot=100, seed=0)
    assert moved.n_opt.a == pytest.approx(on_three.n_opt.a, rel=1e-12)   # the same law as without that budget
    keep = np.isin(c, BUDGETS[:2])
    only_one = np.where(c == BUDGETS[0], n, n * 40)[keep]
    one = isoflop_frontier(only_one, true_loss(only_one, c[keep] / (6 * only_one)), c[keep], sigma=0.01, n_boot=20)
    assert [p.interior for p in one.profiles] == [True, False] and one.n_opt is None and one.l_opt is None


def test_too_few_runs_are_one_line_errors():
    with pytest.raises(ValueError, match=r"needs >= 6 runs"):
        fit_parametric([1e6, 2e6], [1e9, 1e9], [2.0, 1.9])
    with pytest.raises(ValueError, match="3 distinct sizes"):
        isoflop_frontier([1e6, 2e6], [2.0, 1.9], [1.0, 1.0])
    with pytest.raises(ValueError, match="pass sigma"):
        isoflop_frontier([1e6, 2e6, 4e6], [2.0, 1.9, 2.1], [1.0] * 3)
    assert pooled_sigma(np.array([1e6, 2e6, 4e6]), np.array([2.0, 1.9, 2.1]), np.ones(3))[1] == 0
