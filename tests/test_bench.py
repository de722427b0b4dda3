"""`fluidbench bench` on a tiny setting: the JSON's schema, and forward passes counted by hooks against the
schedules (never timings: the machine is shared)."""
from __future__ import annotations

import json

import pytest
import torch

from harness.bench import (BenchConfig, Clock, Probe, Setting, check_targets, kv_cache_summary, measure_sampling,
                           run_bench, stand_in_tokenizer, write_bench)
from variants.registry import build_variant

STEPS = 4  # random-order reveal steps: fewer than the 16 tokens, so "passes == steps" differs from "== L"
TINY = Setting("16-tokens", "cpu", "cpu-xs", seq_len=16, vocab_size=64, token_dim=4, image_size=16, train_batch=4,
               sample_batch=2, head_steps=2, kv_batch=2, options={"steps": STEPS})


@pytest.fixture(scope="module")
def doc(tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models; the machine is shared
    try:
        # random text embeddings: importing transformers for MiniLM alone takes longer than this bench
        cfg = BenchConfig([TINY], reps=1, train_warmup=1, train_reps=2, threads=1, text_encoder="random")
        doc = run_bench(cfg, progress=False)
    finally:
        torch.set_num_threads(threads)
    path = write_bench(doc, tmp_path_factory.mktemp("bench"))
    return json.loads(path.read_text())  # what the file holds, not the dict in memory


def test_every_variant_has_training_and_both_sampling_modes(doc):
    assert doc["format"] == 1 and doc["wall_s"] > 0
    assert [r["variant"] for r in doc["results"]] == ["vq-raster", "vq-random", "kl-raster", "kl-random"]
    for key in ("torch", "threads", "cpu", "device", "loadavg_start", "loadavg_end"):
        assert key in doc["machine"]
    assert doc["config"]["settings"][0]["seq_len"] == 16 and doc["config"]["reps"] == 1
    for r in doc["results"]:
        t = r["train"]
        assert t["images_per_s"] > 0 and t["tokens_per_s"] == pytest.approx(16 * t["images_per_s"])
        assert 0 <= t["outside_forward_backward"] < 1 and t["flops_per_image"] > 0 and t["peak_memory_mib"] > 0
        assert r["params"]["total"] > 0
        for guidance in ("guided", "unguided"):
            m = r["sample"][guidance]
            assert m["seconds_per_image"] > 0 and m["end_to_end_seconds_per_image"] > m["seconds_per_image"]
            assert set(m["split"]) == {"text_encoder", "text_aligner", "backbone", "head", "other",
                                       "tokenizer_decode"}
            assert sum(m["split"].values()) == pytest.approx(1.0)
            assert m["flops_per_image"] > 0 and m["mfu"] is None  # no peak known for a CPU


def test_forward_passes_are_counted_and_match_the_schedules(doc):
    for r in doc["results"]:
        steps = STEPS if r["variant"].endswith("random") else 16  # raster always takes L steps
        for guidance, rows in (("guided", 2), ("unguided", 1)):
            m = r["sample"][guidance]
            assert m["counted"]["forward_passes"] == m["steps"] == steps
            assert m["counted"]["forward_passes_per_image"] == steps * rows  # guidance doubles the batch
            assert m["counts_match"]
            head = m["head_steps"] or 1  # a categorical head: one evaluation per token
            assert m["counted"]["head_evals_per_image"] == 16 * head * rows
        assert r["sample"]["guided"]["cfg_scale"] != 1.0 and r["sample"]["unguided"]["cfg_scale"] == 1.0
    assert doc["targets"]["forward_passes_match_schedule"]["ok"]


def test_kv_cache_comparison_runs_a_raster_variant_both_ways(doc):
    (kv,) = doc["kv_cache"]
    assert kv["variant"] in ("vq-raster", "kl-raster") and kv["batch_size"] == 2
    assert kv["with_cache"]["kv_cache"] and not kv["without_cache"]["kv_cache"]
    assert kv["without_cache"]["counted"]["forward_passes"] == 16 and kv["without_cache"]["counts_match"]
    assert kv["speedup"] > 0 and kv["without_cache"]["flops_per_image"] > kv["with_cache"]["flops_per_image"]
    assert doc["kv_cache_speedup_256"] is None  # no 256-token setting here: the key is there, empty
    assert kv["speedup_cpu_time"] > 0  # a CPU run: process CPU time next to wall time
    assert set(doc["targets"]) == {"forward_passes_match_schedule", "train_outside_forward_backward_lt_10pct",
                                   "kv_cache_speedup_256_ge_5"}
    assert doc["targets"]["kv_cache_speedup_256_ge_5"]["ok"] is False


def _tiny_variant(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_variant(name, "cpu-xs", seq_len=16, vocab_size=64, token_dim=4, text_dim=8, steps=STEPS).eval()


def test_an_extra_backbone_pass_is_caught():
    v = _tiny_variant("vq-random")
    original = v.order.sample

    def sample_with_an_extra_pass(variant, ctx, text_mask, **kwargs):
        tokens, stats = original(variant, ctx, text_mask, **kwargs)
        variant.backbone(torch.zeros(ctx.shape[0], 16, variant.backbone.width), ctx, text_mask, causal=False)
        return tokens, stats  # the stats do not know about the extra pass; the hook does

    v.order.sample = sample_with_an_extra_pass
    text, mask = torch.randn(2, 5, 8), torch.ones(2, 5, dtype=torch.bool)
    cfg = BenchConfig([TINY], reps=1)
    m = measure_sampling(v, text, mask, stand_in_tokenizer("vq", TINY, 0, torch.device("cpu")), cfg_scale=None,
                         head_steps=None, cfg=cfg, device=torch.device("cpu"))
    assert m["counted"]["forward_passes"] == STEPS + 1 and not m["counts_match"]
    doc = {"results": [{"setting": "s", "variant": "vq-random", "sample": {"guided": m},
                        "train": {"outside_forward_backward": 0.0}}],
           "kv_cache": [], **kv_cache_summary([])}
    assert not check_targets(doc)["forward_passes_match_schedule"]["ok"]


def test_probe_leaves_the_variant_as_it_found_it():
    v = _tiny_variant("kl-raster")
    with Probe(v, Clock(torch.device("cpu"))) as probe:
        v.sample(torch.randn(1, 5, 8), torch.ones(1, 5, dtype=torch.bool), head_steps=2, cfg_scale=1.0)
    assert len(probe.pass_rows) == 16 and probe.head_rows == 16 * 2
    assert probe.seconds["backbone"] > 0 and probe.seconds["head"] > 0
    assert "decode" not in vars(v.backbone) and "sample" not in vars(v.head)
    assert not v.backbone.blocks[0]._forward_pre_hooks


def test_cli_writes_the_json_and_prints_the_table(doc, tmp_path, monkeypatch, capsys):
    from harness import bench, cli
    monkeypatch.setattr(bench, "run_bench", lambda cfg, progress=True: dict(doc))
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["bench", "--quick", "--out", str(tmp_path), "--markdown"])
    assert exit_info.value.code == 0
    written = json.loads((tmp_path / "bench.json").read_text())
    assert written["results"] == doc["results"]
    assert written["command"] == f"fluidbench bench --quick --out {tmp_path} --markdown"
    out = capsys.readouterr().out
    assert "vq-random" in out and "| variant |" in out and "target forward_passes_match_schedule: ok" in out


@pytest.mark.parametrize("args, field", [(["--size", "huge"], "--size"), (["--tokens", "128"], "--tokens"),
                                         (["--dtype", "fp8"], "--dtype")])
def test_bad_options_are_one_line_errors(args, field, capsys):
    from harness import cli
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["bench", *args])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and field in err and "\n" not in err


def test_kv_speedup_is_taken_in_cpu_time_where_there_is_one():
    row = dict(seq_len=256, speedup=4.0, speedup_cpu_time=6.0)
    assert kv_cache_summary([row]) == dict(kv_cache_speedup_256=6.0, kv_cache_speedup_256_measure="cpu_time",
                                           kv_cache_speedup_256_wall=4.0, kv_cache_speedup_256_cpu_time=6.0)
    cuda = kv_cache_summary([row | dict(speedup_cpu_time=None)])  # a GPU: wall (device) time only
    assert cuda["kv_cache_speedup_256"] == 4.0 and cuda["kv_cache_speedup_256_measure"] == "wall"
    assert kv_cache_summary([row | dict(seq_len=64)])["kv_cache_speedup_256"] is None
