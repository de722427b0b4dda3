"""Sweeps: the fluid-paper plan and its dry run, Slurm job construction and requeue, bookkeeping, and a micro
sweep end to end under the local executor (run twice: the second does no work)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import pytest

from harness.errors import FluidbenchError
from harness.jobs import Job
from harness.results import read_table
from harness.sweep import is_done, load_spec, plan, stamp

ROOT = Path(__file__).resolve().parents[1]


def test_fluid_paper_plan_has_21_training_runs_each_with_its_evaluations(tmp_path):
    spec = load_spec("fluid-paper", out=tmp_path / "paper")
    jobs = plan(spec)
    train = [j for j in jobs if j.stage == "train_run"]
    assert len(train) == 4 * 5 + 1
    assert {j.name for j in train} >= {"train/kl-random-10.5B", "train/vq-raster-166M", "train/kl-raster-3.1B"}
    assert "train/vq-raster-10.5B" not in {j.name for j in train}
    for job in train:
        run = job.name.removeprefix("train/")
        for metric in ("fid", "geneval", "clipscore", "grid"):
            ev = next(j for j in jobs if j.name == f"eval/{metric}/{run}")
            assert job.name in ev.deps
    report = jobs[-1]
    assert report.stage == "make_report" and len(report.deps) == 21 * 5
    # published tokenizers and data paths: nothing to prepare but the runs
    assert not [j for j in jobs if j.stage in ("make_data", "train_tokenizer")]


def test_fluid_paper_resources_and_slurm_parameters(tmp_path):
    from harness.slurm import executor_parameters, max_requeues

    spec = load_spec("fluid-paper", out=tmp_path / "paper")
    jobs = {j.name: j for j in plan(spec)}
    big = executor_parameters(spec, jobs["train/kl-random-10.5B"])
    assert big["nodes"] == 32 and big["gpus_per_node"] == 8 and big["ntasks_per_node"] == 8  # one task per GPU
    assert max_requeues(spec) >= 10 and big["signal_delay_s"] > 0
    small = executor_parameters(spec, jobs["eval/fid/vq-raster-166M"])
    assert small["nodes"] == 1 and small["ntasks_per_node"] == 1
    values = jobs["train/kl-random-3.1B"].args["values"]
    assert values["dist.strategy"] == "fsdp2" and values["train.batch_size"] == 2048
    assert values["model.ladder"] == "paper" and values["text.encoder"] == "t5"


def test_dry_run_prints_every_job_without_submitit(tmp_path):
    """The dry run must work where submitit is not installed: block its import in a fresh interpreter."""
    code = ("import sys; sys.modules['submitit'] = None; from harness.cli import main; "
            f"main(['sweep', 'fluid-paper', '--executor', 'slurm', '--dry-run', '--out', {str(tmp_path)!r}])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-2000:]
    text = out.stdout
    assert "21 training runs" in text
    assert text.count("command:   fluidbench train ") == 21
    assert text.count("\neval/geneval/") == 21 and text.count("\neval/fid/") == 21
    assert "32 node(s) x 8 GPU, 8 task(s)/node" in text
    assert "after:     train/kl-random-10.5B (afterok)" in text
    assert not (tmp_path / "slurm_jobs.json").exists()  # nothing submitted


def test_unknown_spec_and_bad_keys_are_one_line_errors(tmp_path):
    with pytest.raises(FluidbenchError, match="unknown sweep 'nope'.*embedded"):
        load_spec("nope")
    bad = tmp_path / "bad.yaml"
    bad.write_text((ROOT / "harness/specs/embedded.yaml").read_text().replace("sizes: [", "sizes: [cpu-huge, "))
    with pytest.raises(FluidbenchError, match="size 'cpu-huge' not in the cpu ladder"):
        load_spec(bad)
    bad.write_text("name: x\nvariants: [vq-raster]\nfrobnicate: 1\n")
    with pytest.raises(FluidbenchError, match="unknown key 'frobnicate'"):
        load_spec(bad)
    # an evaluation setting that eval_<metric> does not take fails at load, not after the training
    bad.write_text((ROOT / "harness/specs/embedded.yaml").read_text().replace("fid: {n: 500", "fid: {nn: 500"))
    with pytest.raises(FluidbenchError, match=r"eval.fid.nn: not a setting of eval_fid"):
        load_spec(bad)


def test_fluid_paper_reference_and_validation_data_are_coco_2014_train(tmp_path):
    """FID, CLIP score and validation loss read COCO-2014 train (30K), not the training shards."""
    from harness.config import RunConfig
    from harness.plan import eval_settings

    spec = load_spec("fluid-paper", out=tmp_path / "paper")
    for metric in ("fid", "clipscore"):
        settings = eval_settings(spec, metric, own_features=False)
        assert (settings["data_kind"], settings["split"], settings["n"]) == ("coco", "train2014", 30000)
    job = next(j for j in plan(spec) if j.name == "train/kl-random-166M")
    cfg = RunConfig.from_overrides(job.args["values"])
    assert cfg.data.source("val") == ("coco", "/datasets/coco", "train2014", 30000)
    assert cfg.data.source("train") == ("webdataset", "/datasets/t2i-webdataset", "train", None)


def test_stamp_with_other_settings_is_an_error_not_a_silent_skip(tmp_path):
    spec = load_spec("embedded", out=tmp_path / "e")
    job = next(j for j in plan(spec) if j.name == "features")
    assert not is_done(spec, job)
    Path(job.outputs[0]).parent.mkdir(parents=True)
    Path(job.outputs[0]).write_text("{}")
    assert is_done(spec, job)  # outputs made by hand (no stamp) count
    stamp(spec, job, 1.0)
    assert is_done(spec, job)
    job.key = "another-key"
    with pytest.raises(FluidbenchError, match="other settings"):
        is_done(spec, job)


def test_slurm_training_job_saves_on_preemption_then_requeues(tmp_path, monkeypatch):
    """USR2 (Slurm's warning) reaches the trainer as SIGTERM; the job then hands over to submitit's requeue."""
    from harness import train
    from harness.slurm import SweepJob

    spec = load_spec("embedded", out=tmp_path / "e")
    events = []

    def fake_train_run(cfg):  # the trainer: saves and returns on SIGTERM, no summary.json
        def on_term(signum, frame):
            events.append("trainer saved")
        previous = signal.signal(signal.SIGTERM, on_term)
        try:
            os.kill(os.getpid(), signal.SIGUSR2)
        finally:
            signal.signal(signal.SIGTERM, previous)

    def submitit_requeue(signum, frame):  # stands in for submitit's checkpoint-and-requeue handler
        events.append("requeued")

    monkeypatch.setattr(train, "train", fake_train_run)
    previous = signal.signal(signal.SIGUSR2, submitit_requeue)
    try:
        assert SweepJob(spec, "train/kl-random-cpu-xs")() == "interrupted"
    finally:
        signal.signal(signal.SIGUSR2, previous)
    assert events == ["trainer saved", "requeued"]
    resubmitted = SweepJob(spec, "train/kl-random-cpu-xs").checkpoint()
    assert resubmitted.function.job_name == "train/kl-random-cpu-xs"


MICRO = """
name: micro
data: {kind: shapes, shapes: {seed: 0, train: 192, val: 48, size: 32, prompts_per_task: 2}}
tokenizers:
  vq: {train: {steps: 3}}
  kl: {train: {steps: 3}}
text: {encoder: minilm, max_length: 16}
ladder: cpu
variants: [vq-random, kl-raster]      # both token kinds, both orders
sizes: [cpu-xs, cpu-s]
run:
  train: {steps: 4, batch_size: 8, log_every: 2, val_every: 0, ckpt_every: 2, val_size: 16, val_batch_size: 16}
  optim: {lr: 1.0e-3, warmup_steps: 1}
features: {steps: 5, batch_size: 16}
eval:
  sampling: {steps: 4, head_steps: 3, batch_size: 32, seed: 0}
  fid: {n: 16, extractor: shapes}
  geneval: {per_prompt: 1, detector: shapes-oracle, ceiling: true}
  clipscore: null
  grid: {prompts: [a photo of a red circle, a photo of two squares], per_prompt: 2}
local: {workers: 2, threads: 1}
report: {n_boot: 100}
"""


def _events(spec, since: int = 0) -> list[tuple[str, str]]:
    from harness.sweep import read_log

    return [(e["event"], e["job"]) for e in read_log(spec)[since:]]


@pytest.mark.slow
def test_micro_sweep_end_to_end_then_resume_then_no_work(tmp_path, monkeypatch):
    """Two variants x two tiny sizes through every stage; a lost result is redone (in a worker process) and
    nothing else; a third invocation does no work; the table is the same each time."""
    import pandas as pd

    from harness.local import run_local

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    (tmp_path / "micro.yaml").write_text(MICRO)
    spec = load_spec(tmp_path / "micro.yaml", out=tmp_path / "sweep")
    jobs = plan(spec)
    assert sum(j.stage == "train_run" for j in jobs) == 4

    status = run_local(spec, workers=1)  # in this process
    assert set(status.values()) == {"done"}, status
    root = spec.root
    table = read_table(root)  # runs.csv joined with timings.csv
    assert len(table.dropna(axis=1, how="all")) == 4
    measured = pd.read_csv(root / "runs.csv")
    assert not measured.isna().any().any()  # every column measured, no CLIP-score column
    assert "clip_score" not in measured.columns and "seconds_per_image" not in measured.columns  # timings.csv
    assert {"val_loss", "fid", "geneval_overall", "geneval_counting"} <= set(measured.columns)
    assert (table["seconds_per_image"] > 0).all()
    assert (root / "report.md").is_file() and (root / "loss_vs_params.png").is_file()
    assert json.loads((root / "tokenizers" / "kl" / "ceiling.json").read_text())["true_scenes_overall"] == 1.0
    for run in table["run"]:
        assert (root / "runs" / run / "eval" / "samples.png").is_file()

    # A sweep killed after an evaluation finished but before it was recorded: only that job and the report rerun
    lost = next(j for j in jobs if j.name == "eval/fid/kl-raster-cpu-s")
    Path(lost.outputs[0]).unlink()
    # ... and a GenEval killed part way through a batch: the prompts left are made as the whole run made them
    geneval = next(j for j in jobs if j.name == "eval/geneval/vq-random-cpu-xs")
    Path(geneval.outputs[0]).unlink()
    folder = Path(geneval.outputs[0]).parent / "geneval"
    pngs = {p: p.read_bytes() for p in sorted(folder.glob("*/samples/*.png"))}
    gone = [folder / f"{i:05d}" for i in (2, 5, 9)]
    for prompt in gone:
        for f in sorted(prompt.rglob("*"), reverse=True):
            f.rmdir() if f.is_dir() else f.unlink()
        prompt.rmdir()
    mtimes = {p: p.stat().st_mtime_ns for p in root.glob("runs/*/summary.json")}
    n = len(_events(spec))
    status = run_local(spec)  # the spec's 2 workers: the lost jobs run in worker processes
    redone = sorted(name for event, name in _events(spec, n) if event == "done")
    assert redone == ["eval/fid/kl-raster-cpu-s", "eval/geneval/vq-random-cpu-xs", "report"]
    assert all((prompt / "samples" / "0.png").is_file() for prompt in gone)
    assert {p: p.read_bytes() for p in sorted(folder.glob("*/samples/*.png"))} == pngs
    assert {p: p.stat().st_mtime_ns for p in root.glob("runs/*/summary.json")} == mtimes
    pd.testing.assert_frame_equal(read_table(root), table)

    n = len(_events(spec))
    before = (root / "runs.csv").stat().st_mtime_ns
    status = run_local(spec)
    assert set(status.values()) == {"skipped"} and len(status) == len(jobs)
    assert {e for e, _ in _events(spec, n)} == {"skip"}
    assert (root / "runs.csv").stat().st_mtime_ns == before


calls = []


@dataclass(kw_only=True)
class Work(Job):
    """A job that writes its one output (and says so in `calls`), or fails."""

    what: str = ""
    fails: bool = False

    def run(self) -> None:
        if self.fails:
            raise FluidbenchError("data went wrong")
        calls.append(self.what)
        Path(self.outputs[0]).parent.mkdir(parents=True, exist_ok=True)
        Path(self.outputs[0]).write_text("ok")


@dataclass(kw_only=True)
class Report(Work):
    waits_for_any: ClassVar[bool] = True


def test_a_failed_job_blocks_its_dependents_and_the_report_still_runs(tmp_path):
    from harness.local import run_local

    spec = load_spec("embedded", out=tmp_path / "e")
    calls.clear()
    out = tmp_path / "e"
    jobs = [Work(name="data", outputs=[str(out / "d")], fails=True),
            Work(name="train/a", outputs=[str(out / "a")], deps=["data"], what="train"),
            Work(name="train/b", outputs=[str(out / "b")], what="train"),
            Report(name="report", outputs=[str(out / "r")], deps=["train/a", "train/b"], what="report")]
    status = run_local(spec, jobs, workers=1)
    assert status == {"data": "failed", "train/a": "blocked", "train/b": "done", "report": "done"}
    assert calls == ["train", "report"]
    assert not (out / ".stages" / "data.json").exists() and (out / ".stages" / "train__b.json").exists()


def test_scale_plan_follows_the_flop_accounting(tmp_path):
    from harness.scale_plan import format_plan, plan_run

    spec = load_spec("fluid-paper", out=tmp_path / "paper")
    big = plan_run(spec, "kl-random", "10.5B")
    small = plan_run(spec, "kl-random", "1.1B")
    assert big.strategy == "fsdp2" and small.strategy == "ddp"
    assert big.params > 10e9 and big.gpus == 256
    peak = spec.cluster.peak_tflops * 1e12 * spec.cluster.mfu * 3600
    assert big.gpu_hours == pytest.approx(big.train_flops / peak + big.text_gpu_hours, rel=1e-9)
    assert small.mem_state_gb == pytest.approx(20 * small.params / 1e9)  # DDP: the full state on every GPU
    assert big.mem_state_gb == pytest.approx(20 * big.params / 1e9 / 256)  # FSDP2: sharded
    assert big.mem_total_gb < spec.cluster.gpu_mem_gb
    text = format_plan(spec, [small, big])
    assert "| kl-random 10.5B | 10.93B |" in text and "GPU-hours" in text


def test_readme_and_cluster_guide_show_the_computed_scale_plan(tmp_path):
    """The scale-plan tables in README.md and docs/cluster.md are what `--plan` prints for the shipped spec."""
    from harness.scale_plan import format_plan, scale_plan

    spec = load_spec("fluid-paper", out=tmp_path / "paper")
    rows = [line for line in format_plan(spec, scale_plan(spec)).splitlines() if line.startswith("| ")]
    assert len(rows) == 1 + 21
    for doc in ("README.md", "docs/cluster.md"):
        text = (ROOT / doc).read_text()
        missing = [row for row in rows if row not in text]
        assert not missing, f"{doc} is stale (run `fluidbench sweep fluid-paper --plan`): {missing[0]}"


@pytest.mark.parametrize("name", ["embedded", "embedded-isoflop"])
def test_the_scale_plan_costs_every_training_run_the_sweep_plans(tmp_path, name):
    """One plan per TrainRun / TrainCell job, further seeds included: a second seed costs as much again."""
    from harness.jobs import TrainCell, TrainRun
    from harness.scale_plan import scale_plan

    spec = load_spec(name, out=tmp_path / name)
    runs = [j for j in plan(spec) if isinstance(j, (TrainRun, TrainCell))]
    plans = scale_plan(spec)
    assert len(plans) == len(runs)
    if name == "embedded":
        seeded = [p for p in plans if p.seed]
        assert seeded and all(p.seed == 1 and p.size == "cpu-2xs" for p in seeded)
        first = {(p.variant, p.size): p for p in plans if not p.seed}
        assert all(p.train_flops == first[(p.variant, p.size)].train_flops for p in seeded)


def test_exclusive_jobs_wait_for_the_whole_machine_and_hold_the_queue(tmp_path):
    """local.exclusive: a matching job starts only when every worker is free, with all their threads, and the
    jobs behind it wait (no starvation by a stream of small jobs)."""
    from queue import SimpleQueue
    from types import SimpleNamespace

    from harness.local import _schedule

    class Book:
        def waiting(self, job):
            return False

        def settle(self, job):
            return False

        def started(self, job):
            pass

    jobs = {name: Job(name=name, outputs=[]) for name in ("tokenizer/vq", "cache/vq", "train/x")}
    pool = SimpleNamespace(inboxes=[SimpleQueue(), SimpleQueue()])
    busy = {0: (jobs["cache/vq"], 0.0, 1)}
    pending = [jobs["tokenizer/vq"], jobs["train/x"]]
    _schedule(Book(), pool, busy, pending, 2, 3, ["tokenizer/*"], tmp_path)
    assert pending == [jobs["tokenizer/vq"], jobs["train/x"]] and list(busy) == [0]  # held, and so is train/x

    busy.clear()
    _schedule(Book(), pool, busy, pending, 2, 3, ["tokenizer/*"], tmp_path)
    job, threads, _ = pool.inboxes[0].get_nowait()
    assert job.name == "tokenizer/vq" and threads == 2 * 3 and busy[0][2] == 2
    assert pending == [jobs["train/x"]] and pool.inboxes[1].empty()  # the machine is full


ORPHAN = """
import os, signal, sys, time, threading
from pathlib import Path

def child(folder):
    from harness.local import _exit_with_parent
    def stopped(signum, frame):  # as a trainer: save, then return
        Path(folder, "stopped").write_text(str(os.getpid()))
        sys.exit(0)
    signal.signal(signal.SIGTERM, stopped)
    _exit_with_parent(threading.Event(), grace_s=30, poll_s=0.1)
    Path(folder, "ready").write_text(str(os.getpid()))
    time.sleep(60)

if __name__ == "__main__":
    import multiprocessing
    folder = sys.argv[1]
    proc = multiprocessing.get_context("spawn").Process(target=child, args=(folder,), daemon=True)
    proc.start()
    while not Path(folder, "ready").exists():
        time.sleep(0.05)
    os.kill(os.getpid(), signal.SIGKILL)  # the sweep dies without cleaning up
"""


def test_a_worker_stops_its_job_when_the_sweep_is_killed(tmp_path):
    """SIGKILL the sweep process: its worker gets the SIGTERM a clean stop would send, instead of running on
    as an orphan beside the next invocation."""
    script = tmp_path / "orphan.py"
    script.write_text(ORPHAN)
    out = subprocess.run([sys.executable, str(script), str(tmp_path)], cwd=ROOT, timeout=120,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == -signal.SIGKILL
    child = int((tmp_path / "ready").read_text())
    deadline = time.time() + 20
    while not (tmp_path / "stopped").exists() and time.time() < deadline:
        time.sleep(0.1)
    assert (tmp_path / "stopped").read_text() == str(child)


def test_panel_metrics_of_their_own_wait_for_fids_samples(tmp_path):
    """fd_dinov2 and cmmd reuse RUN/eval/fid/samples.npy: in a sweep they run after the same run's FID job, so
    the samples are made once, not by two jobs at once; their columns join the table."""
    from harness.plan import table_columns

    spec_file = tmp_path / "panel.yaml"
    spec_file.write_text((ROOT / "harness/specs/fluid-paper.yaml").read_text().replace(
        "  geneval:\n", "  fd_dinov2: {protocol: fluid, data_path: /datasets/coco, weights: /checkpoints/d.pth}\n"
                      "  cmmd: {protocol: fluid, data_path: /datasets/coco}\n  geneval:\n", 1))
    spec = load_spec(spec_file, out=tmp_path / "paper")
    jobs = {j.name: j for j in plan(spec)}
    for metric in ("fd_dinov2", "cmmd"):
        assert jobs[f"eval/{metric}/kl-random-166M"].deps == ["train/kl-random-166M", "eval/fid/kl-random-166M"]
    assert jobs["eval/fid/kl-random-166M"].deps == ["train/kl-random-166M"]
    assert {"fd_dinov2", "fd_dinov2_se", "cmmd", "cmmd_se", "kid_se"} <= set(table_columns(spec))
    assert "--protocol fluid" in jobs["eval/cmmd/kl-random-166M"].command


def test_per_variant_values_reach_only_that_variant(tmp_path):
    """per_variant values reach only that variant's runs and its extra seeds (per_size still wins over them); an
    unknown variant there is a one-line error."""
    import yaml

    from harness.config import RunConfig

    values = yaml.safe_load((ROOT / "harness/specs/embedded.yaml").read_text())
    size = values["sizes"][0]
    values["per_variant"] = {"vq-raster": {"model": {"options": {"cfg_scale": 7.5}}, "optim": {"weight_decay": 0.5},
                                           "train": {"steps": 9}}}
    values["per_size"] = {size: {"train": {"steps": 7}}}
    values["extra_runs"] = [{"variant": "vq-raster", "size": size, "seeds": 2}]
    spec_file = tmp_path / "s.yaml"
    spec_file.write_text(yaml.safe_dump(values))
    jobs = {j.name: j for j in plan(load_spec(spec_file, out=tmp_path / "out"))}
    for name in (f"train/vq-raster-{size}", f"train/vq-raster-{size}-seed1"):
        cfg = RunConfig.from_overrides(jobs[name].args["values"])
        assert cfg.model.options["cfg_scale"] == 7.5 and cfg.optim.weight_decay == 0.5 and cfg.train.steps == 7
    other = RunConfig.from_overrides(jobs[f"train/vq-random-{size}"].args["values"])
    assert "cfg_scale" not in other.model.options and other.optim.weight_decay != 0.5
    spec_file.write_text(yaml.safe_dump({**values, "per_variant": {"vq-nope": {}}}))
    with pytest.raises(FluidbenchError, match="per_variant.vq-nope"):
        load_spec(spec_file)
