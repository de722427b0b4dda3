"""The Slurm executor: every unfinished job of a sweep submitted through submitit, dependencies as `afterok`.

A training job asks for `nodes` x `gpus_per_node` GPUs with one srun task per GPU; harness/distributed.py reads
SLURM_PROCID / SLURM_STEP_NUM_TASKS / SLURM_LOCALID and the node list, so DDP or FSDP2 initialise from Slurm's
environment without torchrun. Evaluations wait for their training job (`afterok`, and `--kill-on-invalid-dep`
so that they leave the queue when it fails instead of pending forever), the report for everything (`afterany`,
so it draws whatever finished).

Preemption and time limits: Slurm signals the job (submitit asks for USR2, `signal_delay_s` before the end).
`SweepJob` forwards that signal to the trainer as SIGTERM, on which the trainer saves a checkpoint and returns;
then submitit's own handler requeues the job (`checkpoint` returns the same call), and the requeued job resumes
from that checkpoint. A job whose outputs already exist does nothing.

Only squeue is asked what is still queued (one call per invocation); sacct is never needed, so a cluster
without accounting works. `submitit.SlurmExecutor` is used directly (not `AutoExecutor`, which falls back to
running jobs on this machine when it finds no srun). submitit is imported only when submitting or running on a
node, so `--dry-run` works without it.
"""
from __future__ import annotations

import getpass
import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

from harness.atomic import write_json
from harness.errors import FluidbenchError
from harness.jobs import Job, TrainRun
from harness.plan import plan
from harness.spec import Resources, Spec
from harness.sweep import is_done, log_event, run_job, stamp, write_snapshot

ALIVE = {"PENDING", "RUNNING", "REQUEUED", "CONFIGURING", "COMPLETING", "RESIZING", "SUSPENDED", "REQUEUE_HOLD",
         "REQUEUE_FED", "STAGE_OUT", "SIGNALING", "STOPPED"}
SIGNAL_DELAY_S = 180  # time to write a checkpoint of the largest rung before the kill


def max_requeues(spec: Spec) -> int:
    """How many time limits a training job may run into and be requeued (submitit's `max_num_timeout`)."""
    return spec.cluster.max_requeues


def executor_parameters(spec: Spec, job: Job) -> dict[str, Any]:
    """`submitit.SlurmExecutor.update_parameters` for one job; each becomes one #SBATCH line (`sbatch_lines`)."""
    r: Resources = job.resources
    params: dict[str, Any] = {
        "job_name": f"{spec.name}:{job.name}",
        "nodes": r.nodes,
        "ntasks_per_node": r.tasks_per_node,
        "cpus_per_task": r.cpus_per_task,
        "mem": f"{r.mem_gb}GB",
        "time": r.time_min,
        "signal_delay_s": min(SIGNAL_DELAY_S, r.time_min * 15),  # at most a quarter of a short time limit
    }
    if r.gpus_per_node:
        params["gpus_per_node"] = r.gpus_per_node
    for key in ("partition", "account", "qos", "constraint"):
        if getattr(r, key):
            params[key] = getattr(r, key)
    return params


def dependency(job: Job, waits: list[str]) -> dict[str, str]:
    """The sbatch options that make `job` wait for the Slurm jobs `waits` (empty when there are none)."""
    if not waits:
        return {}
    kind = "afterany" if job.waits_for_any else "afterok"
    return {"dependency": f"{kind}:" + ":".join(waits), "kill-on-invalid-dep": "yes"}


def sbatch_lines(params: dict[str, Any]) -> list[str]:
    """The #SBATCH options submitit writes for these parameters (the same spelling as its sbatch script),
    besides its own log paths (--output, --error, --open-mode) and --wckey."""
    options = {k: v for k, v in params.items() if k not in ("signal_delay_s", "additional_parameters")}
    options["signal"] = f"USR2@{params['signal_delay_s']}"
    options.update(params.get("additional_parameters") or {})
    return [f"--{key.replace('_', '-')}={value}" for key, value in sorted(options.items())]


def dry_run_sbatch(spec: Spec, job: Job, pending: set[str]) -> str:
    """The sbatch options of one job as the dry run prints them; job ids of dependencies not known yet."""
    params = executor_parameters(spec, job)
    params["additional_parameters"] = dependency(job, [f"<{d}>" for d in job.deps if d in pending])
    return " ".join(sbatch_lines(params))


