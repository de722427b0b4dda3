"""The scaling report of a sweep, drawn from its results table (harness/results.py; its names are importable
here too): `write_report(SWEEP)` fits the power laws, draws the plots (harness/plots.py) and writes report.md,
which checks each of the paper's findings (harness/findings.py; Fan et al. 2024, arXiv 2410.13863) on the
measured runs. Everything here reads files only, so a report can be rebuilt anywhere.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from eval.geneval_rules import TASKS
from eval.metrics import (GENEVAL_COLUMNS, GENEVAL_SE, SAMPLING_COLUMNS,  # noqa: F401 - the report's public
                          geneval_standard_error)                            # names
from harness.atomic import write_text
from harness.errors import FluidbenchError
from harness.results import (COLUMNS, RUN_COLUMNS, _read_json, collect_run, collect_runs,  # noqa: F401
                             read_ceilings, read_table, write_table)
from harness.scaling import PowerLawFit
from harness.tables import markdown_table


def fit_losses(table: pd.DataFrame, offset: bool = False, n_boot: int = 1000) -> dict[str, PowerLawFit]:
    """A power law of validation loss in non-embedding parameters for each variant with enough sizes (each its
    own fit), with the offset c when it has >= 4 sizes or `offset` asks for it (harness/findings.py)."""
    from harness.findings import fit_losses as fit

    return fit(table, n_boot=n_boot, offset=True if offset else None)


def findings(table: pd.DataFrame, fits: dict[str, PowerLawFit], sweep_dir: str | Path | None = None,
             n_boot: int = 2000) -> list:
    """Each of the paper's findings judged on the runs: harness.findings.Finding (title, verdict, interval,
    evidence); GenEval differences are paired over prompts when the run folders (`sweep_dir`) hold the results."""
    from harness.findings import judge

    return judge(table, sweep_dir, n_boot=n_boot, fits=fits)


# ------------------------------------------------------------------------------------------------ report
def write_report(sweep_dir: str | Path, table: pd.DataFrame | None = None, offset: bool = False,
                 n_boot: int = 1000, intermediate: bool = False, fit_boot: int = 200) -> Path:
    """Fits, plots and report.md for a sweep folder; reads SWEEP/runs.csv unless `table` is given.

    With IsoFLOP cells (a `budget` column), the compute-optimal section (harness/isoflop_report.py) uses every
    run, with `fit_boot` bootstrap refits; the fixed-length sections use the runs of the largest budget.
    """
    from harness import isoflop_report, plots

    sweep_dir = Path(sweep_dir)
    table = read_table(sweep_dir) if table is None else table.copy()
    shown = [c for c in table.columns if not table[c].isna().all()]
    for column in COLUMNS:  # a sweep may leave a metric out of its table (no CLIP score offline)
        if column not in table.columns:
            table[column] = np.nan
    if table.empty:
        raise FluidbenchError(f"{sweep_dir}: the results table has no runs")
    from harness.curves import envelope, training_curves
    from harness.findings import size_column

    everything = table
    if table["budget"].notna().any():  # one run per (variant, size) for the sections written for that
        table = table[table["budget"] == table["budget"].max()].reset_index(drop=True)
    fits = fit_losses(table, offset=offset, n_boot=n_boot)
    ceilings = read_ceilings(sweep_dir)
    curves = training_curves(sweep_dir, everything)  # every run's curve, every budget's
    frontier = envelope(curves)
    figures = plots.draw_all(table, fits, ceilings, sweep_dir, x=size_column(table), curves=curves,
                             frontier=frontier)
    spec = _read_json(sweep_dir / "sweep.json")

    text = [f"# Scaling report: {spec.get('name', sweep_dir.name)}", ""]
    sizes = ", ".join(dict.fromkeys(table.sort_values("params")["size"]))
    text += [f"{len(table)} runs: variants {', '.join(sorted(table['variant'].unique()))}; sizes {sizes}.",
             "Written by `fluidbench report` from `runs.csv` (one row per run folder). Validation losses are "
             "each variant's own loss (cross-entropy in nats for vq, diffusion-loss MSE for kl) and are not "
             "comparable across token types.", ""]
    if spec.get("note"):
        text += [spec["note"], ""]
    if everything is not table:
        text += [f"An IsoFLOP design of {len(everything)} runs: the findings, the results table's fit and the plots "
                 f"of loss against size use the {len(table)} runs of the largest budget, C = "
                 f"{table['budget'].max():.3g} FLOPs (each size trained for C / its FLOPs per step); the "
                 "compute-optimal section uses every run.", ""]
    judged = findings(table, fits, sweep_dir, n_boot=max(n_boot, 1000))
    text += ["## The paper's findings, checked on these runs", "",
             "Each verdict comes from the 95% interval beside it: holds when the whole interval lies on the "
             "claimed side, does not hold when it lies on the other side, not resolved when it covers zero. "
             "GenEval differences: a paired bootstrap over the prompts every run shares (resampled within each "
             "task); FID differences: the evaluations' bootstrap standard errors where recorded; both widened by "
             "the spread between training seeds where a size was trained with several (harness/stats.py).", "",
             markdown_table(["finding", "verdict", "95% interval", "evidence"],
                            [[f.title, f.verdict, f.interval, f.evidence] for f in judged]), ""]
    text += ["## Results", "", markdown_table(shown, everything[shown].values.tolist()), ""]
    text += _fit_section(table, fits, offset, figures)
    text += _envelope_section(frontier, figures)
    if everything["budget"].notna().any() or intermediate:
        analyses = isoflop_report.analyse(everything, sweep_dir, intermediate=intermediate, n_boot=fit_boot)
        points = isoflop_report.run_points(everything, sweep_dir, intermediate)
        text += isoflop_report.section(analyses, isoflop_report.draw(analyses, points, sweep_dir), intermediate)
    text += _quality_section(table, ceilings, figures)
    text += _latents_section(table, sweep_dir)
    text += _paint_section(table, sweep_dir)
    text += _context_section(table, sweep_dir)
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
    from harness.findings import held_out_rows, size_column, two_step_rows

    n = "non-embedding parameters" if size_column(table) == "params_nonembed" else "total parameters"
    form = "L = a * N^(-alpha) + c" if offset else "L = a * N^(-alpha), + c with 4 or more sizes"
    rows = [[v, f.alpha, f"[{f.alpha_lo:.3f}, {f.alpha_hi:.3f}]", f.a, f.c, f.r2, f.n_points]
            for v, f in sorted(fits.items())]
    unfitted = sorted(set(table["variant"]) - set(fits))
    text = ["## Validation loss against parameters", "",
            f"Fitted per variant: {form}, N = {n}; 95% interval of alpha from a pairs bootstrap "
            "over the runs (rough with few sizes).", "",
            markdown_table(["variant", "alpha", "95% CI", "a", "c", "R^2 (log L)", "points"], rows), ""]
    if unfitted:
        text += [f"Not fitted (fewer than two sizes with a validation loss): {', '.join(unfitted)}.", ""]
    held = held_out_rows(table)
    if held:
        text += ["Held-out check: the law fitted on every size but the largest predicts the largest's loss "
                 "(interval: pairs bootstrap over the fitted runs, widened by the seed spread where measured).", "",
                 markdown_table(["variant", "sizes fitted", "form", "predicted [95%]", "measured", "error",
                                 "verdict"], held), ""]
    two = two_step_rows(table)
    if two:
        text += ["Loss to quality in two steps (the OLMo ladder's method): a line metric = a + b * loss fitted on "
                 "the smaller rungs' runs predicts the largest rung's metric, from its measured loss (step 2 "
                 "alone) and from the loss the power law above predicted (steps 1 + 2, that prediction's interval "
                 "carried through). Holds when the measured value lies inside the two-step interval widened by "
                 "its own SE.", "",
                 markdown_table(["variant metric", "runs fitted", "slope", "from measured loss [95%]",
                                 "two steps [95%]", "measured +- SE", "error (two steps)", "verdict"], two), ""]
    for key in ("loss_vs_params", "loss_vs_flops"):
        if key in figures:
            text += [f"![{key}]({figures[key]})", ""]
    return text


def _envelope_section(frontier: pd.DataFrame, figures: dict) -> list[str]:
    if "loss_envelope" not in figures:
        return []
    rows = []
    for variant, points in frontier.groupby("variant"):
        sizes = list(dict.fromkeys(points.sort_values("flops")["size"]))
        rows.append([variant, " -> ".join(sizes), points["flops"].min(), points["flops"].max()])
    return ["## Validation loss against training compute", "",
            "Every validation of every run (`train.val_every`), against the training FLOPs spent so far; the dashed "
            "line is each variant's envelope, the lowest loss reached at each compute over all sizes. Sizes on the "
            "envelope, from small to large compute (a size missing from it never was the best use of its FLOPs):",
            "", markdown_table(["variant", "sizes on the envelope", "from FLOPs", "to FLOPs"], rows), "",
            f"![loss_envelope]({figures['loss_envelope']})", ""]


def _quality_section(table: pd.DataFrame, ceilings: dict[str, dict], figures: dict) -> list[str]:
    text = ["## FID and GenEval against parameters", ""]
    floor = table[["fid_floor", "kid_floor"]].dropna() if "fid_floor" in table else table.iloc[:0]
    if len(floor):
        text += [f"Real images scored against the same reference at the same N (the floor a perfect model would "
                 f"reach): FID {floor['fid_floor'].iloc[0]:.4g}, KID {floor['kid_floor'].iloc[0]:.4g}. Error bars "
                 "are 2 bootstrap standard errors over the generated samples (the reference fixed).", ""]
    for key in ("fid_vs_params", "kid_vs_params", "geneval_vs_params"):
        if key in figures:
            text += [f"![{key}]({figures[key]})", ""]
    header = ["model", *[c.removeprefix("geneval_") for c in GENEVAL_COLUMNS]]
    rows = [[_run_label(r), *[r[c] for c in GENEVAL_COLUMNS]] for _, r in table.iterrows()]
    for kind, ceiling in sorted(ceilings.items()):
        rows.append([f"**{kind} tokenizer ceiling**", ceiling.get("overall", np.nan),
                     *[ceiling.get(task, np.nan) for task in TASKS]])
    text += ["GenEval by task. A tokenizer's ceiling is the score of true scenes for every prompt after its "
             "encode/decode round trip: no variant on those tokens can be expected to exceed it.", "",
             markdown_table(header, rows), ""]
    if ceilings:
        rows = [[kind, c.get("psnr", np.nan), c.get("blank_psnr", np.nan), c.get("codebook_usage", np.nan),
                 c.get("oracle_exact", np.nan), c.get("overall", np.nan), c.get("true_scenes_overall", np.nan)]
                for kind, c in sorted(ceilings.items())]
        text += ["The tokenizers (metrics.json of `fluidbench tokenizer train`, and the ceiling): val PSNR, the PSNR "
                 "of a blank image's round trip (low: an object-less sample decodes as texture), codebook use, the "
                 "fraction of val scenes the oracle reads the same after the round trip, GenEval of the "
                 "reconstructed and of the true scenes.", "",
                 markdown_table(["tokenizer", "PSNR dB", "blank PSNR dB", "codebook use", "oracle exact",
                                 "GenEval ceiling", "GenEval true scenes"], rows), ""]
    return text


LATENT_STD_TOLERANCE = 0.25  # sampled latent std within 25% of the data's: the sampler stays in distribution
PAINT_TOLERANCE = 0.25  # vq: non-background tokens per sampled image within 25% of the data's


def _run_label(r: pd.Series) -> str:
    """'variant size', and ' seed N' for a further seed's run (seed 0 is the plain run)."""
    seed = f" seed {int(r['seed'])}" if "seed" in r and pd.notna(r["seed"]) and r["seed"] else ""
    return f"{r['variant']} {r['size']}{seed}"


