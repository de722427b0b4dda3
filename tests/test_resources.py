"""Slurm resources without a Slurm: CPU jobs by default where no GPU is needed, the spec's resources checked
when it is read, the dry run's sbatch options the same as submitit's script, and requests a partition cannot
meet named by their spec section."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from harness.errors import FluidbenchError
from harness.sweep import load_spec, plan

ROOT = Path(__file__).resolve().parents[1]
EMBEDDED = (ROOT / "harness/specs/embedded.yaml").read_text()


def _spec(tmp_path, resources: str):
    path = tmp_path / "spec.yaml"
    path.write_text(EMBEDDED + "\nresources:\n" + resources)
    return load_spec(path, out=tmp_path / "out")


def test_prep_and_report_jobs_ask_for_no_gpu_unless_the_spec_says_so(tmp_path):
    jobs = {j.name: j for j in plan(load_spec("embedded", out=tmp_path / "e"))}
    for name in ("data", "tokenizer/vq", "cache/kl", "features", "ceiling/vq", "report"):
        assert jobs[name].resources.gpus_per_node == 0, name
    assert jobs["train/kl-random-cpu-xs"].resources.gpus_per_node == 1
    assert jobs["eval/fid/kl-random-cpu-xs"].resources.gpus_per_node == 1
    # `default` is the spec's word for every kind; a kind's own section and train.<size> go on top
    spec = _spec(tmp_path, "  default: {gpus_per_node: 0, cpus_per_task: 2}\n"
                           "  train: {default: {mem_gb: 8}, cpu-s: {gpus_per_node: 2}}\n")
    jobs = {j.name: j for j in plan(spec)}
    assert jobs["train/kl-random-cpu-xs"].resources.gpus_per_node == 0
    assert jobs["train/kl-random-cpu-xs"].resources.mem_gb == 8
    big = jobs["train/kl-random-cpu-s"].resources
    assert (big.gpus_per_node, big.tasks_per_node, big.cpus_per_task, big.mem_gb) == (2, 2, 2, 8)
    paper = {j.name: j for j in plan(load_spec("fluid-paper", out=tmp_path / "p"))}
    assert paper["cache/kl"].resources.gpus_per_node == 1 and paper["report"].resources.gpus_per_node == 0


@pytest.mark.parametrize("resources, message", [
    ("  trian: {nodes: 2}\n", r"unknown key 'resources.trian'"),
    ("  eval: {gpu: 1}\n", r"unknown key 'resources.eval.gpu'"),
    ("  eval: {gpus_per_node: -1}\n", r"resources.eval: gpus_per_node must be >= 0 \(0: a CPU job\)"),
    ("  default: {mem_gb: 4.5}\n", r"resources.default.mem_gb: expected int"),
    ("  train: {cpu-xxl: {nodes: 2}}\n", r"resources.train.cpu-xxl: not in the cpu ladder"),
    ("  train: {cpu-s: {time_min: 0}}\n", r"resources.train.cpu-s: time_min must be >= 1"),
    ("  report: {partition: 3}\n", r"resources.report.partition: expected str"),
])
def test_bad_resources_fail_when_the_spec_is_read(tmp_path, resources, message):
    with pytest.raises(FluidbenchError, match=message):
        _spec(tmp_path, resources)


def test_dry_run_sbatch_options_are_those_of_submitits_script(tmp_path):
    """Every option the dry run prints is a line of the sbatch script submitit writes for the same job."""
    from submitit.slurm.slurm import _make_sbatch_string

    from harness.slurm import dependency, executor_parameters, sbatch_lines

    spec = load_spec("fluid-paper", out=tmp_path / "paper")
    jobs = {j.name: j for j in plan(spec)}
    for name, waits in (("train/kl-random-10.5B", []), ("eval/fid/vq-raster-166M", ["12"]), ("report", ["3", "4"])):
        params = executor_parameters(spec, jobs[name])
        params["additional_parameters"] = dependency(jobs[name], waits)
        script = _make_sbatch_string(command="python -m submitit.core._submit x", folder=tmp_path, **params)
        options = {line.removeprefix("#SBATCH ") for line in script.splitlines() if line.startswith("#SBATCH")}
        ours = sbatch_lines(params)
        assert set(ours) <= options, set(ours) - options
        assert {o.split("=")[0] for o in options} - {o.split("=")[0] for o in ours} == \
            {"--output", "--error", "--open-mode", "--wckey"}  # submitit's own
    report = sbatch_lines({**executor_parameters(spec, jobs["report"]),
                           "additional_parameters": dependency(jobs["report"], ["3", "4"])})
    assert "--dependency=afterany:3:4" in report and "--kill-on-invalid-dep=yes" in report
    assert not any(o.startswith("--gpus-per-node") for o in report)  # a CPU job: no GPU option at all


def test_dry_run_prints_the_sbatch_options_of_every_job(tmp_path):
    out = subprocess.run([sys.executable, "-m", "harness", "sweep", "fluid-paper", "--executor", "slurm",
                          "--dry-run", "--out", str(tmp_path)], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = [line for line in out.stdout.splitlines() if line.startswith("    sbatch:    --")]
    assert len(lines) == sum(1 for line in out.stdout.splitlines() if line.endswith("  [todo]")) == 2 + 21 * 5 + 1
    train = next(line for line in out.stdout.split("\ntrain/kl-random-10.5B  [todo]\n")[1].splitlines()
                 if line.strip().startswith("sbatch:"))
    assert "--nodes=32 " in train and "--gpus-per-node=8 " in train and "--ntasks-per-node=8 " in train
    assert "--signal=USR2@180" in train and "--time=2880" in train and "--mem=900GB" in train
    fid = next(line for line in out.stdout.split("\neval/fid/kl-random-10.5B  [todo]\n")[1].splitlines()
               if line.strip().startswith("sbatch:"))
    assert "--dependency=afterok:<train/kl-random-10.5B>" in fid and "--kill-on-invalid-dep=yes" in fid


def test_requests_no_partition_can_meet_are_named_by_their_section(tmp_path):
    from harness.slurm import resource_problems

    spec = load_spec("fluid-paper", out=tmp_path / "paper")
    jobs = plan(spec)
    cpu_only = {"cpu": {"cpus": 64, "mem_mb": 512_000, "gpus": 0, "nodes": 4, "default": True}}
    problems = resource_problems(spec, jobs, cpu_only)
    assert any(p.startswith("sweep spec resources.train.10.5B.gpus_per_node: 8 (job train/kl-random-10.5B) but "
                            "partition cpu has no GPUs; `gpus_per_node: 0` is a CPU job") for p in problems)
    assert not any("resources.report" in p for p in problems)  # the report needs no GPU
    gpus = {"gpu": {"cpus": 96, "mem_mb": 2_000_000, "gpus": 8, "nodes": 300, "default": True}}
    assert resource_problems(spec, jobs, gpus) == []
    small = {"gpu": {**gpus["gpu"], "nodes": 16}}
    assert resource_problems(spec, jobs, small) == [
        "sweep spec resources.train.10.5B.nodes: 32 (job train/kl-random-10.5B) but partition gpu has 16 node(s)"]
    assert "not a partition" in resource_problems(spec, jobs, {"other": gpus["gpu"] | {"default": False}})[0]


def test_a_slurm_that_does_not_answer_is_one_line_and_nothing_is_submitted(tmp_path, monkeypatch):
    """No controller (or no Slurm at all): squeue and sinfo failing is an error naming the command, before any
    job is submitted; never a silent "not queued" that would submit every job a second time."""
    from harness import slurm

    conf = tmp_path / "slurm.conf"  # a controller on a closed port (answers "connect failure" at once)
    conf.write_text("ClusterName=x\nSlurmctldHost=localhost(127.0.0.1)\nSlurmctldPort=9\nMessageTimeout=1\n"
                    "TCPTimeout=1\nNodeName=localhost CPUs=1\nPartitionName=p Nodes=ALL\n")
    monkeypatch.setenv("SLURM_CONF", str(conf))
    with pytest.raises(FluidbenchError, match=r"^squeue failed"):
        slurm.queued()
    spec = load_spec("embedded", out=tmp_path / "e")
    (tmp_path / "e").mkdir()
    (tmp_path / "e" / "slurm_jobs.json").write_text('{"data": "1"}')
    with pytest.raises(FluidbenchError, match=r"^sinfo failed"):
        slurm.submit(spec)
    assert (tmp_path / "e" / "slurm_jobs.json").read_text() == '{"data": "1"}'
    assert not (tmp_path / "e" / "sweep.log.jsonl").exists()
