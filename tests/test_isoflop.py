"""IsoFLOP designs: the report's compute-optimal section on runs from a known law (held-out predictions
within their intervals), intermediate points as an option."""
from __future__ import annotations

import json
import math
from pathlib import Path

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


def test_report_fits_no_frontier_on_minima_below_the_smallest_size(tmp_path):
    """kl-random's sizes all 40x above its optimum: every profile's minimum is extrapolated, so the report fits
    no frontier for it, says which way to move the sizes, and still draws both figures (the minima beyond
    the axis as triangles, not stretching it decades)."""
    table = isoflop_table()
    kl = table["variant"] == "kl-random"
    table.loc[kl, "params"] *= 40
    d = table.loc[kl, "budget"] / (6 * table.loc[kl, "params"])
    table.loc[kl, "tokens_seen"] = d
    table.loc[kl, "val_loss"] = law_loss(table.loc[kl, "params"], d, 0.2)
    table.to_csv(tmp_path / "runs.csv", index=False)
    text = write_report(tmp_path, n_boot=50, fit_boot=50).read_text()
    assert ("- kl-random: 0 of 3 budgets have their minimum inside the sizes run (3 below the smallest size), so "
            "no frontier is fitted; run smaller sizes to bracket the minimum") in text
    assert "| vq-raster | 0." in text.split("### The frontier")[1]   # the other variant's frontier is fitted
    for png in ("isoflop_curves.png", "frontier.png"):
        assert (tmp_path / png).stat().st_size > 5000


def test_intermediate_points_are_an_option_and_skip_cosine_runs(tmp_path):
    table = isoflop_table().iloc[:2].copy()
    for i, (_, row) in enumerate(table.iterrows()):
        run = tmp_path / "runs" / row["run"]
        run.mkdir(parents=True)
        schedule = "constant" if i == 0 else "cosine"
        (run / "config.json").write_text(json.dumps({"optim": {"schedule": schedule}, "train": {"batch_size": 64}}))
        steps = int(row["steps"])
        (run / "summary.json").write_text(json.dumps({"train_flops_per_image": row["train_flops"] / steps / 64}))
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


# ------------------------------------------------------------------------------------------------- planner
def test_embedded_isoflop_plan_spends_each_budget_within_one_step(tmp_path):
    from harness.sweep import load_spec, plan
    from variants.registry import LADDER_SHAPES, build_variant

    spec = load_spec("embedded-isoflop", out=tmp_path / "iso")
    jobs = plan(spec)
    cells = [j for j in jobs if j.stage == "train_cell"]
    assert len(cells) == 3 * 4 * 2 and not [j for j in jobs if j.stage == "train_run"]
    shapes = {k: v for k, v in LADDER_SHAPES["cpu-isoflop"].items() if k != "text_len"}
    for job in cells:
        cell, values = job.args["cell"], job.args["values"]
        # the accounting the trainer writes to summary.json, computed here on its own
        # with the spec's model options (text_len 16 sets the accounting's text length)
        options = {k.removeprefix("model.options."): v for k, v in values.items() if k.startswith("model.options.")}
        assert options.get("text_len") == 16
        per_image = build_variant(cell["variant"], cell["size"], ladder="cpu-isoflop",
                                  **{**shapes, **options}).train_flops_per_image()
        per_step = per_image * values["train.batch_size"]
        assert cell["flops_per_step"] == pytest.approx(per_step, rel=1e-12)
        assert values["train.steps"] == cell["steps"] >= 20  # past the spec's warm-up
        assert abs(cell["steps"] * per_step - cell["budget"]) <= per_step  # within one step
        assert abs(cell["steps"] * per_step - cell["budget"]) <= per_step / 2  # (round: within half a step)
        assert values["out"].endswith(f"runs/{job.name.removeprefix('train/')}")
        assert f"train.steps={cell['steps']}" in job.command
    assert {j.args["cell"]["budget"] for j in cells} == {8e11, 1.6e12, 3.2e12}
    report = jobs[-1]
    assert report.stage == "make_report" and set(report.deps) == {j.name for j in cells}
    assert report.args["intermediate"] is True and "budget" in report.args["columns"]
    assert "budget" not in next(j for j in plan(load_spec("embedded", out=tmp_path / "e"))
                                if j.stage == "make_report").args["columns"]