def _latents_section(table: pd.DataFrame, sweep_dir: Path) -> list[str]:
    """kl runs: the moments of the latents sampled for FID beside the data's (eval/fid.json, `latents`)."""
    rows = []
    for _, r in table.iterrows():
        latents = _read_json(sweep_dir / "runs" / str(r["run"]) / "eval" / "fid.json").get("latents")
        if not latents or not latents.get("sampled") or not latents.get("data"):
            continue
        sampled, data, ratio = latents["sampled"], latents["data"], latents.get("std_ratio")
        ok = ratio is not None and abs(ratio - 1) <= LATENT_STD_TOLERANCE
        rows.append([_run_label(r), sampled["std"], data["std"], ratio, sampled["mean_abs"],
                     data["mean_abs"], sampled["max_abs"], data["max_abs"], "yes" if ok else "**no**"])
    if not rows:
        return []
    return ["## kl sampler: sampled latents against the data's", "",
            "Every value of the latents sampled for FID against the data's latents (posterior draws of the same "
            "captions' real images, normalised as training sees them). In distribution: sampled std within "
            f"{LATENT_STD_TOLERANCE:.0%} of the data's.", "",
            markdown_table(["run", "sampled std", "data std", "ratio", "sampled mean abs", "data mean abs",
                            "sampled max abs", "data max abs", "in distribution"], rows), ""]


