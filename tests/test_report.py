"""The scaling fits and the report: known exponents recovered, a report rendered from a fixture table."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from harness.report import COLUMNS, collect_run, findings, fit_losses, read_table, write_report
from harness.scaling import fit_power_law, pearson_r

SIZES = {"S": 1.0e5, "M": 4.0e5, "L": 1.6e6}
AXES = {"vq-raster": ("vq", "raster"), "vq-random": ("vq", "random"), "kl-raster": ("kl", "raster"),
        "kl-random": ("kl", "random")}
ALPHAS = {"vq-raster": 0.08, "vq-random": 0.10, "kl-raster": 0.12, "kl-random": 0.15}


@pytest.mark.parametrize("alpha", [0.05, 0.3, 0.76])
def test_power_law_recovers_exponent_from_noisy_points(alpha):
    rng = np.random.default_rng(0)
    n = np.geomspace(1e5, 1e9, 6)
    loss = 7.0 * n ** -alpha * np.exp(rng.normal(0, 0.003, n.size))
    fit = fit_power_law(n, loss, n_boot=200)
    assert fit.alpha == pytest.approx(alpha, rel=0.02)
    assert fit.alpha_lo <= fit.alpha <= fit.alpha_hi
    assert fit.r2 > 0.99


def test_power_law_with_offset_recovers_exponent_and_floor():
    n = np.geomspace(1e5, 1e9, 7)
    loss = 40.0 * n ** -0.3 + 0.9
    fit = fit_power_law(n, loss, offset=True, n_boot=50)
    assert fit.alpha == pytest.approx(0.3, rel=0.02)
    assert fit.c == pytest.approx(0.9, rel=0.02)
    plain = fit_power_law(n, loss, n_boot=0)
    assert plain.alpha < 0.2  # ignoring the floor flattens the slope: the offset option matters


def test_power_law_needs_two_sizes():
    with pytest.raises(ValueError, match="distinct positive sizes"):
        fit_power_law([1e6, 1e6], [2.0, 2.1])


def test_pearson():
    assert pearson_r([1, 2, 3, 4], [2, 4, 6, 8.5]) > 0.99
    assert np.isnan(pearson_r([1, 2], [3, 4]))


def fixture_table(fid_kl_better: bool = True) -> pd.DataFrame:
    rows = []
    for variant, (kind, order) in AXES.items():
        for size, n in SIZES.items():
            scale = 3.0 if kind == "vq" else 0.3  # losses of different kinds live on different scales
            fid = (10 if (kind == "kl") == fid_kl_better else 30) * n ** -0.05
            geneval = 0.3 + (0.15 if order == "random" else 0) + (0.05 if kind == "kl" else 0) + 0.02 * np.log10(n)
            row = dict(run=f"{variant}-{size}", variant=variant, size=size, token_kind=kind, order=order, params=n,
                       train_flops=n * 6 * 64 * 400, steps=400, tokens_seen=400 * 64 * 64,
                       val_loss=scale * n ** -ALPHAS[variant], fid=fid, geneval_overall=geneval,
                       seconds_per_image=0.01, forward_passes_per_image=32)
            for task in ("single_object", "two_object", "counting", "colors", "position", "color_attr"):
                row[f"geneval_{task}"] = geneval
            rows.append(row)
    return pd.DataFrame(rows)


def test_report_renders_from_fixture_table(tmp_path):
    fixture_table().to_csv(tmp_path / "runs.csv", index=False)  # no clip_score column, like the embedded sweep
    (tmp_path / "tokenizers" / "vq").mkdir(parents=True)
    (tmp_path / "tokenizers" / "vq" / "ceiling.json").write_text(json.dumps({"overall": 0.93, "counting": 0.81}))
    (tmp_path / "tokenizers" / "vq" / "metrics.json").write_text(json.dumps({"psnr": 29.5, "blank_psnr": 23.0}))
    (tmp_path / "runs" / "kl-random-S" / "eval").mkdir(parents=True)
    (tmp_path / "runs" / "kl-random-S" / "eval" / "samples.png").write_bytes(b"\x89PNG fake")
    out = write_report(tmp_path, n_boot=100)
    text = out.read_text()
    for png in ("loss_vs_params.png", "loss_vs_flops.png", "fid_vs_params.png", "geneval_vs_params.png"):
        assert (tmp_path / png).stat().st_size > 1000
        assert f"]({png})" in text
    assert "kl-random | 0.15" in text  # the fitted alpha of each variant, in the fit table
    assert "vq tokenizer ceiling** | 0.93" in text
    assert "| vq | 29.5 | 23 |" in text  # the tokenizer table: val PSNR, then the blank image's PSNR
    assert "runs/kl-random-S/eval/samples.png" in text
    assert "No values for clip_score" in text
    table = read_table(tmp_path)
    assert set(COLUMNS) <= set(table.columns) and table["clip_score"].isna().all()


POWER, KL_FID, RANDOM_GENEVAL, FLUID_BEST, GAINS, LOSS_QUALITY = range(6)  # harness.findings.judge's order


def test_findings_follow_the_numbers():
    from harness.report import GENEVAL_SE

    table = fixture_table()
    fits = fit_losses(table, n_boot=50)
    assert {v: round(f.alpha, 3) for v, f in fits.items()} == ALPHAS
    table[GENEVAL_SE], table["fid_se"] = 0.002, 0.05  # M - S: GenEval +0.012 +- 0.006; L - S: FID -0.7 +- 0.14
    verdicts = [f.verdict for f in findings(table, fits)]
    assert verdicts == ["holds"] * 6, verdicts
    flipped = fixture_table(fid_kl_better=False)
    flipped[GENEVAL_SE], flipped["fid_se"] = 0.002, 0.05
    assert findings(flipped, fits)[KL_FID].verdict == "does not hold"
    # without standard errors there is no interval: nothing about quality is decided
    verdicts = [f.verdict for f in findings(fixture_table(), fits)]
    assert verdicts[KL_FID] == "not resolved" and verdicts[RANDOM_GENEVAL] == "not measured"


def test_geneval_standard_error_and_verdicts_within_noise():
    from harness.report import GENEVAL_SE, geneval_standard_error

    # overall = mean of the task accuracies; each a binomial proportion: sqrt(0.25/64 + 0/64) / 2
    assert geneval_standard_error({"counting": [32, 64], "colors": [64, 64]}) == pytest.approx(0.5 / 8 / 2)
    assert geneval_standard_error({}) is None
    table = fixture_table()  # random order +0.15 GenEval over raster everywhere
    fits = fit_losses(table, n_boot=50)
    table[GENEVAL_SE] = 0.01
    finding = findings(table, fits)[RANDOM_GENEVAL]
    # the mean of 6 differences, each with SE sqrt(2) x 0.01: +0.150 +- 1.96 x 0.01 / sqrt(3)
    assert finding.verdict == "holds" and "+0.150 [+0.139, +0.161]" in finding.interval
    assert "kl S: random 0.600 vs raster 0.450 (+0.150 [+0.122, +0.178]" in finding.evidence
    table[GENEVAL_SE] = 0.2  # the pooled interval +-0.23 covers 0.15 and 0
    assert findings(table, fits)[RANDOM_GENEVAL].verdict == "not resolved"


def test_report_errors_name_the_file(tmp_path):
    from harness.errors import FluidbenchError

    with pytest.raises(FluidbenchError, match="runs.csv"):
        write_report(tmp_path)


def test_fid_verdict_uses_the_panel_standard_errors(tmp_path):
    table = fixture_table()  # kl FID a third of vq's everywhere (about 10 vs 30 at these sizes)
    fits = fit_losses(table, n_boot=50)
    table["fid_se"] = 0.5
    finding = findings(table, fits)[KL_FID]
    assert finding.verdict == "holds" and "bootstrap SE" in finding.interval
    # each pair's difference +- 1.96 x sqrt(2) x 0.5 = 1.39
    assert "random S: kl 5.6 vs vq 16.9 (-11.2 [-12.6, -9.9]" in finding.evidence
    table["fid_se"] = 15.0  # the mean of 6 differences (about -10.5) +- 1.96 x 15 / sqrt(3) = 17: not resolved
    assert findings(table, fits)[KL_FID].verdict == "not resolved"
    # the panel's columns come from fid.json, the floor from its `floor` entry; KID is drawn with its error bars
    run = tmp_path / "runs" / "kl-random-S"
    (run / "eval").mkdir(parents=True)
    (run / "config.json").write_text(json.dumps({"model": {"variant": "kl-random", "size": "S"}}))
    (run / "eval" / "fid.json").write_text(json.dumps({"fid": 12.0, "fid_se": 0.7, "kid": 0.01, "kid_se": 0.002,
                                                       "floor": {"fid": 1.5, "kid": 0.0001}}))
    row = collect_run(run)
    assert (row["fid"], row["fid_se"], row["kid_se"], row["fid_floor"], row["kid_floor"]) == (12.0, 0.7, 0.002,
                                                                                              1.5, 0.0001)
    table["kid"], table["kid_se"], table["fid_floor"], table["kid_floor"] = 0.02, 0.001, 1.5, 0.0001
    table.to_csv(tmp_path / "runs.csv", index=False)
    text = write_report(tmp_path, n_boot=20).read_text()
    assert "](kid_vs_params.png)" in text and "FID 1.5, KID 0.0001" in text


def test_report_shows_each_kl_runs_sampled_latents_beside_the_data(tmp_path):
    table = fixture_table()
    table.to_csv(tmp_path / "runs.csv", index=False)
    for run, std in (("kl-random-S", 1.1), ("kl-raster-S", 480.0)):  # in distribution, and a diverged sampler
        (tmp_path / "runs" / run / "eval").mkdir(parents=True)
        latents = {"sampled": {"std": std, "mean_abs": 0.8 * std, "max_abs": 5 * std, "values": 100},
                   "data": {"std": 1.0, "mean_abs": 0.8, "max_abs": 4.0, "values": 100}, "std_ratio": std}
        (tmp_path / "runs" / run / "eval" / "fid.json").write_text(json.dumps({"fid": 1.0, "latents": latents}))
    text = write_report(tmp_path, n_boot=20).read_text()
    section = text.split("## kl sampler")[1].split("##")[0]
    assert "| kl-random S | 1.1 | 1 | 1.1 |" in section and section.count("| yes |") == 1
    assert "| kl-raster S | 480 | 1 | 480 |" in section and section.count("**no**") == 1


def test_report_shows_each_vq_runs_paint_beside_the_data(tmp_path):
    table = fixture_table()
    table.to_csv(tmp_path / "runs.csv", index=False)
    for run, per_image in (("vq-random-S", 10.5), ("vq-raster-S", 20.4)):  # as much as the data, and twice
        (tmp_path / "runs" / run / "eval").mkdir(parents=True)
        paint = {"background_code": 3, "sampled_per_image": per_image, "data_per_image": 9.7,
                 "ratio": per_image / 9.7, "sampled_images": 500, "data_images": 500}
        (tmp_path / "runs" / run / "eval" / "fid.json").write_text(json.dumps({"fid": 1.0, "paint": paint}))
    text = write_report(tmp_path, n_boot=20).read_text()
    section = text.split("## vq sampler")[1].split("##")[0]
    assert "| vq-random S | 10.5 | 9.7 |" in section and section.count("| yes |") == 1
    assert "| vq-raster S | 20.4 | 9.7 |" in section and section.count("**more**") == 1


def test_a_second_seed_is_named_in_the_tables_and_the_grid_is_seed_zeros(tmp_path):
    table = fixture_table().assign(seed=0)
    extra = table[table["run"] == "kl-random-S"].assign(run="kl-random-S-seed1", seed=1, geneval_overall=0.777)
    pd.concat([table, extra]).to_csv(tmp_path / "runs.csv", index=False)  # the further seed's row last
    for run in ("kl-random-S", "kl-random-S-seed1"):
        (tmp_path / "runs" / run / "eval").mkdir(parents=True)
        (tmp_path / "runs" / run / "eval" / "samples.png").write_bytes(b"\x89PNG fake")
    text = write_report(tmp_path, n_boot=20).read_text()
    assert "| kl-random S seed 1 | 0.777 |" in text
    samples = text.split("## Samples")[1]
    assert "runs/kl-random-S/eval/samples.png" in samples and "seed1" not in samples


def test_report_puts_random_orders_context_curve_beside_the_raster_loss(tmp_path):
    table = fixture_table()
    table.to_csv(tmp_path / "runs.csv", index=False)
    raster = {kind: float(table[(table["run"] == f"{kind}-raster-S")]["val_loss"].iloc[0]) for kind in ("vq", "kl")}
    for kind, last in (("vq", raster["vq"] * 0.9), ("kl", raster["kl"] * 1.2)):  # below raster's; above
        (tmp_path / "runs" / f"{kind}-random-S" / "eval").mkdir(parents=True)
        ctx = {"known": [0, 8, 63], "loss": [2 * last, 1.5 * last, last], "context_gain": 0.5, "seq_len": 64}
        (tmp_path / "runs" / f"{kind}-random-S" / "eval" / "context.json").write_text(json.dumps(ctx))
    text = write_report(tmp_path, n_boot=20).read_text()
    section = text.split("## Random order: loss against the tokens known")[1].split("\n## ")[0]
    assert "| k = 0 | k = 8 | k = 63 |" in section
    vq = next(line for line in section.splitlines() if line.startswith("| vq-random S "))
    kl = next(line for line in section.splitlines() if line.startswith("| kl-random S "))
    assert vq.endswith("| yes |") and kl.endswith("| **no** |")
    assert "![context](context.png)" in section and (tmp_path / "context.png").stat().st_size > 0
