"""The compute-optimal part of a sweep's report: IsoFLOP curves, the frontier, L(N, D) and held-out checks.

Points come from the results table (harness/report.py): one per finished run, (N = params, D = tokens_seen,
C = train_flops, L = val_loss), its IsoFLOP budget in the `budget` column when the run is a cell of an
IsoFLOP design (RUN/isoflop.json, written by its training job; harness/isoflop.py). The fits are
harness/compute_optimal.py's, one set per variant: validation losses of different token kinds are different
quantities, so the variants share axes in the figures but never a fit.

Held-out checks: every fit is made again without the largest budget (and without the largest size), and
the held-out runs' losses are predicted from L(N, D), the held-out budget's minimum from the frontier's
power laws; the report prints predicted against measured with the fit's 95% interval.

Intermediate points (the spec's `report: {intermediate: true}`, an option, marked in the report): every
validation row of a run's metrics.jsonl before its last step is one more (N, D, C, L) point of the
parametric fit and of the loss-against-compute envelope (Hoffmann et al.'s approach 1), never of an IsoFLOP
profile. Under the constant learning rate after warm-up (optim.schedule: constant, this harness's default)
the run at step s has taken exactly the steps a separate s-step run takes (same data order, same lr at every
step), but constant-lr training is not the same as a run annealed to its length (Hägele et al. 2024, arXiv
2405.18392: a cooldown lowers the loss), so these points sit above an annealed frontier; a cosine run's
earlier points are further off (its lr at step s depends on its total length) and are left out.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from harness.compute_optimal import PARAMS, Frontier, ParametricFit, fit_parametric, isoflop_frontier, pooled_sigma


# --------------------------------------------------------------------------------------------- points
def run_points(table: pd.DataFrame, sweep_dir: Path | None = None, intermediate: bool = False) -> pd.DataFrame:
    """(run, variant, params, tokens, flops, loss, budget, final) per finished run, plus the earlier
    validation rows of each run when `intermediate` (read from SWEEP/runs/<run>/metrics.jsonl)."""
    table = table.copy()
    if "budget" not in table:
        table["budget"] = np.nan
    rows = table.dropna(subset=["params", "tokens_seen", "train_flops", "val_loss"])
    points = pd.DataFrame({"run": rows["run"], "variant": rows["variant"], "params": rows["params"].astype(float),
                           "tokens": rows["tokens_seen"].astype(float), "flops": rows["train_flops"].astype(float),
                           "loss": rows["val_loss"].astype(float), "budget": rows["budget"].astype(float),
                           "final": True})
    if intermediate and sweep_dir is not None:
        points = pd.concat([points, _intermediate(Path(sweep_dir), rows)], ignore_index=True)
    return points.reset_index(drop=True)


def _intermediate(sweep_dir: Path, rows: pd.DataFrame) -> pd.DataFrame:
    """The runs' validations before their last step (harness/curves.py) as points; none of a cosine run."""
    from harness.curves import training_curves

    def constant_lr(run: str) -> bool:
        try:
            config = json.loads((sweep_dir / "runs" / run / "config.json").read_text())
        except (OSError, json.JSONDecodeError):
            return False
        return config.get("optim", {}).get("schedule", "constant") == "constant"

    rows = rows[[constant_lr(str(r)) for r in rows["run"]]]
    curves = training_curves(sweep_dir, rows).merge(rows[["run", "params", "tokens_seen", "steps"]], on="run")
    curves = curves[curves["step"] < curves["steps"]]
    return pd.DataFrame({"run": curves["run"], "variant": curves["variant"], "params": curves["params"].astype(float),
                         "tokens": curves["tokens_seen"] * curves["step"] / curves["steps"],  # linear in the step
                         "flops": curves["flops"].astype(float), "loss": curves["val_loss"].astype(float),
                         "budget": math.nan, "final": False})


