"""The results table of a sweep and its scaling report.

`collect_runs(SWEEP)` reads every run folder (config.json, summary.json, eval/<metric>.json) into one row per
run; `write_table` stores it as runs.csv and runs.parquet; `write_report(SWEEP)` fits the power laws, draws the
plots (harness/plots.py) and writes report.md, which checks each of the paper's findings (Fan et al. 2024, arXiv
2410.13863: the four variants' loss power laws, FID by token kind, GenEval by order, Fluid best) on the
measured runs. Everything here reads files only, so a report can be rebuilt anywhere.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from eval.geneval_rules import TASKS
from eval.metrics import (GENEVAL_COLUMNS, GENEVAL_SE, METRICS, SAMPLING_COLUMNS,  # noqa: F401 - the report's
                          geneval_standard_error, table_row)                    # public names
from harness.atomic import atomic_path, write_text
from harness.errors import FluidbenchError
from harness.scaling import PowerLawFit, fit_power_law, pearson_r

# the run's identity and training numbers, then every metric's columns in registry order (eval/metrics.py)
RUN_COLUMNS = ["run", "variant", "size", "token_kind", "order", "params", "train_flops", "steps", "tokens_seen",
               "val_loss"]
COLUMNS = [*RUN_COLUMNS, *[c for m in METRICS.values() for c in m.columns], *SAMPLING_COLUMNS]
FLUID = {"token_kind": "kl", "order": "random"}  # Fluid (Fan et al. 2024) on the study's two axes
# The paper's numbers the findings are compared against: its loss-FID and loss-GenEval correlations across
# the Fluid sizes (Fan et al. 2024).
PAPER_R_LOSS_FID, PAPER_R_LOSS_GENEVAL = 0.917, -0.931


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


def is_fluid(table: pd.DataFrame) -> pd.Series:
    """Rows of Fluid, the paper's model: continuous tokens in random order (its values on the study's two axes)."""
    return (table[list(FLUID)] == pd.Series(FLUID)).all(axis=1)


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
    for key in ("train_flops", "steps", "tokens_seen", "val_loss"):
        row[key] = summary.get(key)
    row.update(table_row(run, _read_json))
    return {c: (np.nan if row.get(c) is None else row[c]) for c in COLUMNS}


def collect_runs(sweep_dir: str | Path) -> pd.DataFrame:
    """The results table: one row per run folder under SWEEP/runs/, sorted by variant and size."""
    runs_dir = Path(sweep_dir) / "runs"
    if not runs_dir.is_dir():
        raise FluidbenchError(f"{runs_dir}: no run folders (expected SWEEP/runs/<variant>-<size>/)")
    rows = [collect_run(run) for run in sorted(runs_dir.iterdir()) if (run / "config.json").is_file()]
    table = pd.DataFrame(rows, columns=COLUMNS)
    return table.sort_values(["variant", "params", "size"], ignore_index=True)


def write_table(table: pd.DataFrame, sweep_dir: str | Path, columns: list[str] | None = None) -> None:
    """runs.csv and runs.parquet, both atomic; `columns` drops metrics the sweep does not measure."""
    sweep_dir = Path(sweep_dir)
    table = table[[c for c in COLUMNS if c in table.columns and (columns is None or c in columns)]]
    with atomic_path(sweep_dir / "runs.csv") as tmp:
        table.to_csv(tmp, index=False)
    with atomic_path(sweep_dir / "runs.parquet") as tmp:
        table.to_parquet(tmp, index=False)


def read_table(sweep_dir: str | Path) -> pd.DataFrame:
    """runs.csv of a sweep folder, with every known column present (NaN where absent)."""
    path = Path(sweep_dir) / "runs.csv"
    if not path.is_file():
        raise FluidbenchError(f"{path}: results table not found (run the sweep, or `fluidbench report` on a "
                              "folder with runs/)")
    table = pd.read_csv(path)
    for column in ("variant", "size", "params"):
        if column not in table.columns:
            raise FluidbenchError(f"{path}: missing column '{column}'")
    for column in COLUMNS:
        if column not in table.columns:
            table[column] = np.nan
    return table


def read_ceilings(sweep_dir: str | Path) -> dict[str, dict]:
    """Each tokenizer's GenEval ceiling (true scenes through encode/decode), by token kind."""
    out = {}
    for path in sorted(Path(sweep_dir).glob("tokenizers/*/ceiling.json")):
        metrics = _read_json(path.parent / "metrics.json")  # our own tokenizers: PSNR, codebook use, oracle_exact
        out[path.parent.name] = {**{k: metrics[k] for k in ("psnr", "codebook_usage", "oracle_exact")
                                    if k in metrics}, **_read_json(path)}
    return out