# ------------------------------------------------------------------------------------------- on the node
class SweepJob:
    """What runs on the node: one sweep job by name (the spec travels pickled with it)."""

    def __init__(self, spec: Spec, job_name: str):
        self.spec, self.job_name = spec, job_name

    def __call__(self) -> str:
        import torch

        if os.environ.get("SLURM_CPUS_PER_TASK"):  # the CPUs Slurm gave this task, not every core of the node
            torch.set_num_threads(int(os.environ["SLURM_CPUS_PER_TASK"]))
        job = next(j for j in plan(self.spec) if j.name == self.job_name)
        if is_done(self.spec, job) and not job.waits_for_any:  # the report was submitted again to redraw
            return "done already"
        if not isinstance(job, TrainRun):  # one task; on a signal submitit requeues it and it starts over
            run_job(self.spec, job)
            return "done"
        submitit_handler = signal.getsignal(signal.SIGUSR2)
        # Slurm's warning (USR2) becomes the trainer's SIGTERM: it saves a checkpoint and returns.
        signal.signal(signal.SIGUSR2, lambda *_: signal.raise_signal(signal.SIGTERM))
        t0 = time.time()
        job.run()  # every rank: srun started one task per GPU
        if all(Path(o).exists() for o in job.outputs):
            if int(os.environ.get("SLURM_PROCID", "0")) == 0:
                stamp(self.spec, job, time.time() - t0)
            return "done"
        if callable(submitit_handler):  # interrupted: submitit calls checkpoint(), requeues, exits (rank 0)
            submitit_handler(signal.SIGUSR2, None)
        return "interrupted"

    def checkpoint(self) -> Any:
        """Called by submitit on preemption or timeout: requeue the same call (the trainer resumes by itself)."""
        import submitit

        return submitit.helpers.DelayedSubmission(SweepJob(self.spec, self.job_name))


# ---------------------------------------------------------------------------------------- the cluster
def _slurm(*argv: str) -> str:
    """stdout of a Slurm command; a missing command or a controller that does not answer is one line."""
    try:
        out = subprocess.run(list(argv), capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError) as e:
        raise FluidbenchError(f"{argv[0]} failed ({e}); is Slurm installed here? (docs/cluster.md)") from None
    if out.returncode:
        why = (out.stderr.strip().splitlines() or [f"exit {out.returncode}"])[-1]
        raise FluidbenchError(f"{argv[0]} failed: {why} (is the Slurm controller up? `scontrol ping`)")
    return out.stdout


def queued() -> dict[str, str]:
    """Slurm job id -> state of this user's jobs still in the queue (one squeue call, no accounting needed)."""
    out = _slurm("squeue", "-h", "-u", getpass.getuser(), "-o", "%i|%T")
    states = dict(line.split("|", 1) for line in out.split() if "|" in line)
    return {job_id: state for job_id, state in states.items() if state in ALIVE}


def partitions() -> dict[str, dict[str, Any]]:
    """What the nodes of each partition offer: {name: {cpus, mem_mb, gpus, nodes, default}} (sinfo)."""
    found: dict[str, dict[str, Any]] = {}
    for line in _slurm("sinfo", "-h", "-o", "%P|%c|%m|%G|%D").split():
        name, cpus, mem, gres, count = line.split("|")
        gpus = sum(int(n) for n in re.findall(r"gpu(?::[^:(,]+)?:(\d+)", gres))
        part = found.setdefault(name.rstrip("*"), {"cpus": 0, "mem_mb": 0, "gpus": 0, "nodes": 0,
                                                   "default": name.endswith("*")})
        part["cpus"] = max(part["cpus"], int(cpus.rstrip("+")))
        part["mem_mb"] = max(part["mem_mb"], int(mem.rstrip("+")))
        part["gpus"] = max(part["gpus"], gpus)
        part["nodes"] += int(count)
    return found