def envelope(points: pd.DataFrame) -> pd.DataFrame:
    """The lower envelope of loss against compute over `points` (harness/curves.py; Hoffmann et al.'s
    approach 1): its N at each C is that approach's N_opt(C)."""
    from harness.curves import envelope as lowest

    return lowest(points.rename(columns={"loss": "val_loss"})).rename(columns={"val_loss": "loss"})


# ------------------------------------------------------------------------------------------- analysis
@dataclass
class HeldOutRun:
    """One held-out run: its measured loss and L(N, D)'s prediction from the other runs."""

    run: str
    params: float
    tokens: float
    measured: float
    predicted: float
    lo: float
    hi: float

    @property
    def error(self) -> float:
        return self.predicted / self.measured - 1


@dataclass
class HeldOut:
    """A fit made without the largest budget (or size), checked on what it left out."""

    variant: str
    by: str                                   # "budget" | "size"
    value: float                              # the held-out budget C or size N
    runs: list[HeldOutRun]
    frontier: dict = field(default_factory=dict)   # l_opt / n_opt: (predicted, lo, hi, measured)
    note: str = ""


@dataclass
class VariantAnalysis:
    """Everything the compute-optimal section says about one variant."""

    variant: str
    points: int
    intermediate_points: int
    parametric: ParametricFit | None
    frontier: Frontier | None
    held_out: list[HeldOut]
    notes: list[str]
    envelope: pd.DataFrame = field(default_factory=pd.DataFrame)   # of every point, intermediate ones included
    envelope_exponent: float = math.nan      # N ~ C^a along the envelope (least squares in log-log, no interval)


def _frontier(cells: pd.DataFrame, sigma_fallback: float, n_boot: int, seed: int) -> tuple[Frontier | None, str]:
    if cells.empty:
        return None, ""
    _, dof = pooled_sigma(cells["params"].to_numpy(), cells["loss"].to_numpy(), cells["budget"].to_numpy())
    try:
        if dof > 0:
            return isoflop_frontier(cells["params"], cells["loss"], cells["budget"], n_boot=n_boot, seed=seed), ""
        if math.isfinite(sigma_fallback):
            return isoflop_frontier(cells["params"], cells["loss"], cells["budget"], sigma=sigma_fallback,
                                    sigma_from="parametric fit", n_boot=n_boot, seed=seed), ""
        return isoflop_frontier(cells["params"], cells["loss"], cells["budget"], sigma=0.0, n_boot=0), \
            "no noise estimate (3 sizes per budget and no parametric fit): the profiles have no intervals"
    except ValueError as e:
        return None, str(e)


def _parametric(points: pd.DataFrame, n_boot: int, seed: int) -> tuple[ParametricFit | None, str]:
    try:
        return fit_parametric(points["params"], points["tokens"], points["loss"], points["flops"], n_boot=n_boot,
                              seed=seed), ""
    except ValueError as e:
        return None, str(e)


def analyse_variant(points: pd.DataFrame, *, n_boot: int = 200, seed: int = 0, held_out: bool = True) -> VariantAnalysis:
    """The parametric fit, the IsoFLOP frontier and the held-out checks of one variant's points."""
    variant = str(points["variant"].iloc[0])
    notes = []
    parametric, why = _parametric(points, n_boot, seed)
    if why:
        notes.append(f"L(N, D) not fitted: {why}")
    cells = points[points["final"] & points["budget"].notna()]
    sigma = parametric.residual_sigma if parametric is not None else math.nan
    frontier, why = _frontier(cells, sigma, n_boot, seed)
    if why:
        notes.append(f"IsoFLOP frontier: {why}")
    checks = []
    if held_out:
        for by in ("budget", "size"):
            check = hold_out(points, by, n_boot=n_boot, seed=seed)
            if check is not None:
                checks.append(check)
    front = envelope(points)
    exponent = math.nan
    if front["params"].nunique() >= 2:
        exponent = float(np.polyfit(np.log(front["flops"]), np.log(front["params"]), 1)[0])
    return VariantAnalysis(variant=variant, points=int(points["final"].sum()),
                           intermediate_points=int((~points["final"]).sum()), parametric=parametric,
                           frontier=frontier, held_out=checks, notes=notes, envelope=front,
                           envelope_exponent=exponent)


