"""Compute-optimal scaling from a grid of runs: IsoFLOP profiles, their frontier, and a parametric L(N, D).

The estimates of Hoffmann et al. 2022 ("Training Compute-Optimal Large Language Models", arXiv 2203.15556),
approaches 2 and 3, as replicated by Besiroglu et al. 2024 ("Chinchilla Scaling: A replication attempt",
arXiv 2404.10102). N = parameters, D = training tokens, C = training FLOPs (the variants' own accounting).

- IsoFLOP profile: at one budget C, the loss of the runs against x = log N is fitted by a parabola
  L = c2 x^2 + c1 x + c0; its vertex gives N_opt(C) and L_opt(C) (none when c2 <= 0: no minimum).
- Frontier: N_opt = k C^a and L_opt = k' C^b, least squares in log-log over the budgets that have a minimum.
- Parametric fit: L(N, D) = E + A N^-alpha + B D^-beta, as in Hoffmann et al.: the Huber loss (delta 1e-3) of
  log L against LSE(a - alpha log N, b - beta log D, e), with A, B, E = exp(a), exp(b), exp(e), minimised by
  L-BFGS. Hoffmann et al. start it from every point of a grid; here the objective is evaluated on the whole
  grid (cheap, vectorised) and L-BFGS runs from its 16 best points (on the synthetic tests the best ten of
  them reach one minimum, the rest a worse one). A bootstrap refit starts from the full data's optimum only:
  a resample moves the minimum, it does not make a new basin the best, and so 200 refits take seconds. Its N_opt(C) follows in closed form from the accounting C = k N^gamma D, with (k, gamma) fitted
  on the runs' FLOPs per token (6 N and 1 for the usual 6ND).

Intervals (95%, percentiles of the bootstrap):
- parametric fit: a pairs bootstrap over the runs (resample them with replacement, refit), as Besiroglu et al.;
- IsoFLOP profiles and frontier: with 3-5 sizes per budget a pairs bootstrap mostly draws too few distinct
  sizes for a parabola, so it is a residual bootstrap: the loss noise sigma is the pooled scatter of every
  budget's points about its parabola (dof-corrected), or, when no budget has more than three sizes, of the
  points about the parametric fit; each resample adds N(0, sigma) to the fitted losses of all budgets at
  once and refits the parabolas and then the power laws, so the exponents' intervals carry the profiles'.
Prediction intervals are the spread of the fit (parameter uncertainty), not of a new run's noise.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

HUBER_DELTA = 1e-3            # Hoffmann et al. and Besiroglu et al.
STARTS = 16                   # L-BFGS starts: the best points of the grid
# Hoffmann et al.'s grid of initialisations for (a, b, alpha, beta); e relative to the smallest loss (their
# e in [-1, 1] assumes losses near 2 nats, ours range from ~0.1 (kl MSE) to ~6 (vq nats)).
GRID_AB = np.arange(0.0, 25.1, 5.0)
GRID_EXP = np.arange(0.0, 2.01, 0.5)
GRID_E_FRACTION = np.array([0.05, 0.25, 0.5, 0.75, 0.95])
BOUNDS = [(-10.0, 60.0), (-10.0, 60.0), (-30.0, None), (0.0, 4.0), (0.0, 4.0)]   # a, b, e, alpha, beta


def _interval(samples: np.ndarray) -> tuple[float, float]:
    samples = np.asarray(samples, dtype=np.float64)
    samples = samples[np.isfinite(samples)]
    if samples.size < 2:
        return float("nan"), float("nan")
    lo, hi = np.percentile(samples, [2.5, 97.5])
    return float(lo), float(hi)


# ------------------------------------------------------------------------------------- IsoFLOP profiles
def fit_parabola(n: np.ndarray, loss: np.ndarray) -> np.ndarray:
    """(c2, c1, c0) of the least-squares parabola L = c2 x^2 + c1 x + c0 in x = log N (>= 3 distinct N)."""
    return np.polyfit(np.log(n), loss, 2)


def vertex(coef: np.ndarray) -> tuple[float, float]:
    """(N_opt, L_opt) of a parabola in log N; (nan, nan) when it opens downwards (no minimum)."""
    c2, c1, c0 = coef
    if not c2 > 0:
        return float("nan"), float("nan")
    x = -c1 / (2 * c2)
    return float(math.exp(x)), float(c0 - c1 * c1 / (4 * c2))


@dataclass
class Profile:
    """One IsoFLOP profile: the runs at budget C, their parabola in log N, its minimum with 95% intervals."""

    budget: float
    coef: list[float]                # c2, c1, c0
    n_opt: float                     # nan: the parabola has no minimum
    l_opt: float
    n_opt_lo: float
    n_opt_hi: float
    l_opt_lo: float
    l_opt_hi: float
    interior: bool                   # N_opt inside the sizes measured (else an extrapolation)
    sizes: int
    with_minimum: float              # fraction of bootstrap resamples whose parabola has a minimum
    n_min: float = math.nan          # the smallest size run at this budget

    def predict(self, n: np.ndarray | float) -> np.ndarray:
        return np.polyval(self.coef, np.log(np.asarray(n, dtype=np.float64)))


@dataclass
class PowerLaw:
    """y = k * x^a with a bootstrap 95% interval for the exponent."""

    k: float
    a: float
    a_lo: float
    a_hi: float
    points: int
    boot: np.ndarray = field(default_factory=lambda: np.empty((0, 2)), repr=False)   # (log k, a) per resample

    def predict(self, x: np.ndarray | float) -> np.ndarray:
        return self.k * np.power(np.asarray(x, dtype=np.float64), self.a)

    def predict_interval(self, x: float) -> tuple[float, float]:
        if not len(self.boot):
            return float("nan"), float("nan")
        return _interval(np.exp(self.boot[:, 0] + self.boot[:, 1] * math.log(x)))


def _power_law(x: np.ndarray, y: np.ndarray) -> tuple[float, float] | None:
    """(log k, a) of log y = log k + a log x over finite points; None with fewer than 2 distinct x."""
    keep = np.isfinite(x) & np.isfinite(y) & (x > 0) & (y > 0)
    if len(np.unique(x[keep])) < 2:
        return None
    a, log_k = np.polyfit(np.log(x[keep]), np.log(y[keep]), 1)
    return float(log_k), float(a)


@dataclass
class Frontier:
    """The IsoFLOP profiles of one variant and N_opt(C), L_opt(C) as power laws."""

    profiles: list[Profile]
    n_opt: PowerLaw | None           # None with fewer than two budgets whose minimum is inside the sizes
    l_opt: PowerLaw | None
    sigma: float                     # the loss noise the bootstrap adds
    sigma_from: str                  # "profiles" | "parametric fit" | "given"
    n_boot: int


def pooled_sigma(n: np.ndarray, loss: np.ndarray, budget: np.ndarray) -> tuple[float, int]:
    """Loss noise from the scatter of each budget's points about its parabola: (sigma, degrees of freedom)."""
    ss, dof = 0.0, 0
    for c in np.unique(budget):
        at = budget == c
        if len(np.unique(n[at])) < 3:
            continue
        ss += float(((loss[at] - np.polyval(fit_parabola(n[at], loss[at]), np.log(n[at]))) ** 2).sum())
        dof += int(at.sum()) - 3
    return (math.sqrt(ss / dof), dof) if dof > 0 else (float("nan"), 0)


