"""The paper's findings judged on a sweep's runs, each verdict from an interval (harness/stats.py).

Fluid's claims (Fan et al. 2024, "Fluid: Scaling Autoregressive Text-to-image Generative Models with Continuous
Tokens"): validation loss scales as a power law in model size for every variant; continuous tokens give better
FID than discrete ones; random order gives better GenEval than raster order; random order with continuous
tokens is the best variant and keeps improving; validation loss predicts quality. Each is checked here as a
difference with a 95% interval: GenEval by a paired bootstrap over the prompts every run shares, FID by its
bootstrap standard error where the evaluation recorded one (`fid_se`), both widened by the seed spread where a
(variant, size) was trained with several seeds. The scaling law is judged by its held-out prediction of the
largest rung. Reads the results table and the run folders only.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from harness.scaling import PowerLawFit, fit_power_law, pearson_r
from harness.stats import (FAILS, HOLDS, OPEN, HeldOut, Interval, PairedBootstrap, PromptScores, combine_verdicts,
                           TwoStep, fit_form, held_out_check, mean_scores, normal_interval, read_prompt_scores,
                           two_step_prediction)

Cell = tuple[str, str]  # (variant, size)
GENEVAL_SE = "geneval_overall_se"  # the results table's binomial standard error of GenEval overall


@dataclass(frozen=True)
class Finding:
    title: str
    verdict: str
    interval: str       # the interval the verdict came from (or why there is none)
    evidence: str


def size_column(table: pd.DataFrame) -> str:
    """The parameter count the laws are fitted on: non-embedding parameters (Kaplan et al. 2020) when recorded."""
    if "params_nonembed" in table and table["params_nonembed"].notna().any():
        return "params_nonembed"
    return "params"


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}


class Evidence:
    """The runs of a sweep grouped by (variant, size) over seeds, with what the intervals need."""

    def __init__(self, table: pd.DataFrame, sweep_dir: str | Path | None, n_boot: int = 2000):
        self.table = table
        self.cells: dict[Cell, pd.DataFrame] = {(v, s): rows for (v, s), rows in table.groupby(["variant", "size"])}
        self.axes = {cell: (rows["token_kind"].iloc[0], rows["order"].iloc[0]) for cell, rows in self.cells.items()}
        self.scores: dict[Cell, PromptScores] = {}
        self.fid_se: dict[str, float] = {}
        root = Path(sweep_dir) if sweep_dir is not None else None
        for cell, rows in self.cells.items():
            runs = []
            for run in rows["run"]:
                if root is None:
                    continue
                results = root / "runs" / str(run) / "eval" / "geneval" / "results.jsonl"
                if results.is_file():
                    runs.append(read_prompt_scores(results))
                se = _read_json(root / "runs" / str(run) / "eval" / "fid.json").get("fid_se")
                if se is not None:
                    self.fid_se[str(run)] = float(se)
            if runs:
                self.scores[cell] = mean_scores(runs)
        if "fid_se" in table:  # a table that carries the standard error itself
            for run, se in zip(table["run"], table["fid_se"]):
                if pd.notna(se):
                    self.fid_se.setdefault(str(run), float(se))
        self.bootstrap = None
        if self.scores:
            common = set.intersection(*(set(s.accuracy) for s in self.scores.values()))
            task = next(iter(self.scores.values())).task
            if common:
                self.bootstrap = PairedBootstrap(sorted(common), task, n_boot=n_boot)

    def value(self, cell: Cell, metric: str) -> float:
        rows = self.cells.get(cell)
        if rows is None or metric not in rows or not rows[metric].notna().any():
            return math.nan
        return float(rows[metric].mean())

    def seed_term(self, cell: Cell, metric: str) -> tuple[float, int]:
        """(variance of the cell's mean over seeds, seeds) where >= 2 seeds were measured, else (0, seeds)."""
        values = self.cells[cell][metric].dropna() if metric in self.cells[cell] else pd.Series(dtype=float)
        if len(values) < 2:
            return 0.0, len(values)
        return float(values.var(ddof=1)) / len(values), len(values)

    def params(self, cell: Cell) -> float:
        return self.value(cell, size_column(self.table))

    def sizes(self, variant: str) -> list[str]:
        return sorted({s for v, s in self.cells if v == variant}, key=lambda s: self.params((variant, s)))

    # ---- differences with intervals ----
    def geneval_difference(self, pairs: list[tuple[Cell, Cell]]) -> Interval | None:
        """Mean over pairs of GenEval(a) - GenEval(b): paired bootstrap over prompts (+ seed spread); from a table
        without the run folders' per-image results, a normal interval from each run's binomial standard error."""
        if not pairs:
            return None
        if self.bootstrap is None or any(a not in self.scores or b not in self.scores for a, b in pairs):
            return self._unpaired_geneval(pairs)
        interval = self.bootstrap.difference([(self.scores[a], self.scores[b]) for a, b in pairs])
        seed_var = sum(self.seed_term(c, "geneval_overall")[0] for pair in pairs for c in pair) / len(pairs) ** 2
        return interval.widened(math.sqrt(seed_var), "seed spread")

    def _unpaired_geneval(self, pairs: list[tuple[Cell, Cell]]) -> Interval | None:
        estimate, variance = 0.0, 0.0
        for a, b in pairs:
            ga, gb = self.value(a, "geneval_overall"), self.value(b, "geneval_overall")
            sa, sb = self.value(a, GENEVAL_SE), self.value(b, GENEVAL_SE)
            if any(math.isnan(v) for v in (ga, gb, sa, sb)):
                return None
            estimate += ga - gb
            variance += sa ** 2 + sb ** 2
        k = len(pairs)
        return normal_interval(estimate / k, math.sqrt(variance) / k, "unpaired binomial SE (no per-prompt results)")

    def fid_difference(self, pairs: list[tuple[Cell, Cell]]) -> Interval | None:
        """Mean over pairs of FID(a) - FID(b): normal interval from each run's bootstrap SE and/or seed spread."""
        if not pairs:
            return None
        estimate, variance, sources = 0.0, 0.0, set()
        for a, b in pairs:
            fa, fb = self.value(a, "fid"), self.value(b, "fid")
            if math.isnan(fa) or math.isnan(fb):
                return None
            estimate += fa - fb
            for cell in (a, b):
                seed_var, n = self.seed_term(cell, "fid")
                ses = [self.fid_se[str(r)] for r in self.cells[cell]["run"] if str(r) in self.fid_se]
                if seed_var:
                    variance += seed_var
                    sources.add("seed spread")
                elif ses:
                    variance += float(np.mean(np.square(ses))) / len(ses)
                    sources.add("bootstrap SE")
                else:
                    return Interval(estimate, math.nan, math.nan, "no FID standard error or seeds recorded")
        k = len(pairs)
        return normal_interval(estimate / k, math.sqrt(variance) / k, " and ".join(sorted(sources)))


def _text(interval: Interval | None, digits: int = 3) -> str:
    if interval is None:
        return "not measured"
    if not math.isfinite(interval.lo):
        return f"{interval.estimate:+.{digits}f} ({interval.method})"
    return f"{interval.text(digits)} ({interval.method})"


def _verdict(interval: Interval | None, sign: int) -> str:
    return "not measured" if interval is None else interval.verdict(sign)


# ---------------------------------------------------------------------------------------------- the findings
def fit_losses(table: pd.DataFrame, n_boot: int = 1000, offset: bool | None = None) -> dict[str, PowerLawFit]:
    """Per variant, L = a N^-alpha (+ c with >= 4 sizes, or as `offset` says) on non-embedding parameters."""
    fits = {}
    x = size_column(table)
    for variant, rows in table.groupby("variant"):
        rows = rows.dropna(subset=[x, "val_loss"])
        use_offset = fit_form(rows[x].nunique()) if offset is None else offset
        try:
            fits[variant] = fit_power_law(rows[x], rows["val_loss"], offset=use_offset, n_boot=n_boot)
        except ValueError:
            continue  # too few sizes
    return fits


def held_out_checks(table: pd.DataFrame, n_boot: int = 1000) -> dict[str, HeldOut]:
    """Per variant with >= 3 sizes: the fit on all but the largest, its prediction of the largest."""
    out = {}
    x = size_column(table)
    for variant, rows in table.groupby("variant"):
        rows = rows.dropna(subset=[x, "val_loss"])
        if rows[x].nunique() < 3:
            continue
        largest = rows[rows[x] == rows[x].max()]["val_loss"]
        by_size = [g["val_loss"] for _, g in rows.groupby(x) if len(g) >= 2]
        # the seed spread of one run's loss: at the largest rung if measured there, else pooled over the rungs
        sd = float(largest.std(ddof=1)) / math.sqrt(len(largest)) if len(largest) >= 2 else (
            math.sqrt(float(np.mean([g.var(ddof=1) for g in by_size]))) if by_size else 0.0)
        check = held_out_check(rows[x], rows["val_loss"], seed_sd=sd, n_boot=n_boot)
        if check is not None:
            out[variant] = check
    return out


def judge(table: pd.DataFrame, sweep_dir: str | Path | None = None, n_boot: int = 2000,
          fits: dict[str, PowerLawFit] | None = None) -> list[Finding]:
    """Each of the paper's findings with its verdict, the interval it came from, and the evidence
    (`n_boot` resamples of the prompts; the fits' own bootstraps resample runs, 1000 times)."""
    ev = Evidence(table, sweep_dir, n_boot=n_boot)
    fits = fit_losses(table) if fits is None else fits
    return [_power_law(ev, fits, held_out_checks(table)), _kl_fid(ev), _random_geneval(ev), _fluid_best(ev),
            _gains(ev), _loss_predicts_quality(ev)]


def _power_law(ev: Evidence, fits: dict[str, PowerLawFit], checks: dict[str, HeldOut]) -> Finding:
    title = ("Validation loss of every variant follows a power law in non-embedding parameters: the fit on the "
             "smaller rungs predicts the largest, and alpha > 0")
    verdicts, intervals, notes = [], [], []
    for variant in sorted(set(ev.table["variant"])):
        fit, check = fits.get(variant), checks.get(variant)
        if check is None:
            notes.append(f"{variant}: fewer than 3 sizes, not judged")
            continue
        slope = Interval(fit.alpha, fit.alpha_lo, fit.alpha_hi, "pairs bootstrap") if fit else None
        verdicts.append(combine_verdicts([check.verdict()] + ([slope.verdict(+1)] if slope else [])))
        intervals.append(f"{variant}: predicted {check.predicted.estimate:.4f} [{check.predicted.lo:.4f}, "
                         f"{check.predicted.hi:.4f}] vs measured {check.measured:.4f}")
        notes.append(f"{variant}: held-out error {check.error:+.2%}; alpha {fit.alpha:.3f} [{fit.alpha_lo:.3f}, "
                     f"{fit.alpha_hi:.3f}] on {fit.n_points} runs" + (f", offset c {fit.c:.3g}" if fit.c else ""))
    return Finding(title, combine_verdicts(verdicts), "; ".join(intervals) or "not measured", "; ".join(notes))


def _axis_pairs(ev: Evidence, axis: int, better: str, worse: str) -> list[tuple[Cell, Cell, str]]:
    """(better cell, worse cell, label) at each size and value of the other axis (0 = token kind, 1 = order)."""
    out = []
    for cell_a, axes_a in ev.axes.items():
        if axes_a[axis] != better:
            continue
        for cell_b, axes_b in ev.axes.items():
            if cell_b[1] == cell_a[1] and axes_b[axis] == worse and axes_b[1 - axis] == axes_a[1 - axis]:
                out.append((cell_a, cell_b, f"{axes_a[1 - axis]} {cell_a[1]}"))
    return sorted(out, key=lambda p: (p[2].split()[0], ev.params(p[0])))


def _kl_fid(ev: Evidence) -> Finding:
    title = "Continuous (kl) tokens give better (lower) FID than discrete (vq) at the same size and order"
    pairs = [(a, b, label) for a, b, label in _axis_pairs(ev, 0, "kl", "vq")
             if not math.isnan(ev.value(a, "fid")) and not math.isnan(ev.value(b, "fid"))]
    if not pairs:
        return Finding(title, "not measured", "FID not measured", "")
    pooled = ev.fid_difference([(a, b) for a, b, _ in pairs])
    evidence = "; ".join(f"{label}: kl {ev.value(a, 'fid'):.1f} vs vq {ev.value(b, 'fid'):.1f} "
                         f"({_text(ev.fid_difference([(a, b)]), 1)})" for a, b, label in pairs)
    return Finding(title, _verdict(pooled, -1), f"mean kl - vq: {_text(pooled, 1)}", evidence)


def _random_geneval(ev: Evidence) -> Finding:
    title = "Random order gives better GenEval than raster order at the same size and token kind"
    pairs = [(a, b, label) for a, b, label in _axis_pairs(ev, 1, "random", "raster")
             if not math.isnan(ev.value(a, "geneval_overall")) and not math.isnan(ev.value(b, "geneval_overall"))]
    pooled = ev.geneval_difference([(a, b) for a, b, _ in pairs])
    evidence = "; ".join(f"{label}: random {ev.value(a, 'geneval_overall'):.3f} vs raster "
                         f"{ev.value(b, 'geneval_overall'):.3f} ({_text(ev.geneval_difference([(a, b)]))})"
                         for a, b, label in pairs)
    return Finding(title, _verdict(pooled, +1), f"mean random - raster: {_text(pooled)}",
                   evidence or "GenEval not measured")


def _fluid_best(ev: Evidence) -> Finding:
    title = "Random order + continuous tokens (Fluid) is the best variant on GenEval and keeps improving with size"
    fluid = sorted({v for (v, _), axes in ev.axes.items() if axes == ("kl", "random")})
    if not fluid:
        return Finding(title, "not measured", "no kl-random runs", "")
    variant = fluid[0]
    variants = sorted({v for v, _ in ev.cells})
    common = set.intersection(*(set(ev.sizes(v)) for v in variants))
    verdicts, intervals = [], []
    if common:
        largest = max(common, key=lambda s: ev.params((variant, s)))
        for other in variants:
            if other != variant:
                d = ev.geneval_difference([((variant, largest), (other, largest))])
                verdicts.append(_verdict(d, +1))
                intervals.append(f"{variant} - {other} at {largest}: {_text(d)}")
    sizes = ev.sizes(variant)
    if len(sizes) >= 2:
        d = ev.geneval_difference([((variant, sizes[-1]), (variant, sizes[0]))])
        verdicts.append(_verdict(d, +1))
        intervals.append(f"{variant} {sizes[-1]} - {sizes[0]}: {_text(d)}")
    verdicts = [v for v in verdicts if v != "not measured"]
    return Finding(title, combine_verdicts(verdicts), "; ".join(intervals) or "GenEval not measured",
                   "holds only if kl-random beats every other variant at the largest common size and its largest "
                   "rung beats its smallest")


def _gains(ev: Evidence) -> Finding:
    title = "Every variant's largest rung scores higher GenEval than its smallest"
    verdicts, intervals = [], []
    for variant in sorted({v for v, _ in ev.cells}):
        sizes = ev.sizes(variant)
        if len(sizes) < 2:
            continue
        d = ev.geneval_difference([((variant, sizes[-1]), (variant, sizes[0]))])
        if d is not None:
            verdicts.append(d.verdict(+1))
            se = (d.hi - d.lo) / (2 * 1.959964)
            intervals.append(f"{variant} {sizes[-1]} - {sizes[0]}: {_text(d)}, {d.estimate / se:.1f} SE"
                             if se > 0 else f"{variant}: {_text(d)}")
    return Finding(title, combine_verdicts(verdicts), "; ".join(intervals) or "GenEval not measured",
                   "paired bootstrap over the shared prompts; SE = the interval's half-width / 1.96")


def _loss_predicts_quality(ev: Evidence) -> Finding:
    title = ("Validation loss predicts quality across kl-random sizes: of two rungs, the one with the lower loss "
             "has the higher GenEval and the lower FID (paper: r = 0.917 with FID, -0.931 with GenEval)")
    variant = next((c[0] for c, axes in ev.axes.items() if axes == ("kl", "random")), None)
    if variant is None:
        return Finding(title, "not measured", "no kl-random runs", "")
    sizes = ev.sizes(variant)
    verdicts, intervals = [], []
    for i, small in enumerate(sizes):
        for large in sizes[i + 1:]:
            a, b = (variant, large), (variant, small)
            if ev.value(a, "val_loss") > ev.value(b, "val_loss"):
                a, b = b, a  # a: the lower loss
            g = ev.geneval_difference([(a, b)])
            f = ev.fid_difference([(a, b)])
            for interval, sign, name in ((g, +1, "GenEval"), (f, -1, "FID")):
                if interval is not None and math.isfinite(interval.lo):
                    verdicts.append(interval.verdict(sign))
                    intervals.append(f"{name} {a[1]} - {b[1]}: {_text(interval, 3 if name == 'GenEval' else 1)}")
    rows = ev.table[ev.table["variant"] == variant].reindex(columns=["val_loss", "fid", "geneval_overall"])
    r_fid, r_gen = pearson_r(rows["val_loss"], rows["fid"]), pearson_r(rows["val_loss"], rows["geneval_overall"])
    evidence = (f"r(loss, FID) = {r_fid:.3f}, r(loss, GenEval) = {r_gen:.3f} over {len(rows)} runs (shown, not "
                "judged: with 3 points any monotone trend gives |r| near 1)")
    return Finding(title, combine_verdicts(verdicts), "; ".join(intervals) or "not measured", evidence)


def held_out_rows(table: pd.DataFrame) -> list[list[Any]]:
    """Report rows: variant, sizes fitted, form, predicted [interval], measured, relative error, verdict."""
    rows = []
    for variant, check in sorted(held_out_checks(table).items()):
        form = "a N^-alpha + c" if check.offset else "a N^-alpha"
        sizes = len(set(table.loc[table["variant"] == variant, size_column(table)].dropna())) - 1
        rows.append([variant, sizes, form, f"{check.predicted.estimate:.4f} [{check.predicted.lo:.4f}, "
                     f"{check.predicted.hi:.4f}]", check.measured, f"{check.error:+.2%}", check.verdict()])
    return rows


TWO_STEP_METRICS = ("geneval_overall", "fid_standardised")  # the report's quality metrics with a bootstrap SE


def two_step_predictions(table: pd.DataFrame, n_boot: int = 1000) -> list[TwoStep]:
    """Per variant with a held-out loss check and each of TWO_STEP_METRICS measured: the largest rung's metric
    predicted from the smaller rungs, from its measured loss and in two steps from its predicted loss."""
    out = []
    x = size_column(table)
    for variant, check in sorted(held_out_checks(table, n_boot=n_boot).items()):
        rows = table[table["variant"] == variant]
        for metric in TWO_STEP_METRICS:
            if metric not in rows or rows[metric].isna().all():
                continue
            top = rows[rows[x] == check.n]
            se = top.get(f"{metric}_se")
            measured_se = float(se.mean() / math.sqrt(se.notna().sum())) if se is not None and se.notna().any() else 0.0
            pred = two_step_prediction(check, rows[x], rows["val_loss"], rows[metric], metric_se=measured_se,
                                       name=f"{variant} {metric}", n_boot=n_boot)
            if pred is not None:
                out.append(pred)
    return out


def two_step_rows(table: pd.DataFrame) -> list[list[Any]]:
    """Report rows: variant and metric, runs fitted, slope, from the measured loss, two steps, measured +- SE,
    error, verdict."""
    return [[p.metric, p.runs, p.slope, _interval(p.from_loss), _interval(p.two_step),
             f"{p.measured:.4g} +- {p.measured_se:.2g}", f"{p.error:+.3g}", p.verdict()]
            for p in two_step_predictions(table)]


def _interval(i: Interval) -> str:
    return f"{i.estimate:.4g} [{i.lo:.4g}, {i.hi:.4g}]"


__all__ = ["Finding", "Evidence", "judge", "fit_losses", "held_out_checks", "held_out_rows", "size_column",
           "two_step_predictions", "two_step_rows",
           "HOLDS", "FAILS", "OPEN"]