def hold_out(points: pd.DataFrame, by: str, *, n_boot: int = 200, seed: int = 0) -> HeldOut | None:
    """Refit without the runs of the largest budget (`by="budget"`) or size (`by="size"`), predict them."""
    column = {"budget": "budget", "size": "params"}[by]
    finals = points[points["final"]]
    values = finals[column].dropna().unique()
    if len(values) < 3:  # two values left to fit at least
        return None
    largest = float(values.max())
    left_out_runs = set(finals.loc[finals[column] == largest, "run"])
    fit_points = points[~points["run"].isin(left_out_runs)]
    variant = str(points["variant"].iloc[0])
    parametric, why = _parametric(fit_points, n_boot, seed)
    check = HeldOut(variant=variant, by=by, value=largest, runs=[], note=why)
    if parametric is not None:
        for _, r in finals[finals["run"].isin(left_out_runs)].sort_values("params").iterrows():
            lo, hi = parametric.predict_interval(r["params"], r["tokens"])
            check.runs.append(HeldOutRun(run=str(r["run"]), params=float(r["params"]), tokens=float(r["tokens"]),
                                         measured=float(r["loss"]), predicted=float(parametric.predict(r["params"], r["tokens"])),
                                         lo=lo, hi=hi))
    if by == "budget":
        cells = fit_points[fit_points["final"] & fit_points["budget"].notna()]
        sigma = parametric.residual_sigma if parametric is not None else math.nan
        frontier, _ = _frontier(cells, sigma, n_boot, seed)
        everything, _ = _frontier(finals[finals["budget"].notna()], sigma, 0, seed)   # the measured profile
        measured = next((p for p in everything.profiles if p.budget == largest), None) if everything else None
        if frontier is not None and measured is not None:
            for key, law in (("n_opt", frontier.n_opt), ("l_opt", frontier.l_opt)):
                if law is not None:
                    check.frontier[key] = (float(law.predict(largest)), *law.predict_interval(largest),
                                           getattr(measured, key))
            check.frontier["best_run_loss"] = float(finals.loc[finals["budget"] == largest, "loss"].min())
    return check


def analyse(table: pd.DataFrame, sweep_dir: Path | None = None, *, intermediate: bool = False, n_boot: int = 200,
            seed: int = 0) -> dict[str, VariantAnalysis]:
    """One analysis per variant with enough points for any of the fits."""
    points = run_points(table, sweep_dir, intermediate)
    return {str(v): analyse_variant(rows, n_boot=n_boot, seed=seed) for v, rows in points.groupby("variant")
            if len(rows) >= 3}


