"""The metric registry: one entry per metric, read by the sweep plan, the CLI and the results table.

An entry names the metric's function (which samples the run's EMA weights, scores, and writes
RUN/eval/<result>), its settings type (eval/settings.py: the function's keyword arguments, with their flags),
the table columns it fills and how, and the line the CLI prints. Adding a metric is one entry here plus its
function: the spec key `eval.<name>`, the sweep job `eval/<name>/<run>`, `fluidbench eval <name>` and the
runs.csv columns all follow from it. This module imports no torch, so `fluidbench --help` stays fast.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

from eval.geneval_rules import TASKS
from eval.settings import (CLIPScoreSettings, CMMDSettings, ContextSettings, FDDinoV2Settings, FIDSettings,
                           GenEvalSettings, SamplingSettings)


@dataclass(frozen=True)
class Metric:
    """One evaluation of a trained run."""

    name: str                                   # spec key eval.<name>, `fluidbench eval <name>`
    evaluate: Callable[..., dict]               # evaluate(run_dir, settings, sampling, **extra) -> result
    settings: type                              # its keyword arguments (eval/settings.py)
    result: str                                 # RUN/eval/<result>
    columns: tuple[str, ...]                    # the runs.csv columns it fills
    row: Callable[[dict], dict]                 # result -> {column: value or None}
    line: Callable[[dict], str]                 # the CLI's one-line summary of a result
    help: str                                   # the CLI command's help
    images: Callable[[Any], int]                # images it samples with these settings (the scale plan)
    times_sampling: bool = False                # its sampling pass gives the table's seconds per image
    after: tuple[str, ...] = ()                 # metrics of the same run it waits for (it reuses their samples)
    orders: tuple[str, ...] = ()                # a sweep measures it only for variants of these orders (() = all)

    def run(self, run_dir: str | Path, settings: Any, sampling: SamplingSettings, **extra: Any) -> dict:
        """Evaluate `run_dir` with typed settings; writes and returns RUN/eval/<result>."""
        return self.evaluate(run_dir, settings, sampling, **extra)


# ------------------------------------------------------------------------------------------------------ FID
# fid.json's metric panel (eval/panel.py): each sample-based metric with its bootstrap SE over the generated
# samples, and the floor (N real images of another split scored the same way) where it was measured.
PANEL_METRICS = ("fid", "fid_standardised", "kid", "precision", "recall", "density", "coverage")
PANEL_COLUMNS = (*[c for m in PANEL_METRICS for c in (m, f"{m}_se")], "fid_floor", "fid_standardised_floor",
                 "kid_floor")


def _panel(result: str, extractor: str | None = None) -> Callable[..., dict]:
    """eval_fid with the settings' fields, writing RUN/eval/<result>."""
    def evaluate(run_dir, settings: FIDSettings, sampling: SamplingSettings, **extra) -> dict:
        from eval.run_eval import eval_fid

        return eval_fid(run_dir, settings=sampling, result_file=result, **asdict(settings), **extra)

    return evaluate


def _panel_row(r: dict) -> dict:
    floor = r.get("floor") or {}
    return {c: floor.get(c.removesuffix("_floor")) if c.endswith("_floor") else r.get(c) for c in PANEL_COLUMNS}


def _se(r: dict, metric: str) -> str:
    return f" +- {r[metric + '_se']:.4g}" if metric + "_se" in r else ""


FID = Metric(
    "fid", _panel("fid.json"), FIDSettings, "fid.json", PANEL_COLUMNS, _panel_row,
    lambda r: f"fid={r['fid']:.3f}{_se(r, 'fid')}" + (f" kid={r['kid']:.4g}{_se(r, 'kid')}" if "kid" in r else "")
    + f" (n={r['n_images']}, {r['protocol']['extractor']})",
    "FID and the metric panel (KID, precision / recall, density / coverage, each with a bootstrap SE) of a run's "
    "samples against real images; writes RUN/eval/fid.json.",
    lambda s: s.images(), times_sampling=True)

FD_DINOV2 = Metric(
    "fd_dinov2", _panel("fd_dinov2.json"), FDDinoV2Settings, "fd_dinov2.json", ("fd_dinov2", "fd_dinov2_se"),
    lambda r: {"fd_dinov2": r.get("fid"), "fd_dinov2_se": r.get("fid_se")},
    lambda r: f"fd_dinov2={r['fid']:.3f}{_se(r, 'fid')} (n={r['n_images']}, {r['protocol']['extractor']})",
    "FD-DINOv2: the Frechet distance on torch-fidelity's DINOv2 features, with its bootstrap SE; writes "
    "RUN/eval/fd_dinov2.json.", lambda s: s.images(), after=("fid",))  # FID's samples, not made twice at once

CMMD = Metric(
    "cmmd", _panel("cmmd.json"), CMMDSettings, "cmmd.json", ("cmmd", "cmmd_se"),
    lambda r: {"cmmd": r.get("cmmd"), "cmmd_se": r.get("cmmd_se")},
    lambda r: f"cmmd={r['cmmd']:.4f}{_se(r, 'cmmd')} (n={r['n_images']}, {r['protocol']['extractor']})",
    "CMMD: the RBF-kernel MMD on CLIP image embeddings (Jayasumana et al. 2024), with its bootstrap SE; writes "
    "RUN/eval/cmmd.json.", lambda s: s.images(), after=("fid",))