def _paint_section(table: pd.DataFrame, sweep_dir: Path) -> list[str]:
    """vq runs on a plain background: non-background tokens per image sampled for FID beside the data's
    (eval/fid.json, `paint`)."""
    rows = []
    for _, r in table.iterrows():
        paint = _read_json(sweep_dir / "runs" / str(r["run"]) / "eval" / "fid.json").get("paint")
        if not paint:
            continue
        ratio = paint.get("ratio")
        ok = ratio is not None and abs(ratio - 1) <= PAINT_TOLERANCE
        rows.append([_run_label(r), paint["sampled_per_image"], paint["data_per_image"], ratio,
                     "yes" if ok else ("**more**" if ratio is not None and ratio > 1 else "**less**")])
    if not rows:
        return []
    return ["## vq sampler: paint against the data's", "",
            "Tokens per image that are not the background code (the commonest code of the real images, a plain "
            "background being one code), in the images sampled for FID against the same real images encoded. A "
            "model that paints twice what the data holds can score GenEval by chance hits among its blobs "
            "(docs/recipe.md, section 9b); one that paints too little leaves objects out. As much as the data: "
            f"within {PAINT_TOLERANCE:.0%}.", "",
            markdown_table(["run", "sampled per image", "data per image", "ratio", "as much as the data"], rows), ""]