def fit_losses(table: pd.DataFrame, offset: bool = False, n_boot: int = 1000) -> dict[str, PowerLawFit]:
    """A power law of validation loss in parameters for each variant with enough sizes (each its own fit)."""
    fits = {}
    for variant, rows in table.groupby("variant"):
        rows = rows.dropna(subset=["params", "val_loss"])
        try:
            fits[variant] = fit_power_law(rows["params"], rows["val_loss"], offset=offset, n_boot=n_boot)
        except ValueError:
            continue  # too few sizes: the report says so
    return fits


# ---------------------------------------------------------------------------------------------- findings
def _paired(table: pd.DataFrame, metric: str, axis: str, better: str, worse: str) -> list[tuple]:
    """(size, other axis value, better's metric, worse's metric) where both sides measured the metric."""
    other = "order" if axis == "token_kind" else "token_kind"
    pairs = []
    for (size, other_value), rows in table.groupby(["size", other]):
        a = rows.loc[rows[axis] == better, metric].dropna()
        b = rows.loc[rows[axis] == worse, metric].dropna()
        if len(a) and len(b):
            pairs.append((size, other_value, float(a.iloc[0]), float(b.iloc[0])))
    return pairs


def _verdict(wins: int, total: int) -> str:
    if total == 0:
        return "not measured"
    if wins == total:
        return "holds"
    return "partly" if wins > total / 2 else "does not hold"


def _noisy_verdict(wins: int, within: int, total: int) -> str:
    """The verdict of the point estimates, and how many differences lie within two standard errors."""
    if total and within == total:
        return "not resolved (every difference within 2 standard errors)"
    verdict = _verdict(wins, total)
    return f"{verdict} ({within} of {total} differences within 2 standard errors)" if within else verdict


def findings(table: pd.DataFrame, fits: dict[str, PowerLawFit]) -> list[tuple[str, str, str]]:
    """(finding, verdict, evidence) for each of the paper's findings, judged on the measured runs."""
    out = []
    judged = {v: f for v, f in fits.items() if f.n_points >= 3}  # two points fit any power law exactly
    ok = [v for v, f in judged.items() if f.r2 >= 0.9 and f.alpha_lo > 0]
    evidence = "; ".join(f"{v}: alpha {f.alpha:.3f} [{f.alpha_lo:.3f}, {f.alpha_hi:.3f}], R^2 {f.r2:.3f}, "
                         f"{f.n_points} sizes" for v, f in fits.items()) or "no variant has 2 sizes with a loss"
    out.append(("Validation loss of every variant follows a power law in model size (3+ sizes, R^2 >= 0.9 in "
                "log-log and the 95% interval of alpha above 0)",
                _verdict(len(ok), table["variant"].nunique()) if judged else "not measured", evidence))

    pairs = _paired(table, "fid", "token_kind", "kl", "vq")
    wins = sum(kl < vq for _, _, kl, vq in pairs)
    evidence = "; ".join(f"{order} {size}: kl {kl:.2f} vs vq {vq:.2f}" for size, order, kl, vq in pairs)
    out.append(("Continuous (kl) tokens give better FID than discrete (vq) at the same size and order",
                _verdict(wins, len(pairs)), evidence or "FID not measured"))

    pairs = _paired(table, "geneval_overall", "order", "random", "raster")
    noise = _paired(table, GENEVAL_SE, "order", "random", "raster") if GENEVAL_SE in table else []
    margins = {(size, kind): 2 * math.hypot(a, b) for size, kind, a, b in noise}  # 2 SE of the difference
    wins = sum(rnd > ras for _, _, rnd, ras in pairs)
    within = sum(abs(rnd - ras) <= margins[(size, kind)] for size, kind, rnd, ras in pairs if (size, kind) in margins)
    evidence = "; ".join(f"{kind} {size}: random {rnd:.3f} vs raster {ras:.3f}"
                         + (f" (difference {rnd - ras:+.3f} +- {margins[(size, kind)]:.3f})"
                            if (size, kind) in margins else "") for size, kind, rnd, ras in pairs)
    out.append(("Random order gives better GenEval than raster order at the same size and token kind",
                _noisy_verdict(wins, within, len(pairs)), evidence or "GenEval not measured"))

    out.append(_fluid_best(table))
    out.append(_correlations(table))
    return out


