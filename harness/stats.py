"""Statistics whose verdicts can fail: intervals for differences between runs, and a held-out check of scaling fits.

- GenEval differences: a paired bootstrap over prompts. Every run of a sweep scores the same prompts, so the
  difference of two runs is resampled prompt by prompt (the same prompts drawn for both), within each task, since
  GenEval's overall score is the unweighted mean of the six task accuracies (Ghosh et al. 2023, GenEval). Pairing
  removes the prompt-to-prompt spread that two independent standard errors count twice; resampling prompts, not
  images, keeps the images of one prompt together (they are not independent: the prompt makes them easy or hard).
- Training seeds: where a (variant, size) was trained with several seeds, the spread of its metric across seeds
  is added to the interval's variance (the prompts' bootstrap does not see a second training run).
- Verdicts: a claim holds when its whole 95% interval lies on the claimed side, does not hold when the whole
  interval lies on the other side, and is not resolved when the interval covers zero: with 3 points an R^2 or a
  correlation is near 1 for any monotone curve, so neither decides a verdict here.
- Held-out check: fit the power law on every rung but the largest, predict the largest, compare with the measured
  loss (Hoffmann et al. 2022 check their laws the same way on larger runs).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from harness.scaling import PowerLawFit, fit_power_law

HOLDS, FAILS, OPEN = "holds", "does not hold", "not resolved"
Z95 = 1.959964


@dataclass(frozen=True)
class Interval:
    """An estimate with its 95% interval and how the interval was made."""

    estimate: float
    lo: float
    hi: float
    method: str

    def verdict(self, sign: int = 1) -> str:
        """For the claim sign * x > 0: holds / does not hold / not resolved (the interval covers 0)."""
        lo, hi = sorted((sign * self.lo, sign * self.hi))
        if not (math.isfinite(lo) and math.isfinite(hi)):
            return OPEN
        return HOLDS if lo > 0 else FAILS if hi < 0 else OPEN

    def widened(self, extra_sd: float, why: str) -> "Interval":
        """The interval with another independent source of spread (sd `extra_sd`) added in quadrature."""
        if not extra_sd or not math.isfinite(extra_sd):
            return self
        half = math.hypot((self.hi - self.lo) / 2, Z95 * extra_sd)
        return Interval(self.estimate, self.estimate - half, self.estimate + half, f"{self.method} + {why}")

    def text(self, digits: int = 3) -> str:
        return f"{self.estimate:+.{digits}f} [{self.lo:+.{digits}f}, {self.hi:+.{digits}f}]"


def normal_interval(estimate: float, sd: float, method: str) -> Interval:
    return Interval(estimate, estimate - Z95 * sd, estimate + Z95 * sd, method)


def bootstrap_interval(estimate: float, boots: Sequence[float], method: str) -> Interval:
    """The 2.5-97.5 percentiles of bootstrap values, widened to take in the estimate itself (a resampled fit can
    sit all on one side of it); nan bounds when no resample was usable."""
    lo, hi = np.percentile(boots, [2.5, 97.5]) if len(boots) else (math.nan, math.nan)
    return Interval(estimate, float(min(lo, estimate)), float(max(hi, estimate)), method)


def combine_verdicts(verdicts: Sequence[str]) -> str:
    """A claim made for every case: holds if it holds in all, does not hold if it fails in any, else not resolved."""
    if not verdicts:
        return "not measured"
    if any(v == FAILS for v in verdicts):
        return FAILS
    return HOLDS if all(v == HOLDS for v in verdicts) else OPEN


# ---------------------------------------------------------------------------------------------- GenEval
@dataclass(frozen=True)
class PromptScores:
    """One run's GenEval per prompt: the fraction of its images judged correct, and each prompt's task."""

    accuracy: dict[str, float]      # prompt key -> fraction correct
    task: dict[str, str]            # prompt key -> task tag

    def overall(self) -> float:
        by_task: dict[str, list[float]] = {}
        for key, acc in self.accuracy.items():
            by_task.setdefault(self.task[key], []).append(acc)
        return float(np.mean([np.mean(v) for v in by_task.values()]))


def read_prompt_scores(results: str | Path) -> PromptScores:
    """Per-prompt accuracy from GenEval's results.jsonl (official schema: one row per image; the prompt is the
    image's folder, `<index>/samples/<n>.png`)."""
    correct: dict[str, list[bool]] = {}
    task: dict[str, str] = {}
    for line in Path(results).read_text().splitlines():
        if not line.strip():
            continue
        row = json.loads(line)
        parts = Path(row["filename"]).parts
        key = parts[-3] if len(parts) >= 3 else row["metadata"]
        correct.setdefault(key, []).append(bool(row["correct"]))
        task[key] = row["tag"]
    return PromptScores({k: float(np.mean(v)) for k, v in correct.items()}, task)