def isoflop_frontier(n, loss, budget, *, sigma: float | None = None, sigma_from: str = "given",
                     n_boot: int = 1000, seed: int = 0) -> Frontier:
    """Profiles at every budget with >= 3 distinct sizes, then the frontier power laws, with intervals.

    `sigma` is the loss noise for the residual bootstrap; None: pooled from the profiles (an error when no
    budget has four sizes: pass the parametric fit's, as `analyse` does).
    """
    n, loss, budget = (np.asarray(v, dtype=np.float64) for v in (n, loss, budget))
    budgets = [c for c in np.unique(budget) if len(np.unique(n[budget == c])) >= 3]
    if not budgets:
        raise ValueError("IsoFLOP profiles need a budget with >= 3 distinct sizes")
    if sigma is None:
        sigma, dof = pooled_sigma(n, loss, budget)
        if dof == 0:
            raise ValueError("no budget has 4+ sizes, so the profiles cannot estimate the loss noise: pass sigma")
        sigma_from = "profiles"
    rows = [budget == c for c in budgets]
    coefs = [fit_parabola(n[at], loss[at]) for at in rows]
    vertices = np.array([vertex(c) for c in coefs])                      # (budgets, 2)

    rng = np.random.default_rng(seed)
    boot = np.full((n_boot, len(budgets), 2), np.nan)
    for i in range(n_boot):
        for j, at in enumerate(rows):
            fitted = np.polyval(coefs[j], np.log(n[at]))
            boot[i, j] = vertex(fit_parabola(n[at], fitted + rng.normal(0.0, sigma, fitted.size)))
    profiles = []
    for j, (c, at) in enumerate(zip(budgets, rows)):
        n_opt, l_opt = vertices[j]
        profiles.append(Profile(
            budget=float(c), coef=[float(v) for v in coefs[j]], n_opt=n_opt, l_opt=l_opt,
            n_opt_lo=_interval(boot[:, j, 0])[0], n_opt_hi=_interval(boot[:, j, 0])[1],
            l_opt_lo=_interval(boot[:, j, 1])[0], l_opt_hi=_interval(boot[:, j, 1])[1],
            interior=bool(n[at].min() <= n_opt <= n[at].max()) if math.isfinite(n_opt) else False,
            sizes=len(np.unique(n[at])), with_minimum=float(np.isfinite(boot[:, j, 0]).mean()) if n_boot else math.nan,
            n_min=float(n[at].min())))

    # The frontier is fitted on the budgets whose minimum lies inside the sizes run: an extrapolated vertex is
    # the parabola's guess, not a measurement (it can sit decades away, with an interval to match), and one
    # such point would set the exponent
    c_arr = np.array(budgets)
    inside = np.array([p.interior for p in profiles])
    laws = []
    for k in (0, 1):
        point = _power_law(c_arr[inside], vertices[inside, k])
        if point is None:
            laws.append(None)
            continue
        samples = [s for s in (_power_law(c_arr[inside], boot[i, inside, k]) for i in range(n_boot)) if s is not None]
        samples = np.array(samples).reshape(-1, 2)
        lo, hi = _interval(samples[:, 1])
        laws.append(PowerLaw(k=math.exp(point[0]), a=point[1], a_lo=lo, a_hi=hi,
                             points=int(np.isfinite(vertices[inside, k]).sum()), boot=samples))
    return Frontier(profiles=profiles, n_opt=laws[0], l_opt=laws[1], sigma=float(sigma), sigma_from=sigma_from,
                    n_boot=n_boot)