def _fluid_best(table: pd.DataFrame) -> tuple[str, str, str]:
    """kl-random ("Fluid") best at the largest size measured by all, and improving from smallest to largest."""
    title = "Random order + continuous tokens (Fluid) is the best variant and keeps improving with size"
    fluid = table[is_fluid(table)].sort_values("params")
    if fluid.empty:
        return title, "not measured", "no kl-random runs"
    checks, notes = [], []
    common = set.intersection(*(set(rows["size"]) for _, rows in table.groupby("variant")))
    largest = max(common, key=lambda s: table.loc[table["size"] == s, "params"].max()) if common else None
    for metric, sign in (("geneval_overall", 1), ("fid", -1)):
        at = table[table["size"] == largest].dropna(subset=[metric]) if largest else table.iloc[:0]
        if len(at) > 1:
            best = at.loc[(sign * at[metric]).idxmax()]
            fluid_at = is_fluid(at)
            checks.append(bool(fluid_at.any()) and (sign * at.loc[fluid_at, metric]).max() >= sign * best[metric])
            notes.append(f"best {metric} at {largest}: {best['variant']} ({best[metric]:.3f})")
        series = fluid[metric].dropna()
        if len(series) >= 2:
            checks.append(sign * (series.iloc[-1] - series.iloc[0]) > 0)
            notes.append(f"kl-random {metric} {series.iloc[0]:.3f} -> {series.iloc[-1]:.3f} from smallest to "
                         "largest")
    return title, _verdict(sum(checks), len(checks)), "; ".join(notes) or "FID and GenEval not measured"


def _correlations(table: pd.DataFrame) -> tuple[str, str, str]:
    """Validation loss against FID and GenEval across the kl-random sizes (paper: r = 0.917 and -0.931)."""
    title = (f"Validation loss predicts quality: r(loss, FID) > 0 and r(loss, GenEval) < 0 across kl-random sizes "
             f"(paper: {PAPER_R_LOSS_FID} and {PAPER_R_LOSS_GENEVAL})")
    fluid = table[is_fluid(table)]
    r_fid = pearson_r(fluid["val_loss"], fluid["fid"])
    r_gen = pearson_r(fluid["val_loss"], fluid["geneval_overall"])
    measured = [r for r in (r_fid, r_gen) if not math.isnan(r)]
    wins = int(r_fid > 0) + int(r_gen < 0)
    evidence = f"r(loss, FID) = {r_fid:.3f}, r(loss, GenEval) = {r_gen:.3f} over {len(fluid)} runs"
    return title, _verdict(wins, len(measured)) if measured else "not measured", evidence


# ------------------------------------------------------------------------------------------------ report
def _fmt(value: Any) -> str:
    if isinstance(value, (float, np.floating)):
        if math.isnan(value):
            return "-"
        if value != 0 and (abs(value) >= 1e5 or abs(value) < 1e-3):
            return f"{value:.3g}"
        return f"{value:.4g}"
    if isinstance(value, (int, np.integer)) and abs(int(value)) >= 1e5:
        return f"{float(value):.3g}"
    return str(value)


def markdown_table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def write_report(sweep_dir: str | Path, table: pd.DataFrame | None = None, offset: bool = False,
                 n_boot: int = 1000) -> Path:
    """Fits, plots and report.md for a sweep folder; reads SWEEP/runs.csv unless `table` is given."""
    from harness import plots

    sweep_dir = Path(sweep_dir)
    table = read_table(sweep_dir) if table is None else table.copy()
    shown = [c for c in table.columns if not table[c].isna().all()]
    for column in COLUMNS:  # a sweep may leave a metric out of its table (no CLIP score offline)
        if column not in table.columns:
            table[column] = np.nan
    if table.empty:
        raise FluidbenchError(f"{sweep_dir}: the results table has no runs")
    fits = fit_losses(table, offset=offset, n_boot=n_boot)
    ceilings = read_ceilings(sweep_dir)
    figures = plots.draw_all(table, fits, ceilings, sweep_dir)
    spec = _read_json(sweep_dir / "sweep.json")

    text = [f"# Scaling report: {spec.get('name', sweep_dir.name)}", ""]
    sizes = ", ".join(dict.fromkeys(table.sort_values("params")["size"]))
    text += [f"{len(table)} runs: variants {', '.join(sorted(table['variant'].unique()))}; sizes {sizes}.",
             "Written by `fluidbench report` from `runs.csv` (one row per run folder). Validation losses are "
             "each variant's own loss (cross-entropy in nats for vq, diffusion-loss MSE for kl) and are not "
             "comparable across token types.", ""]
    if spec.get("note"):
        text += [spec["note"], ""]
    text += ["## The paper's findings, checked on these runs", "",
             markdown_table(["finding", "verdict", "evidence"], [list(f) for f in findings(table, fits)]), ""]
    text += ["## Results", "", markdown_table(shown, table[shown].values.tolist()), ""]
    text += _fit_section(table, fits, offset, figures)
    text += _quality_section(table, ceilings, figures)
    text += _samples_section(table, sweep_dir)
    missing = [c for c in ("fid", "geneval_overall", "clip_score") if table[c].isna().all()]
    if missing:
        text += ["## Not measured", "", f"No values for {', '.join(missing)} in this sweep"
                 + (": CLIP score needs OpenAI CLIP weights, which the embedded sweep does not download."
                    if "clip_score" in missing else "."), ""]
    out = sweep_dir / "report.md"
    write_text(out, "\n".join(text))
    return out


