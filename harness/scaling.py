"""Power-law fits for scaling curves: L = a * N^(-alpha) (+ c), with a bootstrap interval for alpha.

The fit without offset is least squares on log L against log N (a straight line on log-log axes, the way
scaling plots are read). With an offset, L - c must stay positive, so it is a bounded nonlinear least squares
on log L, started from the log-log line. The interval comes from a pairs bootstrap over the runs: resample the
(N, L) points with replacement, refit, take the 2.5 and 97.5 percentiles of alpha. With 3-5 sizes the interval
is wide and rough; it says how much the few points constrain alpha, not more.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Sequence

import numpy as np


@dataclass
class PowerLawFit:
    """L = a * N^(-alpha) + c, its fit quality in log space, and a bootstrap 95% interval for alpha."""

    a: float
    alpha: float
    c: float
    r2: float                # of log L, on the fitted points
    alpha_lo: float          # bootstrap 2.5 percentile (nan when too few points)
    alpha_hi: float          # bootstrap 97.5 percentile
    n_points: int
    n_boot: int              # resamples that could be fitted

    def predict(self, n: np.ndarray | float) -> np.ndarray:
        return self.a * np.power(np.asarray(n, dtype=np.float64), -self.alpha) + self.c

    def to_dict(self) -> dict:
        return asdict(self)


def _fit_loglog(n: np.ndarray, loss: np.ndarray) -> tuple[float, float]:
    """(a, alpha) of the least-squares line log L = log a - alpha log N."""
    slope, intercept = np.polyfit(np.log(n), np.log(loss), 1)
    return float(math.exp(intercept)), float(-slope)


def _fit_offset(n: np.ndarray, loss: np.ndarray) -> tuple[float, float, float]:
    """(a, alpha, c) of L = a N^-alpha + c, 0 <= c < min(L), least squares on log L."""
    from scipy.optimize import least_squares

    a0, alpha0 = _fit_loglog(n, loss)
    logn, logl = np.log(n), np.log(loss)
    scale = float(np.exp(logn.mean()))  # fit a at the geometric-mean N so the parameters are well scaled

    x = logn - math.log(scale)

    def residuals(p: np.ndarray) -> np.ndarray:
        log_a, alpha, c = p
        return np.log(np.exp(log_a - alpha * x) + c) - logl

    def jacobian(p: np.ndarray) -> np.ndarray:  # analytic: a finite-difference one was 1/3 of a sweep's report
        log_a, alpha, c = p
        u = np.exp(log_a - alpha * x)
        return np.stack([u, -x * u, np.ones_like(u)], axis=1) / (u + c)[:, None]

    start = np.array([math.log(a0) - alpha0 * math.log(scale), alpha0, 0.0])
    upper_c = float(loss.min()) * (1 - 1e-9)
    result = least_squares(residuals, start, jac=jacobian, bounds=([-np.inf, -10.0, 0.0], [np.inf, 10.0, upper_c]))
    log_a, alpha, c = result.x
    return float(math.exp(log_a + alpha * math.log(scale))), float(alpha), float(c)


def _fit(n: np.ndarray, loss: np.ndarray, offset: bool) -> tuple[float, float, float]:
    if offset:
        return _fit_offset(n, loss)
    a, alpha = _fit_loglog(n, loss)
    return a, alpha, 0.0


def fit_power_law(n: Sequence[float], loss: Sequence[float], *, offset: bool = False, n_boot: int = 1000,
                  seed: int = 0) -> PowerLawFit:
    """Fit L = a * N^(-alpha) (+ c when `offset`) to points with N > 0 and L > 0 (at least 2, 3 with offset)."""
    n_arr, l_arr = np.asarray(n, dtype=np.float64), np.asarray(loss, dtype=np.float64)
    keep = np.isfinite(n_arr) & np.isfinite(l_arr) & (n_arr > 0) & (l_arr > 0)
    n_arr, l_arr = n_arr[keep], l_arr[keep]
    need = 3 if offset else 2
    if len(np.unique(n_arr)) < need:
        raise ValueError(f"power-law fit needs >= {need} distinct positive sizes, got {len(np.unique(n_arr))}")
    a, alpha, c = _fit(n_arr, l_arr, offset)
    pred = np.log(a * n_arr ** -alpha + c)
    ss_res = float(((np.log(l_arr) - pred) ** 2).sum())
    ss_tot = float(((np.log(l_arr) - np.log(l_arr).mean()) ** 2).sum())
    r2 = 1.0 - ss_res / ss_tot if ss_tot > 0 else float("nan")

    rng = np.random.default_rng(seed)
    alphas = []
    for _ in range(n_boot):
        idx = rng.integers(0, len(n_arr), len(n_arr))
        if len(np.unique(n_arr[idx])) < need:  # a resample on too few sizes has no slope
            continue
        alphas.append(_fit(n_arr[idx], l_arr[idx], offset)[1])
    lo, hi = (np.percentile(alphas, [2.5, 97.5]) if alphas else (float("nan"), float("nan")))
    return PowerLawFit(a=a, alpha=alpha, c=c, r2=r2, alpha_lo=float(lo), alpha_hi=float(hi),
                       n_points=len(n_arr), n_boot=len(alphas))


def pearson_r(x: Sequence[float], y: Sequence[float]) -> float:
    """Pearson correlation of the finite pairs; nan with fewer than 3."""
    x_arr, y_arr = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    keep = np.isfinite(x_arr) & np.isfinite(y_arr)
    if keep.sum() < 3 or np.std(x_arr[keep]) == 0 or np.std(y_arr[keep]) == 0:
        return float("nan")
    return float(np.corrcoef(x_arr[keep], y_arr[keep])[0, 1])