# -------------------------------------------------------------------------------------------- figures
def draw(analyses: dict[str, VariantAnalysis], points: pd.DataFrame, out_dir: Path) -> dict[str, str]:
    """isoflop_curves.png (loss against N per budget, one panel per variant, parabolas and their minima) and
    frontier.png (N_opt and L_opt against C, every variant on one axis, with the fitted power laws)."""
    from matplotlib.ticker import NullFormatter

    from harness.plots import COLORS, _panels, _pyplot, _save

    with_profiles = {v: a for v, a in analyses.items() if a.frontier is not None}
    if not with_profiles:
        return {}
    plt = _pyplot()
    figures = {}
    fig, axes = _panels(len(with_profiles), (5.2, 4))
    cmap = plt.get_cmap("viridis")
    for ax, (variant, analysis) in zip(axes, sorted(with_profiles.items())):
        profiles = analysis.frontier.profiles
        sizes = points.loc[(points["variant"] == variant) & points["final"], "params"]
        # the axis spans the sizes run, 3x either side: an extrapolated minimum (or its interval) can lie decades
        # away and would squeeze every measured point into a corner; it is drawn as a triangle at the edge
        x_lo, x_hi = sizes.min() / 3, sizes.max() * 3
        for i, profile in enumerate(profiles):
            color = cmap(i / max(len(profiles) - 1, 1) * 0.85)
            at = points[(points["variant"] == variant) & (points["budget"] == profile.budget) & points["final"]]
            ax.scatter(at["params"], at["loss"], color=color, zorder=3, s=18)
            n = np.geomspace(at["params"].min() / 1.5, at["params"].max() * 1.5, 60)
            ax.plot(n, profile.predict(n), color=color, lw=1.2, label=f"C = {profile.budget:.2g}")
            if not math.isfinite(profile.n_opt):
                continue
            if x_lo <= profile.n_opt <= x_hi:
                xerr = None
                if math.isfinite(profile.n_opt_lo):
                    lo, hi = max(profile.n_opt_lo, x_lo), min(profile.n_opt_hi, x_hi)
                    xerr = [[profile.n_opt - lo], [hi - profile.n_opt]]
                ax.errorbar([profile.n_opt], [profile.l_opt], xerr=xerr, fmt="*", color=color, ms=11, capsize=3,
                            mec="black", mew=0.5, zorder=4)
            else:
                edge = x_lo * 1.08 if profile.n_opt < x_lo else x_hi / 1.08
                ax.plot([edge], [float(profile.predict(edge))], marker="<" if profile.n_opt < x_lo else ">",
                        color=color, ms=9, mec="black", mew=0.5, zorder=4, ls="none")
        ax.set_xscale("log")
        ax.set_xlim(x_lo, x_hi)
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_title(f"{variant}: IsoFLOP profiles\n(star: N_opt, 95% CI; triangle: N_opt beyond the axis)",
                     fontsize=10)
        ax.set_xlabel("parameters N")
        ax.set_ylabel("validation loss")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    figures["isoflop_curves"] = _save(fig, out_dir / "isoflop_curves.png")

    fig, (ax_n, ax_l) = plt.subplots(1, 2, figsize=(11, 4.2))
    for variant, analysis in sorted(with_profiles.items()):
        f = analysis.frontier
        found = [p for p in f.profiles if math.isfinite(p.n_opt) and p.interior]
        outside = [p for p in f.profiles if math.isfinite(p.n_opt) and not p.interior]
        if not found and not outside:
            continue
        color = COLORS.get(variant)
        c = np.array([p.budget for p in found] or [p.budget for p in outside])
        for ax, key, law in ((ax_n, "n_opt", f.n_opt), (ax_l, "l_opt", f.l_opt)):
            if found:
                y = np.array([getattr(p, key) for p in found])
                lo = np.array([getattr(p, f"{key}_lo") for p in found])
                hi = np.array([getattr(p, f"{key}_hi") for p in found])
                yerr = np.vstack([y - lo, hi - y]) if np.isfinite(lo).all() and np.isfinite(hi).all() else None
                ax.errorbar([p.budget for p in found], y, yerr=yerr, fmt="o", color=color, capsize=3, label=variant)
            if outside:   # the parabola's extrapolated vertex: shown, not fitted
                ax.plot([p.budget for p in outside], [getattr(p, key) for p in outside], "o", mfc="none",
                        color=color, ls="none", label=f"{variant}: minimum outside the sizes (not fitted)")
            if law is not None:
                grid = np.geomspace(c.min() / 1.5, c.max() * 4, 40)
                ax.plot(grid, law.predict(grid), color=color, lw=1.2,
                        label=f"{variant}: C^{law.a:.3f} [{law.a_lo:.3f}, {law.a_hi:.3f}]")
            if analysis.parametric is not None and key == "n_opt":
                grid = np.geomspace(c.min() / 1.5, c.max() * 4, 40)
                n_opt = np.array([analysis.parametric.n_opt(x) for x in grid])
                if np.isfinite(n_opt).all() and (n_opt > 0).all():
                    ax.plot(grid, n_opt, color=color, lw=1, ls="--")
            if key == "l_opt" and len(analysis.envelope) >= 2:
                ax.step(analysis.envelope["flops"], analysis.envelope["loss"], where="post", color=color, lw=0.8,
                        ls=":", label=f"{variant}: envelope of all points")
    for ax, label in ((ax_n, "N_opt (dashed: from L(N, D))"), (ax_l, "L_opt (each variant its own loss)")):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("training FLOPs C")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
        if ax.get_legend_handles_labels()[0]:  # no budget of any variant with a minimum: nothing to label
            ax.legend(fontsize=7)
    ax_n.set_title("compute-optimal size")
    ax_l.set_title("compute-optimal loss")
    fig.tight_layout()
    figures["frontier"] = _save(fig, out_dir / "frontier.png")
    return figures