def resource_problems(spec: Spec, jobs: list[Job], cluster: dict[str, dict[str, Any]]) -> list[str]:
    """Requests no node of their partition can meet, each naming its spec section (sbatch would only say
    'Requested node configuration is not available')."""
    sections = {f"resources.{kind}": spec.resources_for(kind) for kind in ("prep", "eval", "report")}
    sections.update({f"resources.train.{size}": spec.resources_for("train", size) for _, size in spec.runs()})
    default = next((name for name, p in cluster.items() if p["default"]), None)
    problems = []
    for job in jobs:
        r = job.resources
        where = next((w for w, section in sections.items() if section == r), "resources")
        name = r.partition or default
        if name not in cluster:
            problems.append(f"sweep spec {where}.partition: {name!r} is not a partition of this cluster "
                            f"(sinfo: {', '.join(cluster) or 'none'})")
            continue
        p = cluster[name]
        if r.gpus_per_node > p["gpus"]:
            has = f"{p['gpus']} GPUs per node" if p["gpus"] else "no GPUs"
            problems.append(f"sweep spec {where}.gpus_per_node: {r.gpus_per_node} (job {job.name}) but partition "
                            f"{name} has {has}" + ("; `gpus_per_node: 0` is a CPU job" if not p["gpus"] else ""))
        elif r.cpus_per_task * r.tasks_per_node > p["cpus"]:
            problems.append(f"sweep spec {where}.cpus_per_task: {r.cpus_per_task} x {r.tasks_per_node} task(s) "
                            f"(job {job.name}) but the nodes of partition {name} have {p['cpus']} CPUs")
        elif r.mem_gb * 1024 > p["mem_mb"]:
            problems.append(f"sweep spec {where}.mem_gb: {r.mem_gb} (job {job.name}) but the nodes of partition "
                            f"{name} have {p['mem_mb'] // 1024} GB")
        elif r.nodes > p["nodes"]:
            problems.append(f"sweep spec {where}.nodes: {r.nodes} (job {job.name}) but partition {name} has "
                            f"{p['nodes']} node(s)")
    return list(dict.fromkeys(problems))


# ------------------------------------------------------------------------------------------ submit, wait
def submit(spec: Spec, jobs: list[Job] | None = None) -> dict[str, str]:
    """Submit every unfinished job not already queued; returns {job name: Slurm job id}."""
    try:
        import submitit
        from submitit.core.utils import FailedJobError
    except ImportError:
        raise FluidbenchError("the slurm executor needs submitit: pip install 'fluidbench[cluster]'") from None
    jobs = plan(spec) if jobs is None else jobs
    todo = [j for j in jobs if not is_done(spec, j) or j.waits_for_any]
    problems = resource_problems(spec, todo, partitions()) if todo else []
    if problems:
        raise FluidbenchError(problems[0] + " (nothing submitted)")
    write_snapshot(spec)
    registry_path = spec.root / "slurm_jobs.json"
    registry = json.loads(registry_path.read_text()) if registry_path.is_file() else {}
    alive = queued() if registry else {}
    ids: dict[str, str] = {}
    for job in jobs:
        if is_done(spec, job) and not (job.waits_for_any and ids):  # redraw after new results
            continue
        previous = registry.get(job.name)
        if previous in alive:  # queued by an earlier invocation: wait for it, do not duplicate
            ids[job.name] = previous
            continue
        try:
            executor = submitit.SlurmExecutor(folder=spec.root / "slurm" / "%j", max_num_timeout=max_requeues(spec))
        except RuntimeError as e:  # no srun on PATH
            raise FluidbenchError(f"the slurm executor: {e} (try --dry-run, or docs/cluster.md for a local Slurm)") \
                from None
        params = executor_parameters(spec, job)
        waits = [ids[d] for d in job.deps if d in ids]
        params["additional_parameters"] = dependency(job, waits)
        executor.update_parameters(**params)
        try:
            submitted = executor.submit(SweepJob(spec, job.name))
        except FailedJobError as e:
            why = (str(e).strip().splitlines() or ["?"])[-1]
            raise FluidbenchError(f"sbatch refused {job.name}: {why} (jobs submitted so far are in "
                                  f"{registry_path})") from None
        ids[job.name] = str(submitted.job_id)
        registry[job.name] = ids[job.name]
        write_json(registry_path, registry)
        log_event(spec, "submitted", job.name, slurm_job=ids[job.name])
        print(f"submitted {job.name}: Slurm job {ids[job.name]}" + (f" after {', '.join(waits)}" if waits else ""),
              flush=True)
    if not ids:
        print(f"nothing to submit: every job of {spec.name} is done", flush=True)
    return ids


def wait(spec: Spec, ids: dict[str, str], poll_s: float = 10.0) -> dict[str, str]:
    """Wait until none of `ids` is queued; then {job name: "done" | "failed"}, decided by the job's outputs
    (as the local executor does), so no accounting (sacct) is needed. A failed job's log: SWEEP/slurm/<id>/."""
    by_name = {j.name: j for j in plan(spec)}
    waiting = dict(ids)
    while waiting:
        alive = queued()
        for name in [n for n, job_id in waiting.items() if job_id not in alive]:
            state = "done" if is_done(spec, by_name[name]) else "failed"
            print(f"{state} {name} (Slurm job {waiting.pop(name)})", flush=True)
        if waiting:
            time.sleep(poll_s)
    return {name: "done" if is_done(spec, by_name[name]) else "failed" for name in ids}