# -------------------------------------------------------------------------------------------------- GenEval
GENEVAL_COLUMNS = ("geneval_overall", *[f"geneval_{task}" for task in TASKS])
GENEVAL_SE = "geneval_overall_se"  # its standard error over the images scored (the findings' noise level)


def geneval_standard_error(counts: dict[str, list[int]]) -> float | None:
    """Standard error of GenEval's overall score (the mean of the task accuracies) from {task: [correct,
    images]}: each accuracy a binomial proportion, the tasks independent. None without counts."""
    tasks = [(c, n) for c, n in counts.values() if n > 0]
    if not tasks:
        return None
    return math.sqrt(sum((c / n) * (1 - c / n) / n for c, n in tasks)) / len(tasks)


def _geneval(run_dir, settings: GenEvalSettings, sampling: SamplingSettings, **extra) -> dict:
    from eval.run_eval import eval_geneval

    return eval_geneval(run_dir, settings=sampling, **asdict(settings), **extra)


def _geneval_row(r: dict) -> dict:
    return {"geneval_overall": r.get("overall"), **{f"geneval_{task}": r.get(task) for task in TASKS},
            GENEVAL_SE: geneval_standard_error(r.get("counts") or {})}


def _geneval_line(r: dict) -> str:
    tasks = " ".join(f"{t}={r[t]:.3f}" for t in TASKS if t in r)
    return f"geneval overall={r['overall']:.4f} {tasks} ({r['sampling_stats']['seconds_per_image']:.3f} s/img)"


GENEVAL = Metric(
    "geneval", _geneval, GenEvalSettings, "geneval.json", (*GENEVAL_COLUMNS, GENEVAL_SE), _geneval_row,
    _geneval_line, "GenEval of a run: generate in the official folder layout, score, write RUN/eval/geneval.json.",
    lambda s: 553 * s.per_prompt, times_sampling=True)  # the official prompt count


# ---------------------------------------------------------------------------------------------- CLIP score
def _clipscore(run_dir, settings: CLIPScoreSettings, sampling: SamplingSettings, **extra) -> dict:
    from eval.run_eval import eval_clipscore

    return eval_clipscore(run_dir, settings=sampling, **asdict(settings), **extra)


CLIPSCORE = Metric(
    "clipscore", _clipscore, CLIPScoreSettings, "clipscore.json", ("clip_score",),
    lambda r: {"clip_score": r.get("clip_score", r.get("score"))},
    lambda r: f"clip_score={r['clip_score']:.3f} (n={r['n_images']})",
    "CLIP score of a run's samples against their captions; writes RUN/eval/clipscore.json.",
    lambda s: s.n)


# ------------------------------------------------------------------------------------------------- context
def _context(run_dir, settings: ContextSettings, sampling: SamplingSettings, **extra) -> dict:
    from eval.context import eval_context

    return eval_context(run_dir, **asdict(settings), **extra)  # no sampling: `sampling` is not used


CONTEXT_COLUMNS = ("loss_no_context", "loss_full_context", "context_gain")

CONTEXT = Metric(
    "context", _context, ContextSettings, "context.json", CONTEXT_COLUMNS,
    lambda r: {c: r.get(c) for c in CONTEXT_COLUMNS},
    lambda r: "context " + " ".join(f"{k}:{v:.4f}" for k, v in zip(r["known"], r["loss"]))
    + (f" gain={r['context_gain']:.3f}" if r.get("context_gain") is not None else ""),
    "The loss on validation tokens against how many image tokens are known (raster: the position; random: "
    "tokens known at random positions): whether a model uses its context; writes RUN/eval/context.json.",
    lambda s: 0, orders=("random",))  # raster's curve is by position, each with its own difficulty: CLI only


METRICS: dict[str, Metric] = {m.name: m for m in (FID, FD_DINOV2, CMMD, GENEVAL, CLIPSCORE, CONTEXT)}
SAMPLING_COLUMNS = ("seconds_per_image", "forward_passes_per_image")


def table_row(run_dir: str | Path, read: Callable[[Path], dict]) -> dict:
    """The metric columns of one run's table row from RUN/eval/<result> files (`read` returns {} if absent):
    each metric's values, and the sampling cost from the first timing metric that has one."""
    row: dict[str, Any] = {}
    results = {name: read(Path(run_dir) / "eval" / m.result) for name, m in METRICS.items()}
    for name, metric in METRICS.items():
        row.update(metric.row(results[name]))
    for name, metric in METRICS.items():
        if not metric.times_sampling:
            continue
        stats = {**results[name], **(results[name].get("sampling_stats") or {})}
        if stats.get("seconds_per_image") is not None:
            row["seconds_per_image"] = stats["seconds_per_image"]
            row["forward_passes_per_image"] = stats.get("forward_passes_per_image")  # x2 with guidance
            break
    return row


def unmeasured_columns(measured: list[str]) -> list[str]:
    """The table columns of metrics left out of a sweep that measures only `measured` (dropped from runs.csv)."""
    dropped = [c for name, m in METRICS.items() if name not in measured for c in m.columns]
    if not any(METRICS[name].times_sampling for name in measured):
        dropped += SAMPLING_COLUMNS
    return dropped
