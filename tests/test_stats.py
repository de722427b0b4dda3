"""Statistics that can fail: the paired per-prompt bootstrap, verdicts from intervals, the held-out check of a
scaling law, findings judged from run folders, and the loss-vs-compute envelope."""
from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest

from harness.stats import (FAILS, HOLDS, OPEN, Interval, PairedBootstrap, PromptScores, held_out_check,
                           read_prompt_scores)

TASKS = ("single_object", "two_object", "counting", "colors", "position", "color_attr")


def _scores(acc: np.ndarray) -> PromptScores:
    keys = [f"{i:05d}" for i in range(len(acc))]
    return PromptScores(dict(zip(keys, map(float, acc))), {k: TASKS[i % 6] for i, k in enumerate(keys)})


def _run(p: np.ndarray, per_prompt: int, rng: np.random.Generator) -> PromptScores:
    """A run scoring prompt i correct with probability p[i], `per_prompt` images each."""
    return _scores(rng.binomial(per_prompt, p) / per_prompt)


def test_interval_verdicts():
    assert Interval(0.1, 0.02, 0.2, "x").verdict(+1) == HOLDS
    assert Interval(0.1, 0.02, 0.2, "x").verdict(-1) == FAILS
    assert Interval(0.1, -0.02, 0.2, "x").verdict(+1) == OPEN
    assert Interval(0.1, math.nan, math.nan, "x").verdict(+1) == OPEN
    wide = Interval(0.1, 0.05, 0.15, "x").widened(0.05, "seeds")
    assert wide.lo == pytest.approx(0.1 - math.hypot(0.05, 1.96 * 0.05), rel=1e-3) and wide.verdict() == OPEN


def test_paired_bootstrap_is_narrower_than_independent_errors_when_prompts_set_the_difficulty():
    rng = np.random.default_rng(0)
    difficulty = rng.uniform(0, 1, 192)  # prompts easy or hard for both runs alike
    a, b = _run(np.clip(difficulty + 0.05, 0, 1), 8, rng), _run(difficulty, 8, rng)
    boot = PairedBootstrap(list(a.accuracy), a.task, n_boot=2000)
    d = boot.difference([(a, b)])
    assert d.estimate == pytest.approx(a.overall() - b.overall())
    assert d.lo < d.estimate < d.hi
    # unpaired: each run's own bootstrap SE, combined as independent
    se_a = np.std(boot._overall(boot._vector(a))[1], ddof=1)
    se_b = np.std(boot._overall(boot._vector(b))[1], ddof=1)
    assert boot.standard_error(a, b) < 0.6 * math.hypot(se_a, se_b)
    same = boot.difference([(a, a)])
    assert (same.estimate, same.lo, same.hi) == (0.0, 0.0, 0.0)


def test_paired_bootstrap_covers_the_true_difference_about_95_percent_of_the_time():
    rng = np.random.default_rng(1)
    difficulty = rng.uniform(0.1, 0.9, 192)
    truth = 0.04
    covered = 0
    for trial in range(100):
        a, b = _run(difficulty + truth, 4, rng), _run(difficulty, 4, rng)
        d = PairedBootstrap(list(a.accuracy), a.task, n_boot=400, seed=trial).difference([(a, b)])
        covered += d.lo <= truth <= d.hi
    assert 85 <= covered <= 100, covered


def test_paired_bootstrap_needs_shared_prompts():
    a = _scores(np.ones(12))
    b = PromptScores({k: v for k, v in list(a.accuracy.items())[:-1]}, a.task)
    with pytest.raises(ValueError, match="share their GenEval prompts"):
        PairedBootstrap(list(a.accuracy), a.task).difference([(a, b)])


