"""The results table of a sweep: one row per run folder (config.json, summary.json, and RUN/eval/<result>
of every metric in eval/metrics.py), stored as runs.csv and runs.parquet; and the tokenizers' GenEval
ceilings. Reads files only."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from eval.metrics import METRICS, SAMPLING_COLUMNS, table_row
from harness.atomic import atomic_path
from harness.errors import FluidbenchError

# the run's identity and training numbers, then every metric's columns in registry order (eval/metrics.py)
RUN_COLUMNS = ["run", "variant", "size", "seed", "token_kind", "order", "params", "params_nonembed", "budget",
               "train_flops", "steps", "tokens_seen", "val_loss"]
COLUMNS = [*RUN_COLUMNS, *[c for m in METRICS.values() for c in m.columns], *SAMPLING_COLUMNS]


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def _study_axes(variant: str) -> tuple[str, str]:
    """(token kind, order) of a variant from the registry's parts: the two axes of the study."""
    from variants.registry import VARIANTS

    order_cls, head_cls = VARIANTS[variant]
    return head_cls.token_kind, order_cls.kind


def collect_run(run: Path) -> dict[str, Any]:
    """One table row from a run folder; metrics not measured yet are NaN."""
    config, summary = _read_json(run / "config.json"), _read_json(run / "summary.json")
    model = config.get("model", {})
    variant, size = model.get("variant"), model.get("size")
    if not variant or not size:  # a folder named <variant>-<size> by the sweep
        variant, _, size = run.name.rpartition("-")
    token_kind, order = _study_axes(variant)
    row: dict[str, Any] = {"run": run.name, "variant": variant, "size": size, "token_kind": token_kind,
                           "order": order}
    params = summary.get("params")
    row["params"] = params.get("total") if isinstance(params, dict) else params
    counts = summary.get("param_counts") or {}
    if "total" in counts and "embeddings" in counts:  # what the laws are fitted on (Kaplan et al. 2020)
        row["params_nonembed"] = counts["total"] - counts["embeddings"]
    row["seed"] = config.get("train", {}).get("seed")
    for key in ("train_flops", "steps", "tokens_seen", "val_loss"):
        row[key] = summary.get(key)
    row["budget"] = _read_json(run / "isoflop.json").get("budget")  # a cell of an IsoFLOP design (isoflop.py)
    row.update(table_row(run, _read_json))
    return {c: (np.nan if row.get(c) is None else row[c]) for c in COLUMNS}


def collect_runs(sweep_dir: str | Path) -> pd.DataFrame:
    """The results table: one row per run folder under SWEEP/runs/, sorted by variant and size."""
    runs_dir = Path(sweep_dir) / "runs"
    if not runs_dir.is_dir():
        raise FluidbenchError(f"{runs_dir}: no run folders (expected SWEEP/runs/<variant>-<size>/)")
    rows = [collect_run(run) for run in sorted(runs_dir.iterdir()) if (run / "config.json").is_file()]
    table = pd.DataFrame(rows, columns=COLUMNS)
    return table.sort_values(["variant", "params", "size", "seed"], ignore_index=True)


# measured on the clock, so never equal between two sweeps: kept out of runs.csv (which two sweeps from clean
# results reproduce byte for byte) in timings.csv beside it; read_table joins them back
TIMING_COLUMNS = ("seconds_per_image",)


def write_table(table: pd.DataFrame, sweep_dir: str | Path, columns: list[str] | None = None) -> None:
    """runs.csv and runs.parquet (what the runs measured), timings.csv (wall-clock columns), all atomic;
    `columns` drops metrics the sweep does not measure."""
    sweep_dir = Path(sweep_dir)
    table = table[[c for c in COLUMNS if c in table.columns and (columns is None or c in columns)]]
    timings = [c for c in TIMING_COLUMNS if c in table.columns]
    measured = table.drop(columns=timings)
    with atomic_path(sweep_dir / "runs.csv") as tmp:
        measured.to_csv(tmp, index=False)
    with atomic_path(sweep_dir / "runs.parquet") as tmp:
        measured.to_parquet(tmp, index=False)
    with atomic_path(sweep_dir / "timings.csv") as tmp:
        table[["run", *timings]].to_csv(tmp, index=False)


def read_table(sweep_dir: str | Path) -> pd.DataFrame:
    """runs.csv of a sweep folder joined with its timings.csv, with every known column present (NaN where
    absent)."""
    path = Path(sweep_dir) / "runs.csv"
    if not path.is_file():
        raise FluidbenchError(f"{path}: results table not found (run the sweep, or `fluidbench report` on a "
                              "folder with runs/)")
    table = pd.read_csv(path)
    for column in ("variant", "size", "params"):
        if column not in table.columns:
            raise FluidbenchError(f"{path}: missing column '{column}'")
    timings = path.with_name("timings.csv")
    if timings.is_file() and "run" in table.columns:
        extra = pd.read_csv(timings)
        extra = extra[[c for c in extra.columns if c == "run" or c not in table.columns]]
        if "run" in extra.columns and len(extra.columns) > 1:
            table = table.merge(extra, on="run", how="left")
    for column in COLUMNS:
        if column not in table.columns:
            table[column] = np.nan
    return table


def read_ceilings(sweep_dir: str | Path) -> dict[str, dict]:
    """Each tokenizer's GenEval ceiling (true scenes through encode/decode), by token kind."""
    out = {}
    for path in sorted(Path(sweep_dir).glob("tokenizers/*/ceiling.json")):
        metrics = _read_json(path.parent / "metrics.json")  # ours: PSNR, blank PSNR, codebook use, oracle_exact
        out[path.parent.name] = {**{k: metrics[k] for k in ("psnr", "blank_psnr", "codebook_usage", "oracle_exact")
                                    if k in metrics}, **_read_json(path)}
    return out