def _fit_section(table: pd.DataFrame, fits: dict[str, PowerLawFit], offset: bool, figures: dict) -> list[str]:
    form = "L = a * N^(-alpha) + c" if offset else "L = a * N^(-alpha)"
    rows = [[v, f.alpha, f"[{f.alpha_lo:.3f}, {f.alpha_hi:.3f}]", f.a, f.c, f.r2, f.n_points]
            for v, f in sorted(fits.items())]
    unfitted = sorted(set(table["variant"]) - set(fits))
    text = ["## Validation loss against parameters", "",
            f"Fitted per variant: {form}, N = total parameters; 95% interval of alpha from a pairs bootstrap "
            "over the runs (rough with few sizes).", "",
            markdown_table(["variant", "alpha", "95% CI", "a", "c", "R^2 (log L)", "points"], rows), ""]
    if unfitted:
        text += [f"Not fitted (fewer than two sizes with a validation loss): {', '.join(unfitted)}.", ""]
    for key in ("loss_vs_params", "loss_vs_flops"):
        if key in figures:
            text += [f"![{key}]({figures[key]})", ""]
    return text


def _quality_section(table: pd.DataFrame, ceilings: dict[str, dict], figures: dict) -> list[str]:
    text = ["## FID and GenEval against parameters", ""]
    for key in ("fid_vs_params", "geneval_vs_params"):
        if key in figures:
            text += [f"![{key}]({figures[key]})", ""]
    header = ["model", *[c.removeprefix("geneval_") for c in GENEVAL_COLUMNS]]
    rows = [[f"{r['variant']} {r['size']}", *[r[c] for c in GENEVAL_COLUMNS]] for _, r in table.iterrows()]
    for kind, ceiling in sorted(ceilings.items()):
        rows.append([f"**{kind} tokenizer ceiling**", ceiling.get("overall", np.nan),
                     *[ceiling.get(task, np.nan) for task in TASKS]])
    text += ["GenEval by task. A tokenizer's ceiling is the score of true scenes for every prompt after its "
             "encode/decode round trip: no variant on those tokens can be expected to exceed it.", "",
             markdown_table(header, rows), ""]
    if ceilings:
        rows = [[kind, c.get("psnr", np.nan), c.get("codebook_usage", np.nan), c.get("oracle_exact", np.nan),
                 c.get("overall", np.nan), c.get("true_scenes_overall", np.nan)] for kind, c in sorted(ceilings.items())]
        text += ["The tokenizers (metrics.json of `fluidbench tokenizer train`, and the ceiling): val PSNR, codebook "
                 "use, the fraction of val scenes the oracle reads the same after the round trip, GenEval of the "
                 "reconstructed and of the true scenes.", "",
                 markdown_table(["tokenizer", "PSNR dB", "codebook use", "oracle exact", "GenEval ceiling",
                                 "GenEval true scenes"], rows), ""]
    return text


def _samples_section(table: pd.DataFrame, sweep_dir: Path) -> list[str]:
    grids = [(r["variant"], r["size"], Path("runs") / str(r["run"]) / "eval" / "samples.png")
             for _, r in table.iterrows()]
    grids = [g for g in grids if (sweep_dir / g[2]).is_file()]
    if not grids:
        return []
    prompts = _read_json(sweep_dir / grids[0][2].with_suffix(".json")).get("prompts", [])
    text = ["## Samples", ""]
    if prompts:
        text += ["One row per prompt, the same prompts and seeds for every model: "
                 + "; ".join(f"{i + 1}. {p}" for i, p in enumerate(prompts)), ""]
    sizes = list(dict.fromkeys(table.sort_values("params")["size"]))
    by_cell = {(v, s): path for v, s, path in grids}
    header = ["variant", *sizes]
    rows = [[v, *[f"![{v} {s}]({by_cell[(v, s)]})" if (v, s) in by_cell else "-" for s in sizes]]
            for v in sorted({v for v, _, _ in grids})]
    text += [markdown_table(header, rows), ""]
    return text