def test_read_prompt_scores_groups_images_by_their_prompt_folder(tmp_path):
    rows = [{"filename": f"/x/geneval/{i:05d}/samples/{j}.png", "tag": TASKS[i % 6], "correct": (i + j) % 2 == 0,
             "metadata": json.dumps({"prompt": f"p{i}"})} for i in range(6) for j in range(4)]
    (tmp_path / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    scores = read_prompt_scores(tmp_path / "results.jsonl")
    assert scores.accuracy == {f"{i:05d}": 0.5 for i in range(6)} and scores.task["00002"] == "counting"


def test_held_out_check_predicts_an_exact_law_and_catches_a_bend():
    n = np.geomspace(1e5, 1e7, 5)
    loss = 3.0 * n ** -0.1 + 1.0
    check = held_out_check(n, loss, n_boot=200)
    assert check.offset and check.verdict() == HOLDS and abs(check.error) < 1e-3
    bent = loss.copy()
    bent[-1] *= 1.05  # the largest rung starved: it misses the law by 5%
    check = held_out_check(n, bent, n_boot=200)
    assert check.verdict() == FAILS and check.error == pytest.approx(-0.05 / 1.05, rel=0.05)
    # the seed spread of the measured loss widens the prediction enough to take it in
    assert held_out_check(n, bent, seed_sd=0.05 * bent[-1], n_boot=200).verdict() == HOLDS
    assert held_out_check(n[:2], loss[:2]) is None  # 2 points fit any law


# ---- findings from run folders ------------------------------------------------------------------------------

AXES = {"vq-raster": ("vq", "raster"), "vq-random": ("vq", "random"), "kl-raster": ("kl", "raster"),
        "kl-random": ("kl", "random")}


def _sweep(tmp_path, random_gain: float, seeds: int = 1) -> pd.DataFrame:
    """Run folders with GenEval results.jsonl for 4 variants x 2 sizes; random order gains `random_gain` per prompt
    probability over raster; a shared difficulty per prompt. Each run's images are drawn from a stream of its
    size, token kind and seed, so with no gain the two orders score exactly alike."""
    difficulty = np.random.default_rng(0).uniform(0.2, 0.6, 96)
    rows = []
    for variant, (kind, order) in AXES.items():
        for k, (size, n) in enumerate((("S", 1e5), ("L", 1e6))):
            for seed in range(seeds):
                rng = np.random.default_rng([k, kind == "kl", seed])
                run = f"{variant}-{size}" + (f"-seed{seed}" if seeds > 1 else "")
                p = np.clip(difficulty + (random_gain if order == "random" else 0) + (0.1 if size == "L" else 0), 0, 1)
                folder = tmp_path / "runs" / run / "eval" / "geneval"
                folder.mkdir(parents=True)
                lines, correct = [], []
                for i, pi in enumerate(p):
                    for j in range(4):
                        ok = bool(rng.random() < pi)
                        correct.append(ok)
                        lines.append(json.dumps({"filename": str(folder / f"{i:05d}" / "samples" / f"{j}.png"),
                                                 "tag": TASKS[i % 6], "correct": ok, "metadata": "{}"}))
                (folder / "results.jsonl").write_text("\n".join(lines) + "\n")
                overall = read_prompt_scores(folder / "results.jsonl").overall()
                rows.append(dict(run=run, variant=variant, size=size, seed=seed, token_kind=kind, order=order,
                                 params=n, params_nonembed=0.8 * n, val_loss=2.0 * n ** -0.1, fid=np.nan,
                                 geneval_overall=overall))
    return pd.DataFrame(rows)


@pytest.mark.parametrize("gain, verdict", [(0.15, HOLDS), (-0.15, FAILS), (0.0, OPEN)])  # 0: a tie
def test_random_order_finding_from_paired_per_prompt_results(tmp_path, gain, verdict):
    from harness.findings import judge

    table = _sweep(tmp_path, gain)
    finding = judge(table, tmp_path, n_boot=500)[2]
    assert finding.title.startswith("Random order gives better GenEval")
    assert finding.verdict == verdict, finding
    assert "paired bootstrap over 96 prompts" in finding.interval


def test_seeds_widen_the_interval_by_their_spread(tmp_path):
    from harness.findings import Evidence

    table = _sweep(tmp_path, 0.1, seeds=2)
    ev = Evidence(table, tmp_path, n_boot=500)
    pair = [(("kl-random", "L"), ("kl-raster", "L"))]
    with_seeds = ev.geneval_difference(pair)
    assert "seed spread" in with_seeds.method
    ev.seed_term = lambda cell, metric: (0.0, 2)  # the same evidence with the seeds' spread ignored
    without = ev.geneval_difference(pair)
    assert with_seeds.hi - with_seeds.lo > without.hi - without.lo


def test_power_law_finding_uses_the_held_out_rung_on_non_embedding_parameters():
    from harness.findings import fit_losses, judge, size_column

    n = np.geomspace(1e5, 1e7, 5)  # 4 rungs fitted with the offset, the 5th held out
    rows = [dict(run=f"{v}-{i}", variant=v, size=f"r{i}", seed=0, token_kind=k, order=o, params=x * 1.5 + 1e5,
                 params_nonembed=x, val_loss=3.0 * x ** -0.1 + 0.5)
            for v, (k, o) in AXES.items() for i, x in enumerate(n)]
    table = pd.DataFrame(rows)
    assert size_column(table) == "params_nonembed"
    fits = fit_losses(table, n_boot=20)
    assert all(f.c == pytest.approx(0.5, rel=0.01) for f in fits.values())  # 5 rungs: the offset is fitted
    assert judge(table, fits=fits)[0].verdict == HOLDS
    table.loc[table["size"] == "r4", "val_loss"] *= 1.1
    finding = judge(table, fits=fits)[0]
    assert finding.verdict == FAILS and "held-out error -9.09%" in finding.evidence


def test_two_step_prediction_follows_a_linear_loss_metric_map_and_catches_a_break():
    """Loss from a power law, GenEval linear in loss with noise: the largest rung's GenEval predicted in two steps
    lands inside its interval; a largest rung that beats the trend by 0.2 does not."""
    from harness.findings import two_step_predictions, two_step_rows

    rng = np.random.default_rng(0)
    n = np.geomspace(1e5, 1e7, 5)
    rows = []
    for i, x in enumerate(n):
        for seed in (0, 1):
            loss = 3.0 * x ** -0.1 + 0.5 + 0.002 * rng.standard_normal()
            rows.append(dict(run=f"v-{i}-{seed}", variant="kl-random", size=f"r{i}", seed=seed,
                             params_nonembed=x, params=x, val_loss=loss,
                             geneval_overall=1.8 - 1.2 * loss + 0.003 * rng.standard_normal(),
                             geneval_overall_se=0.003))
    table = pd.DataFrame(rows)
    (pred,) = two_step_predictions(table, n_boot=300)
    assert pred.runs == 8 and pred.slope == pytest.approx(-1.2, rel=0.1)
    assert pred.verdict() == HOLDS and abs(pred.error) < 0.02
    assert abs(pred.from_loss.estimate - pred.measured) < 0.02  # step 2 alone, at the measured loss
    table.loc[table["size"] == "r4", "geneval_overall"] += 0.2  # a jump the smaller rungs do not show
    (broken,) = two_step_predictions(table, n_boot=300)
    assert broken.verdict() == FAILS and broken.error == pytest.approx(-0.2, abs=0.03)
    assert two_step_rows(table)[0][-1] == FAILS
    assert two_step_predictions(table[table["size"].isin(["r0", "r1"])]) == []  # no held-out check: nothing


def test_envelope_follows_the_best_size_at_each_compute(tmp_path):
    from harness.curves import envelope, training_curves

    table = pd.DataFrame([dict(run="v-s", variant="v", size="s"), dict(run="v-l", variant="v", size="l")])
    for run, per_image, losses in (("v-s", 1.0, [3.0, 2.5, 2.4, 2.35]), ("v-l", 4.0, [3.2, 2.3, 2.0, 1.8])):
        folder = tmp_path / "runs" / run
        folder.mkdir(parents=True)
        (folder / "summary.json").write_text(json.dumps({"train_flops_per_image": per_image}))
        (folder / "config.json").write_text(json.dumps({"train": {"batch_size": 10}}))
        (folder / "metrics.jsonl").write_text("".join(json.dumps({"step": 100 * (k + 1), "val_loss": v}) + "\n"
                                                      for k, v in enumerate(losses)))
    curves = training_curves(tmp_path, table)
    assert len(curves) == 8 and curves["flops"].max() == 400 * 10 * 4.0
    edge = envelope(curves)
    assert list(edge["size"]) == ["s"] * 4 + ["l"] * 3  # the small model first, then the large
    assert edge["val_loss"].is_monotonic_decreasing