def test_the_isoflop_ladder_is_the_cpu_ladder_with_its_smallest_rung():
    from harness.config import RunConfig
    from variants.registry import LADDER_SHAPES, LADDERS, build_variant

    assert LADDERS["cpu-isoflop"] == LADDERS["cpu"] and LADDER_SHAPES["cpu-isoflop"] == LADDER_SHAPES["cpu"]
    assert [r.name for r in LADDERS["cpu"][:2]] == ["cpu-3xs", "cpu-2xs"]
    shapes = {k: v for k, v in LADDER_SHAPES["cpu"].items() if k != "text_len"}
    small, xs = (build_variant("vq-random", s, ladder="cpu-isoflop", **shapes).param_counts()["total"]
                 for s in ("cpu-2xs", "cpu-xs"))
    assert small < xs / 2 and xs == build_variant("vq-random", "cpu-xs", ladder="cpu", **shapes).param_counts()["total"]
    RunConfig.from_overrides({"model.ladder": "cpu-isoflop", "model.size": "cpu-2xs", "out": "x", "data.path": "d",
                              "tokenizer.path": "t"}).validate()  # the config takes the registry's ladders


def test_isoflop_dry_run_and_plan_show_the_cells_and_their_cost(tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-m", "harness", "sweep", "embedded-isoflop", "--dry-run", "--out",
                          str(tmp_path / "iso")], capture_output=True, text=True, cwd=root, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "3 budgets x 4 sizes x 2 variants = 24 training runs" in out.stdout
    assert "| vq-random | cpu-2xs | 8e+11 | 64 | 5.69e+08 | 1405 |" in out.stdout
    assert "30 jobs, 24 training runs" in out.stdout
    assert "train/kl-random-cpu-s-3.2e12  [todo]" in out.stdout
    out = subprocess.run([sys.executable, "-m", "harness", "sweep", "fluid-paper-isoflop", "--plan"],
                         capture_output=True, text=True, cwd=root, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.count("| kl-random 3.1B @ ") == 3 and "for 30 runs" in out.stdout


@pytest.mark.parametrize("isoflop, message", [
    ({"budgets": [1e12], "size": ["cpu-s"]}, "unknown key 'isoflop.size'"),
    ({"budgets": [-1e12]}, "isoflop: budgets: -1000000000000.0 is not a positive number"),
    ({"budgets": "1e12"}, "isoflop.budgets: expected a list"),
    ({"budgets": [1e12], "sizes": ["cpu-huge"]}, "isoflop.sizes: 'cpu-huge' not in the cpu-isoflop ladder"),
    ({"budgets": [1e12], "shapes": {"text_len": 8}}, "isoflop.shapes.text_len: unknown"),
])
def test_bad_isoflop_settings_are_one_line_errors(tmp_path, isoflop, message):
    import yaml

    from harness.errors import FluidbenchError
    from harness.spec import SPECS_DIR, load_spec

    values = yaml.safe_load((SPECS_DIR / "embedded-isoflop.yaml").read_text())
    values["isoflop"] = isoflop
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(values))
    with pytest.raises(FluidbenchError, match=message):
        load_spec(path)


def test_a_budget_below_one_step_fails_at_plan_time(tmp_path):
    from harness.errors import FluidbenchError
    from harness.sweep import load_spec, plan

    spec = load_spec("embedded-isoflop", out=tmp_path / "iso")
    spec.isoflop.budgets = [1e9]
    with pytest.raises(FluidbenchError, match=r"isoflop.budgets: 1e\+09 FLOPs is less than one step of kl-random cpu-xs"):
        plan(spec)


MICRO_ISOFLOP = """
name: micro-isoflop
data: {kind: shapes, shapes: {seed: 0, train: 192, val: 48, size: 32, prompts_per_task: 2}}
tokenizers:
  vq: {train: {steps: 3, budget_s: 20}}
text: {encoder: minilm, max_length: 16}
ladder: cpu
variants: [vq-random]
sizes: [cpu-xs, cpu-s, cpu-m]
isoflop: {budgets: [8.5e+9, 1.7e+10]}
run:
  train: {batch_size: 8, log_every: 4, val_every: 4, ckpt_every: 8, val_size: 16, val_batch_size: 16}
  optim: {lr: 1.0e-3, warmup_steps: 1}
local: {workers: 1, threads: 1}
report: {n_boot: 20, fit_boot: 20, intermediate: true}
"""


