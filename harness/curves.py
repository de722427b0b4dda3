"""Validation loss against training compute across (size, step): each run's curve and the compute envelope.

With validation every K steps (`train.val_every`), every run contributes a curve of loss against the FLOPs spent
so far; the envelope is, per variant, the lowest loss reached at each compute over all sizes (the frontier of
Kaplan et al. 2020, Fig. 2, and Hoffmann et al. 2022's approach 1). Which size lies on it at a budget says
whether the ladder's larger rungs are starved of steps. Reads RUN/metrics.jsonl, summary.json, config.json.
"""
from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

CURVE_COLUMNS = ["run", "variant", "size", "step", "flops", "val_loss"]


def _read(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def training_curves(sweep_dir: str | Path, table: pd.DataFrame) -> pd.DataFrame:
    """One row per validation of every run in `table`: its step, the training FLOPs up to it, the loss."""
    rows = []
    for _, r in table.iterrows():
        run = Path(sweep_dir) / "runs" / str(r["run"])
        summary, config = _read(run / "summary.json"), _read(run / "config.json")
        per_image = summary.get("train_flops_per_image")
        batch = config.get("train", {}).get("batch_size")
        if not per_image or not batch or not (run / "metrics.jsonl").is_file():
            continue
        for line in (run / "metrics.jsonl").read_text().splitlines():
            row = json.loads(line) if line.strip() else {}
            if row.get("val_loss") is not None and row.get("step", 0) > 0:
                rows.append({"run": r["run"], "variant": r["variant"], "size": r["size"], "step": row["step"],
                             "flops": row["step"] * batch * per_image, "val_loss": row["val_loss"]})
    return pd.DataFrame(rows, columns=CURVE_COLUMNS)


def envelope(curves: pd.DataFrame) -> pd.DataFrame:
    """Per variant, the points no other point beats with fewer or equal FLOPs (lower loss): the frontier."""
    out = []
    for _, rows in curves.groupby("variant"):
        best = float("inf")
        for _, row in rows.sort_values(["flops", "val_loss"]).iterrows():
            if row["val_loss"] < best:
                best = row["val_loss"]
                out.append(row)
    return pd.DataFrame(out, columns=curves.columns).reset_index(drop=True)
