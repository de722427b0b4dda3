"""The Slurm executor: every unfinished job of a sweep submitted through submitit, dependencies as `afterok`.

A training job asks for `nodes` x `gpus_per_node` GPUs with one srun task per GPU; harness/distributed.py reads
SLURM_PROCID / SLURM_STEP_NUM_TASKS / SLURM_LOCALID and the node list, so DDP or FSDP2 initialise from Slurm's
environment without torchrun. Evaluations wait for their training job (`afterok`), the report for everything
(`afterany`, so it draws whatever finished).

Preemption and time limits: Slurm signals the job (submitit asks for USR2, `signal_delay_s` before the end).
`SweepJob` forwards that signal to the trainer as SIGTERM, on which the trainer saves a checkpoint and returns;
then submitit's own handler requeues the job (`checkpoint` returns the same call), and the requeued job resumes
from that checkpoint. A job whose outputs already exist does nothing. submitit is imported only here, only
when submitting or running on a node, so `--dry-run` works without it.
"""
from __future__ import annotations

import json
import os
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

ALIVE = {"PENDING", "RUNNING", "REQUEUED", "CONFIGURING", "COMPLETING", "RESIZING", "SUSPENDED"}


def executor_parameters(spec: Spec, job: Job) -> dict[str, Any]:
    """submitit `update_parameters` for one job (plain values: printed by the dry run, tested without Slurm)."""
    r: Resources = job.resources
    params: dict[str, Any] = {
        "name": f"{spec.name}:{job.name}",
        "nodes": r.nodes,
        "tasks_per_node": r.tasks_per_node,
        "cpus_per_task": r.cpus_per_task,
        "slurm_mem": f"{r.mem_gb}G",
        "timeout_min": r.time_min,
        "slurm_signal_delay_s": 180,   # time to write a checkpoint of the largest rung before the kill
        "slurm_max_num_timeout": spec.cluster.max_requeues,
    }
    if r.gpus_per_node:
        params["gpus_per_node"] = r.gpus_per_node
    for key in ("partition", "account", "qos", "constraint"):
        if getattr(r, key):
            params[f"slurm_{key}"] = getattr(r, key)
    return params


class SweepJob:
    """What runs on the node: one sweep job by name (the spec travels pickled with it)."""

    def __init__(self, spec: Spec, job_name: str):
        self.spec, self.job_name = spec, job_name

    def __call__(self) -> str:
        job = next(j for j in plan(self.spec) if j.name == self.job_name)
        if is_done(self.spec, job):
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


def _alive(job_id: str) -> bool:
    try:
        out = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%T"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return False
    return out.stdout.strip().split("\n")[0] in ALIVE


def submit(spec: Spec, jobs: list[Job] | None = None) -> dict[str, str]:
    """Submit every unfinished job not already queued; returns {job name: Slurm job id}."""
    try:
        import submitit
    except ImportError:
        raise FluidbenchError("the slurm executor needs submitit: pip install 'fluidbench[cluster]'") from None
    jobs = plan(spec) if jobs is None else jobs
    write_snapshot(spec)
    registry_path = spec.root / "slurm_jobs.json"
    registry = json.loads(registry_path.read_text()) if registry_path.is_file() else {}
    ids: dict[str, str] = {}
    for job in jobs:
        if is_done(spec, job) and not (job.waits_for_any and ids):  # redraw after new results
            continue
        previous = registry.get(job.name)
        if previous and _alive(previous):  # queued by an earlier invocation: wait for it, do not duplicate
            ids[job.name] = previous
            continue
        executor = submitit.AutoExecutor(folder=spec.root / "slurm" / "%j")
        params = executor_parameters(spec, job)
        waits = [ids[d] for d in job.deps if d in ids]
        if waits:
            kind = "afterany" if job.waits_for_any else "afterok"
            params["slurm_additional_parameters"] = {"dependency": f"{kind}:" + ":".join(waits)}
        executor.update_parameters(**params)
        submitted = executor.submit(SweepJob(spec, job.name))
        ids[job.name] = str(submitted.job_id)
        registry[job.name] = ids[job.name]
        write_json(registry_path, registry)
        log_event(spec, "submitted", job.name, slurm_job=ids[job.name])
        print(f"submitted {job.name}: Slurm job {ids[job.name]}" + (f" after {', '.join(waits)}" if waits else ""),
              flush=True)
    return ids