def mean_scores(runs: Sequence[PromptScores]) -> PromptScores:
    """Seeds of one (variant, size): per prompt, the mean over the seeds' runs."""
    if len(runs) == 1:
        return runs[0]
    keys = set.intersection(*(set(r.accuracy) for r in runs))
    return PromptScores({k: float(np.mean([r.accuracy[k] for r in runs])) for k in keys}, runs[0].task)


class PairedBootstrap:
    """Differences of GenEval overall between runs that share prompts, all resampled with the same draws.

    One set of `n_boot` resamples of the prompts (within each task) serves every difference asked of it, so
    a finding's pooled difference (the mean over several pairs) has an interval with the pairs' correlation in.
    """

    def __init__(self, prompts: Sequence[str], task: dict[str, str], n_boot: int = 2000, seed: int = 0):
        self.prompts = sorted(prompts)
        tasks = sorted({task[p] for p in self.prompts})
        self.groups = [np.array([i for i, p in enumerate(self.prompts) if task[p] == t]) for t in tasks]
        rng = np.random.default_rng(seed)
        self.draws = [g[rng.integers(0, len(g), (n_boot, len(g)))] for g in self.groups]  # (n_boot, n_task)
        self.n_boot = n_boot

    def _vector(self, scores: PromptScores) -> np.ndarray:
        missing = [p for p in self.prompts if p not in scores.accuracy]
        if missing:
            raise ValueError(f"{len(missing)} prompts not scored by a run (first: {missing[0]}): the runs must "
                             "share their GenEval prompts to be compared pairwise")
        return np.array([scores.accuracy[p] for p in self.prompts])

    def _overall(self, v: np.ndarray) -> tuple[float, np.ndarray]:
        """(overall on the prompts as scored, overall of each resample (n_boot,))."""
        point = float(np.mean([v[g].mean() for g in self.groups]))
        boots = np.mean([v[d].mean(axis=1) for d in self.draws], axis=0)
        return point, boots

    def difference(self, pairs: Sequence[tuple[PromptScores, PromptScores]]) -> Interval:
        """The mean over `pairs` of overall(a) - overall(b), with a percentile interval (one pair: its difference)."""
        point, boots = 0.0, np.zeros(self.n_boot)
        for a, b in pairs:
            pa, ba = self._overall(self._vector(a))
            pb, bb = self._overall(self._vector(b))
            point, boots = point + (pa - pb), boots + (ba - bb)
        point, boots = point / len(pairs), boots / len(pairs)
        lo, hi = np.percentile(boots, [2.5, 97.5])
        return Interval(point, float(lo), float(hi),
                        f"paired bootstrap over {len(self.prompts)} prompts")

    def standard_error(self, a: PromptScores, b: PromptScores) -> float:
        """The bootstrap standard error of overall(a) - overall(b)."""
        _, ba = self._overall(self._vector(a))
        _, bb = self._overall(self._vector(b))
        return float(np.std(ba - bb, ddof=1))


# ---------------------------------------------------------------------------------------------- scaling fits
@dataclass(frozen=True)
class HeldOut:
    """The fit on all rungs but the largest, its prediction for the largest, and the measured loss."""

    fit: PowerLawFit
    offset: bool                # whether the fit had the offset c (4 or more smaller sizes)
    n: float
    predicted: Interval         # the prediction with a bootstrap interval over the fitted rungs (+ seed spread)
    measured: float

    @property
    def error(self) -> float:
        """Relative error of the prediction, (predicted - measured) / measured."""
        return (self.predicted.estimate - self.measured) / self.measured

    def verdict(self) -> str:
        """Holds when the measured loss lies inside the prediction's interval, does not hold otherwise."""
        lo, hi = self.predicted.lo, self.predicted.hi
        if not (math.isfinite(lo) and math.isfinite(hi)):
            return OPEN
        slack = 1e-9 * abs(self.measured)  # an exact law fitted on 2 points predicts to rounding, no wider
        return HOLDS if lo - slack <= self.measured <= hi + slack else FAILS


def fit_form(n_sizes: int) -> bool:
    """Whether the power law gets an offset: with >= 4 rungs (3 points fit L = a N^-alpha + c exactly)."""
    return n_sizes >= 4