# ------------------------------------------------------------------------------------- parametric fit
PARAMS = ("E", "A", "B", "alpha", "beta")


def _lse_terms(p: np.ndarray, log_n: np.ndarray, log_d: np.ndarray) -> np.ndarray:
    """(points, 3) exponents of the three terms: a - alpha log N, b - beta log D, e."""
    a, b, e, alpha, beta = p
    return np.stack([a - alpha * log_n, b - beta * log_d, np.full_like(log_n, e)], axis=1)


def _objective(p: np.ndarray, log_n: np.ndarray, log_d: np.ndarray, log_l: np.ndarray) -> tuple[float, np.ndarray]:
    """Sum of Huber(LSE(...) - log L) / delta and its gradient in (a, b, e, alpha, beta)."""
    terms = _lse_terms(p, log_n, log_d)
    top = terms.max(axis=1, keepdims=True)
    w = np.exp(terms - top)
    lse = top[:, 0] + np.log(w.sum(axis=1))
    w /= w.sum(axis=1, keepdims=True)                                     # softmax: d lse / d term
    r = lse - log_l
    small = np.abs(r) <= HUBER_DELTA
    value = np.where(small, 0.5 * r * r, HUBER_DELTA * (np.abs(r) - 0.5 * HUBER_DELTA)).sum() / HUBER_DELTA
    dr = np.where(small, r, HUBER_DELTA * np.sign(r)) / HUBER_DELTA
    grad = np.array([(dr * w[:, 0]).sum(), (dr * w[:, 1]).sum(), (dr * w[:, 2]).sum(),
                     -(dr * w[:, 0] * log_n).sum(), -(dr * w[:, 1] * log_d).sum()])
    return float(value), grad


