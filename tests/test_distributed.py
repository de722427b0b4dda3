"""Scale-out on CPU (gloo): torchrun with DDP matches one process; FSDP2 runs and its checkpoint reloads
into one process; torchrun/Slurm environments; the global batch must split evenly."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from harness.config import RunConfig
from harness.distributed import DistInfo, environment, first_host, per_rank_batch
from harness.errors import FluidbenchError
from harness.train import train
from test_train import cli_args, shared_inputs, tiny_values

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, Path]:
    return shared_inputs(tmp_path_factory)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def torchrun(values: dict, nproc: int = 2) -> None:
    """`torchrun --nproc-per-node N -m harness train ...`: the real launcher, environment and CLI."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "-m", "harness", "train", *cli_args(values)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]


def metrics(out: Path) -> dict[int, dict]:
    return {r["step"]: r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())}


@pytest.mark.slow
def test_ddp_two_processes_match_one_process(inputs, tmp_path):
    # vq-raster without text dropout draws nothing at random in its loss, so the two runs see the same maths:
    # each process takes half of the same global batch, and DDP averages the gradients
    more = {"train.steps": 5, "train.log_every": 1, "train.val_every": 5, "train.ckpt_every": 5,
            "model.options": {"text_dropout": 0.0}}
    one = tiny_values(inputs, tmp_path / "one", variant="vq-raster", **more)
    two = tiny_values(inputs, tmp_path / "two", variant="vq-raster", **more)
    train(RunConfig.from_overrides(one))
    torchrun(two)
    m1, m2 = metrics(tmp_path / "one"), metrics(tmp_path / "two")
    assert list(m1) == list(m2) == [0, 1, 2, 3, 4, 5]
    for step in range(1, 6):
        assert abs(m1[step]["train_loss"] - m2[step]["train_loss"]) < 1e-5, step
    assert m1[1]["train_loss"] != m1[5]["train_loss"]  # it did train
    # validation batches are dealt to processes, each seeded by its index: the same number either way
    assert abs(m1[5]["val_loss"] - m2[5]["val_loss"]) < 1e-5
    s1, s2 = (json.loads((tmp_path / r / "summary.json").read_text()) for r in ("one", "two"))
    assert s2["world_size"] == 2 and s1["images_seen"] == s2["images_seen"] == 20


@pytest.mark.slow
def test_fsdp2_runs_and_its_checkpoint_reloads_into_one_process(inputs, tmp_path):
    from eval.loss import validation_loss
    from harness.cache import CachedSplit
    from harness.runs import load_run

    values = tiny_values(inputs, tmp_path / "run", variant="kl-random",
                         **{"train.steps": 4, "train.val_every": 4, "train.ckpt_every": 4,
                            "dist.strategy": "fsdp2", "dist.activation_checkpointing": True})
    torchrun(values)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["strategy"] == "fsdp2" and summary["steps"] == 4

    run = load_run(tmp_path / "run", device="cpu")  # full state dicts: a plain single-process model
    assert run.step == 4
    val = CachedSplit.open(run.config, "val", run.tokenizer, run.text_encoder, progress=False)
    cfg = run.config.train
    loss = validation_loss(run.variant.loss, val, batch_size=cfg.val_batch_size, seed=cfg.val_seed, size=cfg.val_size)
    assert abs(loss - summary["val_loss"]) < 1e-5  # computed by two FSDP2 processes during training

    # and training continues from it in one process (the strategy may change on resume)
    values.update({"train.steps": 6, "dist.strategy": "ddp", "dist.activation_checkpointing": False})
    resumed = train(RunConfig.from_overrides(values))
    assert resumed["steps"] == 6 and resumed["world_size"] == 1 and resumed["val_loss"] == resumed["val_loss"]


def test_environment_torchrun_and_slurm(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "SLURM_PROCID",
                 "SLURM_STEP_NUM_TASKS", "SLURM_LOCALID", "SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST", "SLURM_JOB_ID"):
        monkeypatch.delenv(name, raising=False)
    assert environment()["world_size"] == 1
    monkeypatch.setenv("SLURM_PROCID", "5")
    assert environment()["world_size"] == 1  # an sbatch script alone: one process, no srun step
    monkeypatch.setenv("SLURM_STEP_NUM_TASKS", "8")
    monkeypatch.setenv("SLURM_LOCALID", "1")
    monkeypatch.setenv("SLURM_STEP_NODELIST", "gpu[017-018]")
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    env = environment()
    assert (env["rank"], env["world_size"], env["local_rank"]) == (5, 8, 1)
    assert env["master_addr"] == "gpu017" and env["master_port"] == 24242
    monkeypatch.setenv("RANK", "1")  # torchrun's variables win
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("MASTER_PORT", "1234")
    env = environment()
    assert (env["rank"], env["world_size"], env["master_port"]) == (1, 2, 1234)
    assert first_host("node7") == "node7" and first_host("a[3,5],b1") == "a3"


def test_global_batch_splits_evenly():
    assert per_rank_batch(64, DistInfo(world_size=4)) == 16
    with pytest.raises(FluidbenchError, match=r"train\.batch_size=10 is not divisible by the world size 4"):
        per_rank_batch(10, DistInfo(world_size=4))