@pytest.mark.slow
def test_micro_isoflop_sweep_end_to_end_then_no_work(tmp_path, monkeypatch):
    """Three sizes x two budgets through the local executor: each run's FLOPs (the trainer's own count) within
    half a step of its budget, recorded beside it; the report's IsoFLOP section; a second run does nothing; a
    plan whose token shapes differ from the real tokenizer's fails before training."""
    from harness.errors import FluidbenchError
    from harness.local import run_local
    from harness.sweep import load_spec, plan

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    (tmp_path / "micro.yaml").write_text(MICRO_ISOFLOP)
    spec = load_spec(tmp_path / "micro.yaml", out=tmp_path / "sweep")
    status = run_local(spec, workers=1)
    assert set(status.values()) == {"done"}, status
    table = pd.read_csv(spec.root / "runs.csv")
    assert len(table) == 6 and set(table["budget"]) == {8.5e9, 1.7e10}
    for _, row in table.iterrows():
        cell = json.loads((spec.root / "runs" / row["run"] / "isoflop.json").read_text())
        assert cell["budget"] == row["budget"] and cell["steps"] == row["steps"]
        assert abs(row["train_flops"] - row["budget"]) <= cell["flops_per_step"] / 2
    text = (spec.root / "report.md").read_text()
    assert "## Compute-optimal scaling (IsoFLOP)" in text and "**Option on: intermediate points.**" in text
    assert "| vq-random | 8.5e+09 | 3 |" in text and (spec.root / "isoflop_curves.png").is_file()
    assert set(run_local(spec, workers=1).values()) == {"skipped"}

    spec.isoflop.shapes = {"vocab_size": 1024}   # the tokenizer has 512 codes
    job = next(j for j in plan(spec) if j.stage == "train_cell")
    run = Path(job.args["values"]["out"])
    with pytest.raises(FluidbenchError, match=r"vocab_size.*set isoflop.shapes"):
        job.run()
    assert not (run / "isoflop.json").exists() or json.loads((run / "isoflop.json").read_text())["flops_per_step"] \
        != job.args["cell"]["flops_per_step"]


@pytest.mark.parametrize("schedule", ["constant", "cosine"])
def test_an_intermediate_validation_is_the_shorter_run_only_at_constant_lr(tmp_path, schedule):
    """The report's mark on intermediate points, checked: at constant lr the 12-step run's validation at
    step 6 is exactly the 6-step run's final one; under cosine (lr depends on the length) it is not."""
    import torch

    from harness.config import RunConfig
    from harness.train import train
    from test_train import tiny_inputs, tiny_values

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        inputs = tiny_inputs(tmp_path / "inputs")
        long = tiny_values(inputs, tmp_path / "long", **{"optim.schedule": schedule})
        train(RunConfig.from_overrides(long))
        short = train(RunConfig.from_overrides({**long, "out": str(tmp_path / "short"), "train.steps": 6}))
    finally:
        torch.set_num_threads(threads)
    rows = [json.loads(line) for line in (tmp_path / "long" / "metrics.jsonl").read_text().splitlines()]
    at_6 = next(r["val_loss"] for r in rows if r["step"] == 6 and "val_loss" in r)
    assert (at_6 == short["val_loss"]) == (schedule == "constant"), (at_6, short["val_loss"])


def test_cluster_guide_shows_the_computed_isoflop_scale_plan(tmp_path):
    """docs/cluster.md's IsoFLOP table is what `--plan` prints for the shipped fluid-paper-isoflop spec."""
    from harness.scale_plan import format_plan, scale_plan
    from harness.sweep import load_spec

    spec = load_spec("fluid-paper-isoflop", out=tmp_path / "iso")
    text = format_plan(spec, scale_plan(spec))
    rows = [line for line in text.splitlines() if line.startswith("| ") or line.startswith("Total:")]
    assert len(rows) == 1 + 30 + 1
    guide = (Path(__file__).resolve().parents[1] / "docs" / "cluster.md").read_text()
    missing = [row for row in rows if row not in guide]
    assert not missing, f"docs/cluster.md is stale (run `fluidbench sweep fluid-paper-isoflop --plan`): {missing[0]}"


def test_envelope_keeps_the_points_no_cheaper_point_beats():
    from harness.isoflop_report import envelope

    points = pd.DataFrame({"flops": [1, 2, 2, 3, 4, 5], "loss": [5.0, 4.0, 4.5, 4.2, 3.0, 3.5],
                           "params": [10, 10, 20, 20, 40, 40], "variant": "vq-random"})
    front = envelope(points)
    assert front["flops"].tolist() == [1, 2, 4] and front["loss"].tolist() == [5.0, 4.0, 3.0]


def test_a_parameter_the_refits_never_move_is_flagged_not_reported_as_exact():
    from harness.isoflop_report import _parameter

    assert _parameter(9.46e-10, 9.46e-10, 9.46e-10).endswith("(flat: not identified)")
    assert "flat" not in _parameter(1.69, 1.42, 1.79)
