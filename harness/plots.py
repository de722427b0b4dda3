"""The report's figures (matplotlib, Agg backend, PNG): scaling curves with their fits, quality against size."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from harness.scaling import PowerLawFit

# One colour per variant, the same in every figure; token kind by hue, order by shade.
COLORS = {"vq-raster": "#9ecae1", "vq-random": "#3182bd", "kl-raster": "#fdae6b", "kl-random": "#e6550d"}
MARKERS = {"raster": "s", "random": "o"}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only; no display on a cluster or in CI
    import matplotlib.pyplot as plt

    return plt


def _style(variant: str, rows: pd.DataFrame) -> dict:
    order = rows["order"].iloc[0] if "order" in rows and len(rows) else "random"
    return {"color": COLORS.get(variant, None), "marker": MARKERS.get(order, "o"), "label": variant}


def _panels(n: int, panel: tuple[float, float] = (5, 3.8)):
    """A figure of n panels, two per row, each `panel` inches: (figure, the n axes); spare cells are hidden."""
    cols = min(n, 2)
    rows_n = int(np.ceil(n / cols))
    fig, axes = _pyplot().subplots(rows_n, cols, figsize=(panel[0] * cols, panel[1] * rows_n), squeeze=False)
    for ax in list(axes.flat)[n:]:
        ax.set_visible(False)
    return fig, list(axes.flat)[:n]


def _save(fig, path: Path) -> str:
    from harness.atomic import atomic_path

    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight")
    _pyplot().close(fig)
    return path.name


def loss_vs_params(table: pd.DataFrame, fits: dict[str, PowerLawFit], path: Path, x: str = "params") -> str | None:
    """One log-log panel per variant (losses differ in kind across token types), points and fitted law against
    parameter count `x` (the column the laws were fitted on)."""
    variants = sorted(table.dropna(subset=["val_loss"])["variant"].unique())
    if not variants:
        return None
    fig, axes = _panels(len(variants))
    for ax, variant in zip(axes, variants):
        rows = table[table["variant"] == variant].dropna(subset=[x, "val_loss"]).sort_values(x)
        style = _style(variant, rows)
        ax.scatter(rows[x], rows["val_loss"], color=style["color"], marker=style["marker"], zorder=3)
        fit = fits.get(variant)
        if fit is not None:
            n = np.geomspace(rows[x].min() / 1.3, rows[x].max() * 1.3, 50)
            offset = f" + {fit.c:.3g}" if fit.c else ""
            ax.plot(n, fit.predict(n), color=style["color"], lw=1.5,
                    label=f"{fit.a:.3g} N^-{fit.alpha:.3f}{offset}\nalpha 95% CI [{fit.alpha_lo:.3f}, "
                          f"{fit.alpha_hi:.3f}]")
            ax.legend(fontsize=8)
        _log_x(ax, rows[x])
        ax.set_yscale("log")
        ax.set_title(variant)
        ax.set_xlabel("non-embedding parameters N" if x == "params_nonembed" else "parameters N")
        ax.set_ylabel("validation loss")
        ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    return _save(fig, path)


def _log_x(ax, values: pd.Series) -> None:
    """Log x axis; under two decades, labels at 2 and 5 of each decade too, not at every minor tick (where
    they overlap in a narrow panel)."""
    from matplotlib import ticker

    ax.set_xscale("log")
    if values.max() < 100 * values.min():
        ax.xaxis.set_minor_locator(ticker.LogLocator(subs=(2.0, 5.0)))
        ax.xaxis.set_minor_formatter(ticker.LogFormatterSciNotation(labelOnlyBase=False,
                                                                    minor_thresholds=(np.inf, np.inf)))


def metric_vs(table: pd.DataFrame, x: str, y: str, path: Path, *, logy: bool = False, ylabel: str = "",
              ceilings: dict[str, float] | None = None, se: str | None = None) -> str | None:
    """All variants on one axes: `y` against `x` (log x), optional horizontal ceilings per token kind and
    error bars of +-2 standard errors from column `se` where it has values."""
    data = table.dropna(subset=[x, y])
    if data.empty:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4.2))
    for variant, rows in sorted(data.groupby("variant")):
        rows = rows.sort_values(x)
        style = _style(variant, rows)
        ax.plot(rows[x], rows[y], **style)
        if se and se in rows and rows[se].notna().all():
            ax.errorbar(rows[x], rows[y], yerr=2 * rows[se], fmt="none", ecolor=style.get("color"), alpha=0.5,
                        capsize=3, lw=1)
    for kind, value in sorted((ceilings or {}).items()):
        ax.axhline(value, ls="--", lw=1, color=COLORS.get(f"{kind}-random", "grey"),
                   label=f"{kind} tokenizer ceiling")
    _log_x(ax, data[x])
    if logy:
        ax.set_yscale("log")
    ax.set_xlabel({"params": "parameters N", "train_flops": "training FLOPs"}.get(x, x))
    ax.set_ylabel(ylabel or y)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, path)


def loss_envelope(curves: pd.DataFrame, frontier: pd.DataFrame, path: Path) -> str | None:
    """One log-log panel per variant: each size's validation loss against training FLOPs, and the envelope."""
    variants = sorted(curves["variant"].unique()) if len(curves) else []
    if not variants or curves.groupby("run").size().max() < 2:
        return None  # one validation per run draws points, not curves: `train.val_every` was not set
    fig, axes = _panels(len(variants))
    for ax, variant in zip(axes, variants):
        rows = curves[curves["variant"] == variant]
        shades = np.linspace(0.35, 1.0, rows["size"].nunique())
        for shade, (size, run_rows) in zip(shades, sorted(rows.groupby("size"), key=lambda g: g[1]["flops"].max())):
            for _, one in run_rows.groupby("run"):
                one = one.sort_values("flops")
                ax.plot(one["flops"], one["val_loss"], color=COLORS.get(variant), alpha=float(shade), lw=1.2,
                        label=size if one["run"].iloc[0] == run_rows["run"].iloc[0] else None)
        edge = frontier[frontier["variant"] == variant].sort_values("flops")
        ax.plot(edge["flops"], edge["val_loss"], color="black", ls="--", lw=1, label="envelope")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_title(variant)
        ax.set_xlabel("training FLOPs")
        ax.set_ylabel("validation loss")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    return _save(fig, path)


