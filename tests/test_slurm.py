"""The cluster path on a real Slurm (the session's single-node slurmctld + slurmd, tests/conftest.py): the
micro sweep through the Slurm executor gives the local executor's table; a second invocation submits nothing;
a training job warned by Slurm (USR2) is requeued and resumes bit-identically; a failed training job leaves its
evaluations un-run and the report draws what finished; two srun tasks train as one process does."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

from harness import slurm
from harness.sweep import is_done, load_spec, plan, read_log
from test_sweep import MICRO
from test_train import _assert_same_state, cli_args, shared_inputs, tiny_values

ROOT = Path(__file__).resolve().parents[1]
TIMING = ["seconds_per_image"]  # measured, so never equal between two runs
# one CPU and a little memory per job: the micro sweep's jobs fit the local node two at a time
CPU_JOBS = "resources: {default: {gpus_per_node: 0, cpus_per_task: 1, mem_gb: 2, time_min: 10}}\n"

pytestmark = pytest.mark.slow


def _scontrol(job_id: str) -> dict[str, str]:
    out = subprocess.run(["scontrol", "show", "job", job_id], capture_output=True, text=True, timeout=60).stdout
    return dict(re.findall(r"(\w+)=(\S*)", out))


def _submitted(spec) -> list[str]:
    return [e["job"] for e in read_log(spec) if e["event"] == "submitted"]


@pytest.fixture(scope="module")
def micro(local_slurm, tmp_path_factory):
    """The micro sweep run twice: by the local executor, and through Slurm (submitted twice back to back)."""
    folder = tmp_path_factory.mktemp("micro")
    (folder / "micro.yaml").write_text(MICRO + CPU_JOBS)
    from harness.local import run_local

    local = load_spec(folder / "micro.yaml", out=folder / "local")
    assert set(run_local(local).values()) == {"done"}
    spec = load_spec(folder / "micro.yaml", out=folder / "slurm")
    ids = slurm.submit(spec)
    again = slurm.submit(spec)  # while the first invocation's jobs are queued or running
    status = slurm.wait(spec, ids, poll_s=1)
    return {"local": local, "spec": spec, "ids": ids, "again": again, "status": status}


def test_micro_sweep_on_slurm_gives_the_local_table_and_submits_each_job_once(micro):
    spec, ids = micro["spec"], micro["ids"]
    jobs = plan(spec)
    assert set(ids) == {j.name for j in jobs} and micro["status"] == {j.name: "done" for j in jobs}
    assert micro["again"] == ids  # the second invocation found every job queued: nothing new
    assert sorted(_submitted(spec)) == sorted(ids)
    table = pd.read_csv(spec.root / "runs.csv")
    local = pd.read_csv(micro["local"].root / "runs.csv")
    assert len(table) == 4 and not table.isna().any().any()
    pd.testing.assert_frame_equal(table.drop(columns=TIMING, errors="ignore"), local.drop(columns=TIMING, errors="ignore"))

    # what the dry run prints is what was submitted: every option a line of the job's sbatch script
    by_name = {j.name: j for j in jobs}
    for name, job_id in ids.items():
        job = by_name[name]
        params = slurm.executor_parameters(spec, job)
        params["additional_parameters"] = slurm.dependency(job, [ids[d] for d in job.deps])
        script = (spec.root / "slurm" / job_id / f"{job_id}_submission.sh").read_text().splitlines()
        assert {f"#SBATCH {o}" for o in slurm.sbatch_lines(params)} <= set(script), name

    # after the end: nothing to submit, nothing run again
    n = len(read_log(spec))
    assert slurm.submit(spec) == {}
    assert read_log(spec)[n:] == []


def test_failed_training_leaves_its_evaluations_unrun_and_the_report_draws_what_finished(micro):
    spec = micro["spec"]
    table = pd.read_csv(spec.root / "runs.csv")
    failing = "vq-random-cpu-s"
    run = spec.run_dir("vq-random", "cpu-s")
    for stamp in (spec.root / ".stages").glob(f"*{failing}.json"):
        stamp.unlink()
    subprocess.run(["rm", "-rf", str(run)], check=True)
    run.mkdir()
    (run / "checkpoints").write_text("not a folder")  # the trainer cannot save its first checkpoint: it fails
    ids = slurm.submit(spec)
    assert set(ids) == {f"train/{failing}", f"eval/fid/{failing}", f"eval/geneval/{failing}",
                        f"eval/grid/{failing}", "report"}
    status = slurm.wait(spec, ids, poll_s=1)
    assert status == {**{name: "failed" for name in ids}, "report": "done"}
    assert not (run / "eval").exists()  # cancelled by Slurm when their training failed, never started
    assert not list((spec.root / "slurm").glob(f"{ids[f'eval/fid/{failing}']}/*.out"))
    after = pd.read_csv(spec.root / "runs.csv")
    kept = table["run"] != failing
    pd.testing.assert_frame_equal(after[after["run"] != failing].drop(columns=TIMING, errors="ignore").reset_index(drop=True),
                                  table[kept].drop(columns=TIMING, errors="ignore").reset_index(drop=True),
                                  check_dtype=False)  # a NaN row makes integer columns float
    row = after[after["run"] == failing]
    assert row.empty or row[["val_loss", "fid", "geneval_overall"]].isna().all(axis=None)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    return shared_inputs(tmp_path_factory)


def test_a_training_job_warned_by_slurm_is_requeued_and_resumes_bit_identically(local_slurm, inputs, tmp_path):
    """USR2 (what Slurm sends `--signal` seconds before the time limit, or on preemption) mid-run: the trainer
    saves, submitit requeues the job, the requeued job resumes from that checkpoint and ends exactly where an
    uninterrupted run of the same settings does."""
    from harness.checkpoint import list_checkpoints, load_checkpoint
    from harness.config import RunConfig
    from harness.train import train

    values = tiny_values(inputs, tmp_path / "unused", variant="kl-random",
                         **{"train.steps": 120, "train.ckpt_every": 20, "train.log_every": 20, "train.val_every": 0,
                            "train.keep_last": 10})
    run = {k.removeprefix("train."): v for k, v in values.items() if k.startswith("train.")}
    spec_text = (f"name: requeue\ndata: {{kind: shapes, path: {inputs['data']}}}\n"
                 f"tokenizers: {{kl: {{path: {inputs['kl']}}}}}\ntext: {{encoder: minilm, max_length: 16}}\n"
                 "ladder: cpu\nvariants: [kl-random]\nsizes: [cpu-xs]\n"
                 f"run: {{train: {json.dumps(run)}, optim: {{lr: 1.0e-3, warmup_steps: 3}}, "
                 f"model: {{options: {json.dumps(values['model.options'])}}}}}\n" + CPU_JOBS)
    (tmp_path / "requeue.yaml").write_text(spec_text)
    spec = load_spec(tmp_path / "requeue.yaml", out=tmp_path / "sweep")
    job = next(j for j in plan(spec) if j.name == "train/kl-random-cpu-xs")
    out = Path(job.values["out"])

    ids = slurm.submit(spec, [job])
    job_id = ids[job.name]
    deadline = time.monotonic() + 300
    while not list_checkpoints(out):
        assert time.monotonic() < deadline and job_id in slurm.queued(), "no checkpoint in time"
        time.sleep(0.05)
    subprocess.run(["scancel", "--signal=USR2", job_id], check=True, timeout=60)
    while True:  # submitit's handler ran `scontrol requeue`: back in the queue, not before its BeginTime
        state = _scontrol(job_id)
        if state.get("Restarts", "0") != "0" and state.get("JobState") != "COMPLETING":
            break
        assert time.monotonic() < deadline, f"not requeued: {state}"
        time.sleep(0.2)
    # A requeued job waits two minutes before it may start again (Slurm's BeginTime): start it now, but not
    # within the second of the kill: slurmd revokes the killed run's credential to the second and refuses a
    # launch whose credential dates from that second ("Job credential revoked"; the job ends without running)
    time.sleep(2)
    state = _scontrol(job_id)
    while state.get("JobState") == "PENDING" and state.get("Reason") == "BeginTime":
        subprocess.run(["scontrol", "update", f"jobid={job_id}", "starttime=now"], capture_output=True, timeout=60)
        time.sleep(1)
        state = _scontrol(job_id)
    assert slurm.wait(spec, ids, poll_s=0.5) == {job.name: "done"}
    assert is_done(spec, job)

    log = "".join(p.read_text() for p in (spec.root / "slurm" / job_id).glob("*.err"))
    assert "signal 15: saved" in log, log[-3000:]  # the trainer saved when warned ...
    saved = [load_checkpoint(p) for p in list_checkpoints(out)]
    interrupted = [s["step"] for s in saved if s["status"] == "interrupted"]
    assert len(interrupted) == 1 and 0 < interrupted[0] < 120  # ... mid-run, then the requeued job resumed
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(20, 121, 20))

    reference = dict(job.values, out=str(tmp_path / "reference"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the Slurm job (cpus_per_task 1)
    try:
        train(RunConfig.from_overrides(reference))
    finally:
        torch.set_num_threads(threads)
    _assert_same_state(saved[-1], load_checkpoint(list_checkpoints(tmp_path / "reference")[-1]))
    assert saved[-1]["step"] == 120


def _losses(out: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["train_loss"] for r in rows if "train_loss" in r}


def test_two_srun_tasks_train_as_one_process_at_the_same_global_batch(local_slurm, inputs, tmp_path):
    """`srun -n 2 fluidbench train ...` with DDP, then FSDP2 (gloo): initialised from Slurm's environment alone,
    the losses of one process at the same global batch."""
    from harness.config import RunConfig
    from harness.train import train

    # vq-raster without text dropout draws nothing at random in its loss: the same maths in 1 or 2 processes
    more = {"train.steps": 4, "train.log_every": 1, "train.val_every": 4, "train.ckpt_every": 4,
            "model.options": {"text_dropout": 0.0}}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train(RunConfig.from_overrides(tiny_values(inputs, tmp_path / "one", variant="vq-raster", **more)))
    finally:
        torch.set_num_threads(threads)
    one = _losses(tmp_path / "one")
    assert list(one) == [1, 2, 3, 4] and one[1] != one[4]  # it did train
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                            "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    for strategy in ("ddp", "fsdp2"):
        two = tiny_values(inputs, tmp_path / strategy, variant="vq-raster", **more, **{"dist.strategy": strategy})
        cmd = ["srun", "--ntasks=2", "--cpus-per-task=1", "--mem=4G", "--time=10", "--kill-on-bad-exit=1",
               sys.executable, "-m", "harness", "train", *cli_args(two)]
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        summary = json.loads((tmp_path / strategy / "summary.json").read_text())
        assert summary["world_size"] == 2 and summary["strategy"] == strategy
        losses = _losses(tmp_path / strategy)
        assert list(losses) == list(one)
        for step in one:
            assert abs(one[step] - losses[step]) < 1e-5, (strategy, step, one[step], losses[step])