def _grid(min_loss: float) -> np.ndarray:
    a, b, e, alpha, beta = np.meshgrid(GRID_AB, GRID_AB, np.log(min_loss * GRID_E_FRACTION), GRID_EXP, GRID_EXP,
                                       indexing="ij")
    return np.stack([a.ravel(), b.ravel(), e.ravel(), alpha.ravel(), beta.ravel()], axis=1)


def _grid_values(grid: np.ndarray, log_n, log_d, log_l) -> np.ndarray:
    """The objective at every grid point at once: (starts,)."""
    terms = np.stack([grid[:, :1] - grid[:, 3:4] * log_n, grid[:, 1:2] - grid[:, 4:5] * log_d,
                      np.broadcast_to(grid[:, 2:3], (len(grid), len(log_n)))], axis=2)
    top = terms.max(axis=2, keepdims=True)
    r = top[..., 0] + np.log(np.exp(terms - top).sum(axis=2)) - log_l
    return np.where(np.abs(r) <= HUBER_DELTA, 0.5 * r * r, HUBER_DELTA * (np.abs(r) - 0.5 * HUBER_DELTA)).sum(axis=1)


def _fit_once(log_n, log_d, log_l, start: np.ndarray | None = None) -> np.ndarray:
    """(a, b, e, alpha, beta) minimising the objective: from `start` alone when given, else from the grid."""
    from scipy.optimize import minimize

    if start is None:
        grid = _grid(float(np.exp(log_l.min())))
        starts = grid[np.argsort(_grid_values(grid, log_n, log_d, log_l))[:STARTS]]
    else:
        starts = start[None]
    bounds = list(BOUNDS)
    bounds[2] = (BOUNDS[2][0], float(log_l.max()))
    best, best_value = None, math.inf
    for start in starts:
        result = minimize(_objective, start, args=(log_n, log_d, log_l), jac=True, method="L-BFGS-B",
                          bounds=bounds, options={"maxiter": 2000, "ftol": 1e-14, "gtol": 1e-10})
        if result.fun < best_value:
            best, best_value = result.x, float(result.fun)
    return best