def context_curves(curves: list[dict], path: Path) -> str | None:
    """Random order's loss against the tokens known, one panel per token kind: a line per run (darker = larger
    rung), and dotted at the right end the raster run's validation loss of the same rung, its reference."""
    kinds = sorted({c["token_kind"] for c in curves})
    if not kinds:
        return None
    fig, axes = _pyplot().subplots(1, len(kinds), figsize=(5 * len(kinds), 3.8), squeeze=False)
    cmap = _pyplot().get_cmap("viridis")
    for ax, kind in zip(axes[0], kinds):
        runs = [c for c in curves if c["token_kind"] == kind]
        sizes = list(dict.fromkeys(c["size"] for c in runs))  # the table's order: smallest rung first
        for c in runs:
            color = cmap(0.85 * sizes.index(c["size"]) / max(1, len(sizes) - 1))
            ax.plot(c["known"], c["loss"], marker="o", color=color, label=c["label"])
            if c["reference"] is not None:
                ax.hlines(c["reference"], c["known"][0], c["known"][-1], colors=[color], linestyles=":")
        ax.set_xlabel("image tokens known (k)")
        ax.set_ylabel("loss on the unknown tokens")
        ax.set_title(f"{kind}-random (dotted: {kind}-raster val loss)")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=2)  # below the curves
    fig.tight_layout()
    return _save(fig, path)


def draw_all(table: pd.DataFrame, fits: dict[str, PowerLawFit], ceilings: dict[str, dict],
             out_dir: Path, x: str = "params", curves: pd.DataFrame | None = None,
             frontier: pd.DataFrame | None = None) -> dict[str, str]:
    """Every figure of the report; returns {figure key: file name} for those with data to draw."""
    geneval_ceilings = {k: c["overall"] for k, c in ceilings.items() if c.get("overall") is not None}
    figures = {
        "loss_vs_params": loss_vs_params(table, fits, out_dir / "loss_vs_params.png", x=x),
        "loss_envelope": (loss_envelope(curves, frontier, out_dir / "loss_envelope.png")
                          if curves is not None and frontier is not None else None),
        "loss_vs_flops": metric_vs(table, "train_flops", "val_loss", out_dir / "loss_vs_flops.png", logy=True,
                                   ylabel="validation loss (each variant its own)"),
        "fid_vs_params": metric_vs(table, "params", "fid", out_dir / "fid_vs_params.png",
                                   ylabel="FID (+-2 standard errors)", se="fid_se"),
        "kid_vs_params": metric_vs(table, "params", "kid", out_dir / "kid_vs_params.png",
                                   ylabel="KID (+-2 standard errors)", se="kid_se"),
        "geneval_vs_params": metric_vs(table, "params", "geneval_overall", out_dir / "geneval_vs_params.png",
                                       ylabel="GenEval overall (+-2 standard errors)", ceilings=geneval_ceilings,
                                       se="geneval_overall_se"),
    }
    return {k: v for k, v in figures.items() if v}