def _context_section(table: pd.DataFrame, sweep_dir: Path) -> list[str]:
    """Random-order runs: the loss against the image tokens known (eval/context.json), beside the raster run of
    the same token kind and size, whose validation loss averages over positions that know only a prefix."""
    rows, known, curves = [], None, []
    for _, r in table.iterrows():
        ctx = _read_json(sweep_dir / "runs" / str(r["run"]) / "eval" / "context.json")
        if not ctx.get("loss"):
            continue
        known = known or ctx["known"]
        if ctx["known"] != known:
            continue  # another grid of counts (a hand-run evaluation): not in this table's columns
        raster = table[(table["token_kind"] == r["token_kind"]) & (table["order"] == "raster")
                       & (table["size"] == r["size"]) & (table["seed"].fillna(0) == 0)]
        reference = float(raster["val_loss"].iloc[0]) if len(raster) and pd.notna(raster["val_loss"].iloc[0]) else None
        verdict = "-" if reference is None else ("yes" if ctx["loss"][-1] <= reference else "**no**")
        rows.append([_run_label(r), *ctx["loss"], ctx.get("context_gain"), reference, verdict])
        curves.append({"label": _run_label(r), "token_kind": r["token_kind"], "size": r["size"], "known": known,
                       "loss": ctx["loss"], "reference": reference})
    if not rows:
        return []
    from harness import plots

    figure = plots.context_curves(curves, sweep_dir / "context.png")
    return ["## Random order: loss against the tokens known", "",
            "Each random-order run's loss on the unknown tokens when k of the image's tokens, at random positions, "
            "are known (eval/context.py; the variant's own loss, the validation images and seeds of the run). A "
            "model that learned how a scene's tokens depend on each other predicts far better with its "
            "neighbours known; one that learned only which colours a caption brings barely improves. "
            "With all but one of the tokens known, a random-order model knows more than the raster model of the "
            "same size does at any position, so its loss there should be at most the raster run's validation "
            "loss (the last column; the same loss on the same tokens). MAR's mask ratios (at least 70% masked) "
            "train with at most 30% of the tokens known, so the right of the curve is outside that training; a "
            "model trained on every ratio (mask_ratio: cosine) shows whether the flatness is the ratios' or the "
            "model's.", "",
            markdown_table(["run", *[f"k = {k}" for k in known], "gain (1 - last / first)",
                            "raster val loss", "at most raster's"], rows), ""] + (
                [f"![context]({figure})", ""] if figure else [])


def _samples_section(table: pd.DataFrame, sweep_dir: Path) -> list[str]:
    first = table.sort_values("seed", kind="stable") if "seed" in table else table  # seed 0's grid for a cell
    grids = [(r["variant"], r["size"], Path("runs") / str(r["run"]) / "eval" / "samples.png")
             for _, r in first.iterrows()]
    grids = [g for g in grids if (sweep_dir / g[2]).is_file()]
    if not grids:
        return []
    prompts = _read_json(sweep_dir / grids[0][2].with_suffix(".json")).get("prompts", [])
    text = ["## Samples", ""]
    if prompts:
        text += ["One row per prompt, the same prompts and seeds for every model: "
                 + "; ".join(f"{i + 1}. {p}" for i, p in enumerate(prompts)), ""]
    sizes = list(dict.fromkeys(table.sort_values("params")["size"]))
    by_cell = {}
    for v, s, path in grids:
        by_cell.setdefault((v, s), path)
    header = ["variant", *sizes]
    rows = [[v, *[f"![{v} {s}]({by_cell[(v, s)]})" if (v, s) in by_cell else "-" for s in sizes]]
            for v in sorted({v for v, _, _ in grids})]
    text += [markdown_table(header, rows), ""]
    return text
