"""Sweeps: a spec (harness/spec.py) -> a plan of typed jobs (harness/plan.py, harness/jobs.py) -> an executor.

This file keeps the books: which jobs are done, the settings stamp each finished job leaves, the lock that keeps
two processes off one job, the event log, and the dry run. Executors: harness/local.py runs the jobs on this
machine (one at a time in this process, or a few side by side in worker processes); harness/slurm.py submits
them through submitit with Slurm dependencies.

Idempotent: a job whose outputs exist and whose stamp (SWEEP/.stages/<job>.json, written when it finishes)
carries the same settings key is skipped; a training job that did not finish resumes from its run's latest
checkpoint (the trainer does that by itself); so killing a sweep and starting it again loses no finished work.
A job whose settings changed since it ran is an error naming the folder to delete, never a silent mix.
"""
from __future__ import annotations

import json
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

from harness.atomic import append_jsonl, read_jsonl, write_json
from harness.errors import FluidbenchError
from harness.jobs import Job, TrainRun
from harness.plan import plan  # noqa: F401 - the sweep's entry points, in one import
from harness.spec import Resources, Spec, load_spec  # noqa: F401


# -------------------------------------------------------------------------------------------- bookkeeping
def stamp_path(spec: Spec, job: Job) -> Path:
    return spec.root / ".stages" / f"{job.name.replace('/', '__')}.json"


def is_done(spec: Spec, job: Job) -> bool:
    """Outputs present and the stamp (if any) written for the same settings; stale settings are an error."""
    if not all(Path(o).exists() for o in job.outputs):
        return False
    stamp = stamp_path(spec, job)
    if stamp.is_file():
        recorded = json.loads(stamp.read_text()).get("key")
        if recorded != job.key:
            where = Path(job.outputs[0]).parent
            raise FluidbenchError(f"sweep job {job.name} finished earlier with other settings (stamp {stamp}); "
                                  f"delete {where} and {stamp} to redo it, or give the sweep another `out`")
    return True


def log_event(spec: Spec, event: str, job: str, **extra: Any) -> None:
    """One line per job event in SWEEP/sweep.log.jsonl: what ran, what was skipped, how long it took."""
    spec.root.mkdir(parents=True, exist_ok=True)
    append_jsonl(spec.root / "sweep.log.jsonl", {"time": time.time(), "event": event, "job": job, **extra})


def read_log(spec: Spec) -> list[dict]:
    path = spec.root / "sweep.log.jsonl"
    return read_jsonl(path) if path.is_file() else []


def run_job(spec: Spec, job: Job) -> None:
    """Run one job in this process and stamp it done (the same call on a laptop or a Slurm node)."""
    with job_lock(spec, job):
        t0, cpu0 = time.time(), time.process_time()
        job.run()
        missing = [o for o in job.outputs if not Path(o).exists()]
        if missing:
            raise FluidbenchError(f"sweep job {job.name} stopped without writing {missing[0]} (interrupted? run "
                                  "the sweep again to resume)")
        stamp(spec, job, time.time() - t0, cpu_s=time.process_time() - cpu0)


@contextmanager
def job_lock(spec: Spec, job: Job) -> Iterator[None]:
    """An exclusive lock per job, so two sweeps on one folder (or an orphaned worker) never run it twice."""
    import fcntl

    path = stamp_path(spec, job).with_suffix(".lock")
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise FluidbenchError(f"sweep job {job.name} is running in another process (lock {path})") from None
        except OSError:
            pass  # a file system without flock: run unlocked
        yield


def stamp(spec: Spec, job: Job, seconds: float, cpu_s: float | None = None) -> None:
    """Record that `job` finished with its current settings key (and its wall and CPU seconds, for budgets)."""
    write_json(stamp_path(spec, job), {"job": job.name, "key": job.key, "seconds": round(seconds, 1),
                                       "cpu_s": None if cpu_s is None else round(cpu_s, 1),
                                       "finished": time.strftime("%Y-%m-%d %H:%M:%S")})


def write_snapshot(spec: Spec) -> None:
    """SWEEP/sweep.json: the resolved spec the results came from (the report reads its name and note)."""
    write_json(spec.root / "sweep.json", spec.snapshot())


# ------------------------------------------------------------------------------------------------ dry run
def describe(spec: Spec, jobs: list[Job], executor: str,
             sbatch: Callable[[Job, set[str]], str] | None = None) -> str:
    """The dry run: every job with its state, resources (Slurm) and command; `sbatch(job, names of jobs not
    done)` gives a job's sbatch options (harness/slurm.py)."""
    lines = [f"sweep {spec.name}: {len(jobs)} jobs, {sum(isinstance(j, TrainRun) for j in jobs)} training runs, "
             f"out {spec.root}, executor {executor}"]
    todo = {job.name for job in jobs if not is_done(spec, job)}
    if sbatch:
        lines.append("sbatch: the #SBATCH options of each job (submitit adds its log paths); <job> = its Slurm id")
    for job in jobs:
        state = "todo" if job.name in todo else "done"
        r = job.resources
        where = (f"{r.nodes} node(s) x {r.gpus_per_node} GPU, {r.tasks_per_node} task(s)/node, "
                 f"{r.cpus_per_task} cpu/task, {r.mem_gb} GB, {r.time_min} min"
                 + (f", partition {r.partition}" if r.partition else ""))
        lines.append(f"{job.name}  [{state}]")
        lines.append(f"    resources: {where if executor == 'slurm' else 'this machine, in this process'}")
        if sbatch:
            lines.append(f"    sbatch:    {sbatch(job, todo)}")
        if job.deps:
            kind = "afterany" if job.waits_for_any else "afterok"
            deps = job.deps if len(job.deps) <= 6 else job.deps[:3] + [f"... {len(job.deps) - 3} more"]
            lines.append(f"    after:     {', '.join(deps)} ({kind})")
        lines.append(f"    command:   {job.command}")
    return "\n".join(lines)
