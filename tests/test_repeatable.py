"""Repeatability: a tiny sweep through every stage, run twice from clean results, gives the same results."""
from __future__ import annotations

import json

import pytest

from harness.sweep import load_spec

# Both token kinds and both orders, every stage (data, tokenizers, features, caches, ceilings, runs with periodic
# validation, FID, GenEval, sample grids, report); small enough to run twice.
TINY = """
name: tiny
data: {kind: shapes, shapes: {seed: 3, train: 96, val: 32, size: 32, prompts_per_task: 1}}
tokenizers:
  vq: {train: {steps: 4, seed: 1}}
  kl: {train: {steps: 4, seed: 1}}
text: {encoder: minilm, max_length: 16}
ladder: cpu
variants: [vq-random, kl-raster]
sizes: [cpu-xs]
run:
  train: {steps: 4, batch_size: 8, log_every: 2, val_every: 2, ckpt_every: 2, val_size: 16, val_batch_size: 8}
  optim: {lr: 1.0e-3, warmup_steps: 1}
features: {steps: 3, batch_size: 16}
eval:
  sampling: {steps: 4, head_steps: 3, batch_size: 16, seed: 0, x0_clip: 5.0}
  fid: {n: 16, extractor: shapes}
  geneval: {per_prompt: 1, detector: shapes-oracle, ceiling: true}
  clipscore: null
  grid: {prompts: [a photo of a red circle], per_prompt: 2}
local: {workers: 2, threads: 1}
report: {n_boot: 50}
"""
# Measurements of the machine, not results: they differ between any two runs.
TIMINGS = {"seconds_per_image", "wall_s", "train_s", "train_cpu_s", "steps_per_s", "eval_s", "images_per_s",
           "seconds", "sampling_seconds"}


def _strip(value, roots: tuple[str, ...]):
    """A JSON value without its timing fields (at any depth), the sweep's folder written as ROOT in paths."""
    if isinstance(value, dict):
        return {k: _strip(v, roots) for k, v in value.items() if k not in TIMINGS and not k.endswith("_s")}
    if isinstance(value, list):
        return [_strip(v, roots) for v in value]
    if isinstance(value, str):
        for root in roots:
            value = value.replace(root, "ROOT")
    return value


def _results(root) -> dict:
    """Everything a sweep measured: the table without timings, each run's summary and validation curve,
    evaluation results, tokenizer metrics and checksums, and the sample grids' bytes."""
    import pandas as pd

    roots = (str(root.resolve()), str(root))
    table = pd.read_csv(root / "runs.csv")
    out = {"runs.csv": table.drop(columns=[c for c in table.columns if c in TIMINGS]).to_dict("list"),
           "runs.csv bytes": (root / "runs.csv").read_bytes()}  # the file itself: its timings live in timings.csv
    for path in sorted(root.glob("runs/*/summary.json")) + sorted(root.glob("runs/*/eval/*.json")) \
            + sorted(root.glob("tokenizers/*/*.json")):
        out[str(path.relative_to(root))] = _strip(json.loads(path.read_text()), roots)
    for path in sorted(root.glob("runs/*/metrics.jsonl")):
        out[str(path.relative_to(root))] = [_strip(json.loads(line), roots)
                                            for line in path.read_text().splitlines()]
    for path in sorted(root.glob("runs/*/eval/samples.png")):
        out[str(path.relative_to(root))] = path.read_bytes()
    return out


@pytest.mark.slow
def test_two_sweeps_from_clean_results_measure_the_same(tmp_path, monkeypatch):
    from harness.local import run_local

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    (tmp_path / "tiny.yaml").write_text(TINY)
    results = []
    for name in ("a", "b"):
        spec = load_spec(tmp_path / "tiny.yaml", out=tmp_path / name)
        status = run_local(spec)  # two worker processes, jobs side by side as `make sweep` runs them
        assert set(status.values()) == {"done"}, status
        results.append(_results(spec.root))
    a, b = results
    assert a.keys() == b.keys() and len(a) > 15
    assert "val_loss" in a["runs.csv"] and "fid" in a["runs.csv"] and "geneval_overall" in a["runs.csv"]
    for key in a:
        assert a[key] == b[key], key
    # ...and the values are real measurements, not constants that would agree anyway
    assert len({round(v, 6) for v in a["runs.csv"]["val_loss"]}) == 2
    assert json.loads((tmp_path / "a" / "tokenizers" / "vq" / "metrics.json").read_text())["steps"] == 4
    # kl runs record their sampled latents' moments beside the data's (the sampler in distribution or not)
    latents = a["runs/kl-raster-cpu-xs/eval/fid.json"]["latents"]
    token_dim = a["tokenizers/kl/metrics.json"]["token_dim"]
    assert latents["data"]["std"] > 0 and latents["sampled"]["values"] == 16 * 64 * token_dim  # FID's 16 samples
    assert latents["std_ratio"] == latents["sampled"]["std"] / latents["data"]["std"]
    assert "latents" not in a["runs/vq-random-cpu-xs/eval/fid.json"]
    # ...and vq runs their non-background tokens per image beside the same real images' (the real tokenizer)
    paint = a["runs/vq-random-cpu-xs/eval/fid.json"]["paint"]
    assert paint["sampled_images"] == 16 and paint["data_images"] == 16 and paint["data_per_image"] > 0
    assert paint["ratio"] == paint["sampled_per_image"] / paint["data_per_image"]
    assert "paint" not in a["runs/kl-raster-cpu-xs/eval/fid.json"]