@dataclass
class ParametricFit:
    """L(N, D) = E + A N^-alpha + B D^-beta with 95% bootstrap intervals, and the FLOP accounting C = k N^gamma D."""

    E: float
    A: float
    B: float
    alpha: float
    beta: float
    intervals: dict[str, tuple[float, float]]
    flops_k: float
    flops_gamma: float
    points: int
    n_boot: int
    residual_sigma: float            # rms of L - L(N, D) on the fitted points (dof-corrected)
    boot: np.ndarray = field(default_factory=lambda: np.empty((0, 5)), repr=False)   # E, A, B, alpha, beta

    def values(self) -> dict[str, float]:
        return {k: getattr(self, k) for k in PARAMS}

    def predict(self, n, d) -> np.ndarray:
        n, d = np.asarray(n, dtype=np.float64), np.asarray(d, dtype=np.float64)
        return self.E + self.A * n ** -self.alpha + self.B * d ** -self.beta

    def predict_interval(self, n: float, d: float) -> tuple[float, float]:
        p = self.boot
        return _interval(p[:, 0] + p[:, 1] * n ** -p[:, 3] + p[:, 2] * d ** -p[:, 4]) if len(p) else (math.nan,) * 2

    def _n_opt(self, c: float, E, A, B, alpha, beta):
        """argmin_N L(N, C / (k N^gamma)): alpha A N^-alpha = gamma beta B k^beta C^-beta N^(gamma beta);
        inf or nan where an exponent sits at 0 (the loss does not fall with N or with D: no optimum)."""
        k, g = self.flops_k, self.flops_gamma
        A, B, alpha, beta = (np.asarray(v, dtype=np.float64) for v in (A, B, alpha, beta))
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            return (alpha * A / (g * beta * B * k ** beta)) ** (1 / (alpha + g * beta)) * c ** (beta / (alpha + g * beta))

    def n_opt(self, c: float) -> float:
        return float(self._n_opt(c, *self.values().values()))

    def n_opt_interval(self, c: float) -> tuple[float, float]:
        p = self.boot
        if not len(p):
            return math.nan, math.nan
        return _interval(self._n_opt(c, p[:, 0], p[:, 1], p[:, 2], p[:, 3], p[:, 4]))

    def l_opt(self, c: float) -> float:
        n = self.n_opt(c)
        return float(self.predict(n, c / (self.flops_k * n ** self.flops_gamma)))


def fit_parametric(n, d, loss, flops=None, *, n_boot: int = 200, seed: int = 0) -> ParametricFit:
    """Fit L(N, D) to runs (N params, D tokens, C FLOPs, L loss); >= 6 points with >= 2 distinct N and D."""
    n, d, loss = (np.asarray(v, dtype=np.float64) for v in (n, d, loss))
    keep = np.isfinite(n) & np.isfinite(d) & np.isfinite(loss) & (n > 0) & (d > 0) & (loss > 0)
    n, d, loss = n[keep], d[keep], loss[keep]
    if len(n) < 6 or len(np.unique(n)) < 2 or len(np.unique(d)) < 2:
        raise ValueError(f"the fit of L(N, D) needs >= 6 runs with >= 2 distinct N and D, got {len(n)} runs, "
                         f"{len(np.unique(n))} N, {len(np.unique(d))} D")
    log_n, log_d, log_l = np.log(n), np.log(d), np.log(loss)
    best = _fit_once(log_n, log_d, log_l)
    flops = 6.0 * n * d if flops is None else np.asarray(flops, dtype=np.float64)[keep]
    law = _power_law(n, flops / d)                                        # FLOPs per token against N
    log_k, gamma = law if law is not None else (math.log(float(np.median(flops / d / n))), 1.0)

    rng = np.random.default_rng(seed)
    boot = []
    for _ in range(n_boot):
        idx = rng.integers(0, len(n), len(n))
        if len(np.unique(n[idx])) < 2 or len(np.unique(d[idx])) < 2:
            continue
        boot.append(_fit_once(log_n[idx], log_d[idx], log_l[idx], start=best))
    boot_p = np.array(boot).reshape(-1, 5)
    as_params = lambda p: np.stack([np.exp(p[:, 2]), np.exp(p[:, 0]), np.exp(p[:, 1]), p[:, 3], p[:, 4]], axis=1)  # noqa: E731
    boot_params = as_params(boot_p)
    point = as_params(best[None])[0]
    fit = ParametricFit(*[float(v) for v in point], intervals={}, flops_k=math.exp(log_k), flops_gamma=float(gamma),
                        points=len(n), n_boot=len(boot_params), residual_sigma=math.nan, boot=boot_params)
    fit.intervals = {name: _interval(boot_params[:, i]) for i, name in enumerate(PARAMS)}
    residual = loss - fit.predict(n, d)
    fit.residual_sigma = float(math.sqrt((residual ** 2).sum() / max(len(n) - 5, 1)))
    return fit
