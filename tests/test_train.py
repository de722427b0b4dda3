"""The training loop on real variants and tiny data: run folder, exact resume after SIGKILL, clean exit on
SIGTERM, non-finite loss, settings that fail before any work, deterministic validation loss."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from harness.checkpoint import list_checkpoints, load_checkpoint
from harness.config import RunConfig
from harness.errors import FluidbenchError
from harness.train import EXIT_INTERRUPTED, EpochSampler, ema_decay, learning_rate, train

ROOT = Path(__file__).resolve().parents[1]


def tiny_inputs(root: Path) -> dict[str, Path]:
    """A 32-image ShapesT2I set and untrained (random) VQ and KL tokenizers with an 8x8 grid."""
    from harness.data.shapes import write_shapes
    from variants.tokenizer_train import TokenizerTrainConfig, build_tokenizer
    from variants.tokenizers import save_tokenizer

    root.mkdir(parents=True, exist_ok=True)
    write_shapes(root / "data", seed=0, n_train=32, n_val=8, prompts_per_task=1, progress=False)
    for kind in ("vq", "kl"):
        torch.manual_seed(0)
        tokenizer = build_tokenizer(TokenizerTrainConfig(kind=kind, widths=(8, 8, 8), latent_channels=4,
                                                         codebook_size=16))
        save_tokenizer(tokenizer, root / f"tok-{kind}")
    return {"data": root / "data", "vq": root / "tok-vq", "kl": root / "tok-kl"}


def tiny_values(inputs: dict[str, Path], out: Path, variant: str = "kl-random", **more) -> dict:
    """RunConfig values for a few-second run of the smallest rung, shrunk further by variant options."""
    kind = variant.split("-")[0]
    return {"out": str(out), "data.path": str(inputs["data"]), "tokenizer.path": str(inputs[kind]),
            "model.variant": variant, "model.size": "cpu-xs",
            "model.options": {"aligner_blocks": 1, "head_blocks": 1, "diffusion_batch_mul": 2},
            "train.steps": 12, "train.batch_size": 4, "train.log_every": 2, "train.val_every": 6,
            "train.ckpt_every": 2, "train.keep_last": 3, "train.val_size": 8, "train.val_batch_size": 4,
            "optim.lr": 1e-3, "optim.warmup_steps": 3, **more}


def cli_args(values: dict) -> list[str]:
    """The same values as `fluidbench train` arguments: the flags, then key=value for the rest."""
    flags = {"out": "--out", "model.variant": "--variant", "model.size": "--size", "data.path": "--data",
             "tokenizer.path": "--tokenizer", "train.steps": "--steps"}
    return [w for k, flag in flags.items() for w in (flag, str(values[k]))] \
        + [f"{k}={v}" for k, v in values.items() if k not in flags and k != "model.options"] \
        + [f"model.options.{k}={v}" for k, v in values["model.options"].items()]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models: threads only add contention (and subprocesses inherit the count, for bitwise equality)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, Path]:
    return shared_inputs(tmp_path_factory)


def shared_inputs(tmp_path_factory) -> dict[str, Path]:
    """tiny_inputs made once per test session (test_distributed uses them too), with their token caches."""
    root = tmp_path_factory.getbasetemp() / "train-inputs"
    if not (root / "tok-kl" / "tokenizer.json").exists():
        return tiny_inputs(root)
    return {"data": root / "data", "vq": root / "tok-vq", "kl": root / "tok-kl"}


@pytest.fixture(scope="module")
def reference(inputs, tmp_path_factory) -> dict:
    """An uninterrupted kl-random run (random orders, KL sampling, diffusion noise, text dropout)."""
    out = tmp_path_factory.mktemp("reference") / "run"
    summary = train(RunConfig.from_overrides(tiny_values(inputs, out)))
    return {"out": out, "summary": summary, "final": load_checkpoint(list_checkpoints(out)[-1])}


def _assert_same_state(a: dict, b: dict) -> None:
    assert a["step"] == b["step"]
    for part in ("model", "ema"):
        assert a[part].keys() == b[part].keys()
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), f"{part}.{k} differs"
    for name, sa in a["optimizer"]["state"].items():
        for k, v in sa.items():
            assert torch.equal(v, b["optimizer"]["state"][name][k]), f"optimizer {name}.{k} differs"


def _start(values: dict) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads()), "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, "-m", "harness", "train", *cli_args(values)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for_checkpoint(proc: subprocess.Popen, out: Path, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not list_checkpoints(out):
        assert proc.poll() is None, f"run ended before its first checkpoint: {proc.communicate()[1][-2000:]}"
        assert time.monotonic() < deadline, "no checkpoint in time"
        time.sleep(0.01)


def test_run_folder_summary_and_eval_loss(reference):
    out, summary = reference["out"], reference["summary"]
    assert json.loads((out / "config.json").read_text())["model"]["variant"] == "kl-random"
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 2, 4, 6, 8, 10, 12]
    assert [r["step"] for r in rows if "val_loss" in r] == [0, 6, 12]
    assert all(r["images_per_s"] > 0 and r["lr"] > 0 for r in rows if "train_loss" in r)
    for key in ("steps", "tokens_seen", "train_flops", "train_loss", "val_loss", "params", "wall_s", "images_per_s"):
        assert key in summary
    assert summary["steps"] == 12 and summary["tokens_seen"] == 12 * 4 * 64
    assert summary["train_flops"] == pytest.approx(summary["train_flops_per_image"] * 48)
    assert [p.name for p in list_checkpoints(out)] == [f"step_{s:08d}.pt" for s in (8, 10, 12)]  # last 3
    assert json.loads((out / "summary.json").read_text())["val_loss"] == summary["val_loss"]

    # `fluidbench eval loss` twice from the checkpoint: identical, and equal to the loss logged in training
    from harness.cli import main
    results = []
    for _ in range(2):
        with pytest.raises(SystemExit) as e:
            main(["eval", "loss", "--run", str(out)])
        assert e.value.code == 0
        results.append(json.loads((out / "eval" / "loss.json").read_text()))
    assert results[0]["val_loss"] == results[1]["val_loss"] == summary["val_loss"]
    assert results[0]["weights"] == "ema" and results[0]["step"] == 12


@pytest.mark.slow
def test_sigkill_then_resume_is_bitwise_identical(inputs, reference, tmp_path):
    values = tiny_values(inputs, tmp_path / "run")
    proc = _start(values)
    _wait_for_checkpoint(proc, tmp_path / "run")
    proc.kill()  # SIGKILL: no handler runs, whatever step it is in
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (tmp_path / "run" / "summary.json").exists()
    killed_at = load_checkpoint(list_checkpoints(tmp_path / "run")[-1])["step"]
    assert killed_at < 12

    summary = train(RunConfig.from_overrides(values))  # the same settings resume
    _assert_same_state(load_checkpoint(list_checkpoints(tmp_path / "run")[-1]), reference["final"])
    assert summary["train_loss"] == reference["summary"]["train_loss"]
    assert summary["val_loss"] == reference["summary"]["val_loss"]
    steps = [json.loads(line)["step"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(set(steps))  # rows logged after the checkpoint were dropped, then re-logged once


@pytest.mark.slow
def test_sigterm_saves_and_exits_cleanly(inputs, reference, tmp_path):
    values = tiny_values(inputs, tmp_path / "run", **{"train.ckpt_every": 4, "train.steps": 12})
    proc = _start(values)
    _wait_for_checkpoint(proc, tmp_path / "run")
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    state = load_checkpoint(list_checkpoints(tmp_path / "run")[-1])
    if state["step"] < 12:  # the signal arrived before the last step: an extra, interrupted checkpoint
        # saved, then a distinct non-zero status (EXIT_INTERRUPTED): `train && eval` must not go on
        assert proc.returncode == EXIT_INTERRUPTED, err[-2000:]
        assert state["status"] == "interrupted" and "interrupted at step" in err
        assert not (tmp_path / "run" / "summary.json").exists()
    else:
        assert proc.returncode == 0, err[-2000:]
    train(RunConfig.from_overrides(values))
    _assert_same_state(load_checkpoint(list_checkpoints(tmp_path / "run")[-1]), reference["final"])


def test_non_finite_loss_stops_with_last_good_checkpoint(inputs, tmp_path, monkeypatch):
    from variants.variant import Variant

    calls = {"n": 0}
    loss = Variant.forward

    def poisoned(self, *args, **kwargs):
        calls["n"] += 1 if self.training else 0
        value = loss(self, *args, **kwargs)
        return value * float("nan") if calls["n"] >= 5 else value

    monkeypatch.setattr(Variant, "forward", poisoned)
    values = tiny_values(inputs, tmp_path / "run", variant="vq-raster", **{"train.val_every": 0})
    with pytest.raises(FluidbenchError, match=r"train loss is nan by step 6 .*step_00000004\.pt kept"):
        train(RunConfig.from_overrides(values))
    assert [p.name for p in list_checkpoints(tmp_path / "run")] == ["step_00000002.pt", "step_00000004.pt"]


def test_non_finite_weights_are_never_saved_as_good(inputs, tmp_path, monkeypatch):
    """The loss is read before a step's update, the weights saved after it: an update that overflows the
    weights (the step's loss still finite) must not become the one checkpoint kept (keep_last 1)."""
    import harness.train as T

    calls = {"n": 0}
    step = T.train_step

    def overflowing(cfg, n, model, *args, **kwargs):
        out = step(cfg, n, model, *args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 5:
            with torch.no_grad():
                next(model.parameters()).fill_(float("inf"))
        return out

    monkeypatch.setattr(T, "train_step", overflowing)
    values = tiny_values(inputs, tmp_path / "run", variant="vq-raster",
                         **{"train.val_every": 0, "train.ckpt_every": 1, "train.log_every": 12, "train.keep_last": 1})
    with pytest.raises(FluidbenchError, match=r"weights are not finite at step 5 .*step_00000004\.pt kept"):
        train(RunConfig.from_overrides(values))
    (kept,) = list_checkpoints(tmp_path / "run")
    state = load_checkpoint(kept)
    assert kept.name == "step_00000004.pt"
    assert all(torch.isfinite(v).all() for part in ("model", "ema") for v in state[part].values())


@pytest.mark.parametrize("override, field", [
    ({"model.variant": "vq-diagonal"}, "model.variant"),
    ({"model.size": "cpu-xxl"}, "model.size"),
    ({"model.variant": "vq-raster"}, "tokenizer.path"),  # a kl tokenizer for a vq variant
    ({"train.batch_size": 0}, "train.batch_size"),
])
def test_bad_settings_fail_before_any_work(inputs, tmp_path, override, field):
    values = tiny_values(inputs, tmp_path / "run", **{"data.cache_dir": str(tmp_path / "cache")})
    values["tokenizer.path"] = str(inputs["kl"])
    with pytest.raises(FluidbenchError, match=field.replace(".", r"\.")) as e:
        train(RunConfig.from_overrides({**values, **override}))
    assert "\n" not in str(e.value)
    assert not (tmp_path / "cache").exists() and not (tmp_path / "run" / "config.json").exists()


def test_cli_error_is_one_line(inputs, tmp_path, capsys):
    from harness.cli import main

    with pytest.raises(SystemExit) as e:
        main(["train", "--variant", "kl-random", "--size", "cpu-xs", "--data", str(inputs["data"]),
              "--tokenizer", str(inputs["vq"]), "--out", str(tmp_path / "run")])
    assert e.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]  # earlier lines: library loading chatter
    assert last.startswith("error: config tokenizer.path") and last.endswith("needs kl tokens")


def test_resuming_with_other_settings_is_refused(reference):
    cfg = RunConfig.from_dict(json.loads((reference["out"] / "config.json").read_text()))
    cfg.model.variant = "kl-raster"
    with pytest.raises(FluidbenchError, match="model.variant='kl-random' but this run asks for 'kl-raster'"):
        train(cfg)
    cfg.model.variant = "kl-random"
    assert train(cfg) == reference["summary"]  # finished: the same command returns its summary


def test_schedule_ema_and_sampler():
    cfg = RunConfig.from_overrides({"optim.lr": 1.0, "optim.warmup_steps": 4, "train.steps": 14,
                                    "optim.schedule": "cosine", "optim.min_lr_ratio": 0.1})
    assert [learning_rate(cfg, s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert learning_rate(cfg, 9) == pytest.approx(0.55) and learning_rate(cfg, 14) == pytest.approx(0.1)
    assert ema_decay(cfg, 0) == pytest.approx(0.1) and ema_decay(cfg, 10**7) == cfg.optim.ema_decay
    scaled = RunConfig.from_overrides({"optim.lr": 1.0, "optim.warmup_steps": 4, "optim.lr_scale": 0.25})
    assert [learning_rate(scaled, s) for s in (0, 3, 100)] == [0.0625, 0.25, 0.25]
    with pytest.raises(FluidbenchError, match="optim.lr_scale=0.0: must be > 0"):
        RunConfig.from_overrides({"optim.lr_scale": 0.0}).validate()
    sampler = EpochSampler(10, 4, seed=3)
    seen = [sampler.next_batch() for _ in range(3)]
    assert len(set(torch.cat(seen[:2]).tolist())) == 8 and sampler.epoch == 1  # partial batch dropped
    state = sampler.state_dict()
    expected = sampler.next_batch()
    resumed = EpochSampler(10, 4, seed=3)
    resumed.load_state_dict(state)
    assert torch.equal(resumed.next_batch(), expected)