# ------------------------------------------------------------------------------------------- markdown
def _ci(lo: float, hi: float, fmt: str = ".3g") -> str:
    return "-" if not (math.isfinite(lo) and math.isfinite(hi)) else f"[{lo:{fmt}}, {hi:{fmt}}]"


def _parameter(value: float, lo: float, hi: float) -> str:
    """A fitted parameter and its interval; one the refits never moved from is flagged: the data leave it
    unconstrained (a flat direction of the objective, e.g. E with one or two budgets), not known exactly."""
    flat = math.isfinite(lo) and math.isfinite(hi) and hi - lo <= 1e-6 * max(abs(value), 1e-300)
    return f"{value:.4g} {_ci(lo, hi)}" + (" (flat: not identified)" if flat else "")


def section(analyses: dict[str, VariantAnalysis], figures: dict[str, str], intermediate: bool) -> list[str]:
    """The report's "Compute-optimal scaling" section (markdown lines)."""
    from harness.tables import markdown_table

    text = ["## Compute-optimal scaling (IsoFLOP)", "",
            "Per variant (harness/compute_optimal.py; Hoffmann et al. 2022, Besiroglu et al. 2024): at each budget C "
            "(training FLOPs from the variants' own accounting), validation loss against log N fitted by a parabola "
            "whose minimum is N_opt(C); N_opt and L_opt against C as power laws; and L(N, D) = E + A N^-alpha + "
            "B D^-beta (D = training tokens) by the Huber loss on log L. 95% intervals: residual bootstrap for the "
            "profiles and the frontier, pairs bootstrap over the runs for L(N, D). Losses of different token kinds "
            "are different quantities: compare frontiers within a token kind.", ""]
    if intermediate:
        text += ["**Option on: intermediate points.** Earlier validations of each run are points of L(N, D) too "
                 "(not of the IsoFLOP profiles): constant-lr checkpoints, not runs annealed to that length, so "
                 "they sit above an annealed frontier (harness/isoflop_report.py).", ""]
    rows = []
    for v, a in sorted(analyses.items()):
        for p in (a.frontier.profiles if a.frontier else []):
            rows.append([v, p.budget, p.sizes, p.n_opt, _ci(p.n_opt_lo, p.n_opt_hi), p.l_opt,
                         _ci(p.l_opt_lo, p.l_opt_hi, ".4g"), "yes" if p.interior else "no (extrapolated)",
                         f"{p.with_minimum:.0%}" if math.isfinite(p.with_minimum) else "-"])
    if rows:
        text += ["### IsoFLOP profiles", "",
                 markdown_table(["variant", "budget C", "sizes", "N_opt", "95% CI", "L_opt", "95% CI",
                                 "minimum inside the sizes", "resamples with a minimum"], rows), ""]
        if "isoflop_curves" in figures:
            text += [f"![isoflop_curves]({figures['isoflop_curves']})", ""]
    rows, unfitted = [], []
    for v, a in sorted(analyses.items()):
        f = a.frontier
        if f is None:
            continue
        if f.n_opt is None:
            below = sum(p.n_opt < p.n_min for p in f.profiles)   # nan (no minimum) compares False
            unfitted.append(f"{v}: {sum(p.interior for p in f.profiles)} of {len(f.profiles)} budgets have their "
                            f"minimum inside the sizes run ({below} below the smallest size), so no frontier is "
                            f"fitted; run {'smaller sizes' if below else 'more sizes'} to bracket the minimum")
            continue
        rows.append([v, f.n_opt.a, _ci(f.n_opt.a_lo, f.n_opt.a_hi), f.l_opt.a if f.l_opt else math.nan,
                     _ci(f.l_opt.a_lo, f.l_opt.a_hi) if f.l_opt else "-", f.n_opt.points,
                     f"{f.sigma:.3g} ({f.sigma_from})", a.envelope_exponent])
    if rows or unfitted:
        text += ["### The frontier", "", "N_opt = k C^a and L_opt = k' C^b over the budgets whose minimum lies "
                 "inside the sizes run (an extrapolated minimum is the parabola's guess, not a measurement); the "
                 "last column is a from the lower envelope of loss against FLOPs over every point (Hoffmann et "
                 "al.'s approach 1: the size of the best point at each compute, no interval).", "",
                 markdown_table(["variant", "a (N_opt)", "95% CI", "b (L_opt)", "95% CI", "budgets",
                                 "loss noise sigma (from)", "a (envelope)"], rows), ""] if rows else []
        text += [f"- {line}" for line in unfitted] + ([""] if unfitted else [])
        if "frontier" in figures:
            text += [f"![frontier]({figures['frontier']})", ""]
    rows = []
    for v, a in sorted(analyses.items()):
        p = a.parametric
        if p is None:
            continue
        exponent = p.beta / (p.alpha + p.flops_gamma * p.beta) if p.alpha + p.beta > 0 else math.nan
        rows.append([v, *[_parameter(getattr(p, k), *p.intervals[k]) for k in PARAMS], exponent,
                     f"{a.points} + {a.intermediate_points}" if a.intermediate_points else a.points,
                     p.residual_sigma])
    if rows:
        text += ["### L(N, D)", "", "Each parameter with its 95% interval; N_opt ~ C^(beta / (alpha + gamma beta)) "
                 "with C = k N^gamma D fitted on the runs' FLOPs per token.", "",
                 markdown_table(["variant", *PARAMS, "N_opt exponent", "points", "residual sigma"], rows), ""]
    rows = []
    frontier_rows = []
    for v, a in sorted(analyses.items()):
        for check in a.held_out:
            what = f"largest {check.by} ({check.value:.3g})"
            for r in check.runs:
                rows.append([v, what, r.run, r.measured, r.predicted, _ci(r.lo, r.hi, ".4g"), f"{r.error:+.1%}",
                             "yes" if r.lo <= r.measured <= r.hi else "no"])
            if check.frontier:
                for key in ("l_opt", "n_opt"):
                    if key in check.frontier:
                        pred, lo, hi, measured = check.frontier[key]
                        frontier_rows.append([v, check.value, key, measured, pred, _ci(lo, hi, ".4g"),
                                              f"{pred / measured - 1:+.1%}" if measured else "-"])
    if rows or frontier_rows:
        text += ["### Predictions checked on held-out runs", "",
                 "Every fit made again without the largest budget (or size); the left-out runs predicted. The "
                 "interval is the fit's (parameter uncertainty), not a new run's noise.", ""]
    if rows:
        text += [markdown_table(["variant", "held out", "run", "measured loss", "predicted (L(N, D))", "95% CI",
                                 "error", "inside CI"], rows), ""]
    if frontier_rows:
        text += ["The held-out budget's minimum (its own profile) against the frontier fitted on the smaller "
                 "budgets:", "",
                 markdown_table(["variant", "budget C", "quantity", "measured (profile)", "predicted (power law)",
                                 "95% CI", "error"], frontier_rows), ""]
    notes = [f"{v}: {n}" for v, a in sorted(analyses.items()) for n in a.notes]
    if notes:
        text += ["Not fitted: " + "; ".join(notes) + ".", ""]
    return text