def held_out_check(n: Sequence[float], loss: Sequence[float], *, seed_sd: float = 0.0, n_boot: int = 1000,
                   seed: int = 0) -> HeldOut | None:
    """Fit on every size but the largest (with an offset when 4 or more remain, `fit_form`), predict the
    largest with a bootstrap interval, widened by `seed_sd` (the seed spread of a loss, where measured);
    None with fewer than 3 sizes in all (2 points fit any power law)."""
    n_arr, l_arr = np.asarray(n, dtype=np.float64), np.asarray(loss, dtype=np.float64)
    keep = np.isfinite(n_arr) & np.isfinite(l_arr)
    n_arr, l_arr = n_arr[keep], l_arr[keep]
    sizes = np.unique(n_arr)
    if len(sizes) < 3:
        return None
    largest = sizes[-1]
    train = n_arr < largest
    offset = fit_form(len(sizes) - 1)
    fit = fit_power_law(n_arr[train], l_arr[train], offset=offset, n_boot=0)
    predicted = float(fit.predict(largest))
    rng = np.random.default_rng(seed)
    boots, fitted = [], {}
    need = 3 if offset else 2
    nt, lt = n_arr[train], l_arr[train]
    for _ in range(n_boot):
        idx = tuple(sorted(rng.integers(0, len(nt), len(nt))))
        if len(np.unique(nt[list(idx)])) < need:
            continue
        if idx not in fitted:  # a few points have few distinct resamples: fit each once
            fitted[idx] = float(fit_power_law(nt[list(idx)], lt[list(idx)], offset=offset, n_boot=0).predict(largest))
        boots.append(fitted[idx])
    interval = bootstrap_interval(predicted, boots, f"pairs bootstrap over the {len(np.unique(nt))} smaller sizes")
    if seed_sd:  # the measured value itself carries the seed spread
        interval = interval.widened(seed_sd, "seed spread")
    return HeldOut(fit, offset, float(largest), interval, float(l_arr[n_arr == largest].mean()))


# ------------------------------------------------------------------------------- loss -> metric, two steps
@dataclass(frozen=True)
class TwoStep:
    """The largest rung's metric predicted in two steps (the OLMo ladder's method, Bhagia et al. 2024): step 1,
    its loss from the power law fitted on the smaller rungs (`HeldOut`); step 2, the metric from that loss by a
    line fitted on the smaller rungs' (loss, metric) runs. `from_loss` is step 2 alone, at the measured loss."""

    metric: str
    runs: int                    # smaller-rung runs the line was fitted on
    slope: float
    from_loss: Interval          # step 2 at the largest rung's measured loss
    two_step: Interval           # steps 1 + 2: at the predicted loss, its interval carried through
    measured: float
    measured_se: float           # the measurement's own standard error (bootstrap over samples / prompts)

    @property
    def error(self) -> float:
        """(predicted - measured) in the metric's units: two steps."""
        return self.two_step.estimate - self.measured

    def verdict(self) -> str:
        """Holds when the measured value lies inside the two-step interval widened by its own SE."""
        interval = self.two_step.widened(self.measured_se, "measurement SE")
        if not (math.isfinite(interval.lo) and math.isfinite(interval.hi)):
            return OPEN
        return HOLDS if interval.lo <= self.measured <= interval.hi else FAILS


def two_step_prediction(held: HeldOut, n: Sequence[float], loss: Sequence[float], metric: Sequence[float], *,
                        metric_se: float = 0.0, name: str = "metric", n_boot: int = 1000,
                        seed: int = 0) -> TwoStep | None:
    """Step 2 fitted on the runs below the largest size `held.n` (metric = a + b * loss, least squares; a pairs
    bootstrap over those runs for its interval, each resampled line evaluated at a loss drawn from step 1's
    interval for the two-step prediction); None with fewer than 3 smaller-rung runs or no spread in their loss."""
    n_arr, l_arr, m_arr = (np.asarray(v, dtype=np.float64) for v in (n, loss, metric))
    keep = np.isfinite(n_arr) & np.isfinite(l_arr) & np.isfinite(m_arr)
    n_arr, l_arr, m_arr = n_arr[keep], l_arr[keep], m_arr[keep]
    train, top = n_arr < held.n, n_arr == held.n
    lt, mt = l_arr[train], m_arr[train]
    if len(lt) < 3 or np.ptp(lt) == 0 or not top.any():
        return None
    slope, intercept = np.polyfit(lt, mt, 1)
    loss_top = float(l_arr[top].mean())
    p = held.predicted
    loss_sd = (p.hi - p.lo) / (2 * Z95) if math.isfinite(p.hi - p.lo) else 0.0
    rng = np.random.default_rng(seed)
    at_loss, two = [], []
    for _ in range(n_boot):
        idx = rng.integers(0, len(lt), len(lt))
        if np.ptp(lt[idx]) == 0:
            continue
        b, a = np.polyfit(lt[idx], mt[idx], 1)
        at_loss.append(a + b * loss_top)
        two.append(a + b * (p.estimate + loss_sd * rng.standard_normal()))
    method = f"pairs bootstrap over {len(lt)} smaller-rung runs"
    return TwoStep(name, len(lt), float(slope),
                   bootstrap_interval(float(intercept + slope * loss_top), at_loss, method),
                   bootstrap_interval(float(intercept + slope * p.estimate), two, method + " + step 1's interval"),
                   float(m_arr[top].mean()), float(metric_se))
