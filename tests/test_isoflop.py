"""IsoFLOP designs: the report's compute-optimal section on runs from a known law (held-out predictions
within their intervals), intermediate points as an option."""
from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest

from harness.isoflop_report import analyse, run_points
from harness.report import write_report

LAW = {"E": 1.69, "A": 406.4, "B": 410.7, "alpha": 0.34, "beta": 0.28}   # Hoffmann et al.'s fitted law
BUDGETS = [1e18, 4e18, 1.6e19]
SIZES = {"S": 4e7, "M": 1.2e8, "L": 3.6e8, "XL": 1.08e9}
AXES = {"vq-raster": ("vq", "raster"), "kl-random": ("kl", "random")}


def law_loss(n, d, scale=1.0):
    return scale * (LAW["E"] + LAW["A"] * n ** -LAW["alpha"] + LAW["B"] * d ** -LAW["beta"])


def isoflop_table(noise: float = 0.004, seed: int = 0) -> pd.DataFrame:
    """Two variants x 3 budgets x 4 sizes, D = C / 6N, losses from the law (kl's scaled: another quantity)."""
    rng = np.random.default_rng(seed)
    rows = []
    for variant, (kind, order) in AXES.items():
        for i, c in enumerate(BUDGETS):
            for size, n in SIZES.items():
                d = c / (6 * n)
                loss = law_loss(n, d, 1.0 if kind == "vq" else 0.2) * math.exp(rng.normal(0, noise))
                rows.append(dict(run=f"{variant}-{size}-c{i}", variant=variant, size=size, token_kind=kind,
                                 order=order, params=n, budget=c, train_flops=c, steps=round(d / 256 / 64),
                                 tokens_seen=d, val_loss=loss))
    return pd.DataFrame(rows)


@pytest.fixture(scope="module")
def analyses():
    return analyse(isoflop_table(), n_boot=100)


def test_held_out_budget_is_predicted_within_the_fits_interval(analyses):
    for variant, a in analyses.items():
        check = next(h for h in a.held_out if h.by == "budget")
        assert check.value == BUDGETS[-1] and [r.run for r in check.runs] == [f"{variant}-{s}-c2" for s in SIZES]
        for r in check.runs:
            assert abs(r.error) < 0.02, (r.run, r.error)
            assert r.lo < r.predicted < r.hi
        pred, lo, hi, measured = check.frontier["n_opt"]
        assert lo < pred < hi and pred == pytest.approx(measured, rel=0.25)
        pred, lo, hi, measured = check.frontier["l_opt"]
        assert pred == pytest.approx(measured, rel=0.01)
        size_check = next(h for h in a.held_out if h.by == "size")
        assert size_check.value == SIZES["XL"] and len(size_check.runs) == len(BUDGETS)


def test_profiles_frontier_and_fit_per_variant(analyses):
    assert set(analyses) == set(AXES)
    a = analyses["vq-raster"]
    assert [p.budget for p in a.frontier.profiles] == BUDGETS
    assert a.frontier.sigma_from == "profiles"
    # N_opt ~ C^(beta / (alpha + beta)) = C^0.45
    assert 0.3 < a.frontier.n_opt.a < 0.6
    assert a.parametric.alpha == pytest.approx(LAW["alpha"], abs=0.1)
    # the kl variant's loss is another quantity (x0.2): its own E, the same exponents
    kl = analyses["kl-random"].parametric
    assert kl.E == pytest.approx(0.2 * a.parametric.E, rel=0.2)


def test_report_draws_isoflop_curves_frontier_and_held_out_table(tmp_path):
    isoflop_table().to_csv(tmp_path / "runs.csv", index=False)
    text = write_report(tmp_path, n_boot=50, fit_boot=50).read_text()
    for png in ("isoflop_curves.png", "frontier.png"):
        assert (tmp_path / png).stat().st_size > 5000 and f"]({png})" in text
    assert "## Compute-optimal scaling (IsoFLOP)" in text and "### Predictions checked on held-out runs" in text
    assert "| vq-raster | largest budget (1.6e+19) | vq-raster-S-c2 |" in text
    assert "the 8 runs of the largest budget" in text  # the fixed-length sections take one budget
    assert "intermediate points" not in text


def test_intermediate_points_are_an_option_and_skip_cosine_runs(tmp_path):
    table = isoflop_table().iloc[:2].copy()
    for i, (_, row) in enumerate(table.iterrows()):
        run = tmp_path / "runs" / row["run"]
        run.mkdir(parents=True)
        schedule = "constant" if i == 0 else "cosine"
        (run / "config.json").write_text(json.dumps({"optim": {"schedule": schedule}}))
        steps = int(row["steps"])
        lines = [{"step": 0, "val_loss": 9.0}, {"step": steps // 2, "val_loss": 3.0, "train_loss": 3.1},
                 {"step": steps // 4, "train_loss": 3.5}, {"step": steps, "val_loss": 2.5}]
        (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    assert len(run_points(table, tmp_path)) == 2
    points = run_points(table, tmp_path, intermediate=True)
    extra = points[~points["final"]]
    assert len(extra) == 1 and extra["run"].iloc[0] == table["run"].iloc[0]  # step 0 and the cosine run: none
    assert extra["tokens"].iloc[0] == pytest.approx(table["tokens_seen"].iloc[0] * (int(table["steps"].iloc[0]) // 2)
                                                    / int(table["steps"].iloc[0]))
    assert extra["loss"].iloc[0] == 3.0 and math.isnan(extra["budget"].iloc[0])
