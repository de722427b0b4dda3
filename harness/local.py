"""The local executor: the jobs of a sweep on this machine, one at a time or a few side by side.

With `workers: 1` (the default) each job runs in this process, its own progress bars on the terminal. With
`local.workers: N` in the spec, up to N jobs run at once in N long-lived worker processes (each imports torch
once), with `local.threads` torch threads each and the output of every job in SWEEP/logs/<job>.log; small
models use one core far better as N processes than as N threads of one. Jobs matching `local.exclusive` (e.g.
the time-budgeted tokenizers) run alone with every thread. Every `local.status_every` seconds a line per running
job shows its latest progress.

A failed job blocks the jobs that wait for it; the others go on, so one diverging run does not cost the
rest, and the report is drawn from whatever finished. Ctrl-C stops the running jobs with SIGTERM (a trainer
saves a checkpoint) and the next invocation resumes; so does SIGTERM to the sweep. Workers watch the sweep
process: if it dies without warning (SIGKILL, a lost terminal), they stop their job the same way and exit, so
no orphan keeps writing into a run that the next invocation is resuming.
"""
from __future__ import annotations

import multiprocessing
import os
import re
import queue
import signal
import sys
import threading
import time
import traceback
from fnmatch import fnmatch
from pathlib import Path

from harness.sweep import Job, Spec, is_done, log_event, plan, run_job, write_snapshot

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _clock(seconds: float) -> str:
    return f"{int(seconds // 60):02d}:{int(seconds % 60):02d}"


class _Book:
    """Job states of one invocation and the decisions that follow from them."""

    def __init__(self, spec: Spec, jobs: list[Job]):
        self.spec, self.jobs = spec, jobs
        self.status: dict[str, str] = {}
        self.ran: set[str] = set()
        self.t_start = time.time()
        self.index = {j.name: i for i, j in enumerate(jobs, 1)}

    def prefix(self, job: Job) -> str:
        return (f"[sweep {self.spec.name} {self.index[job.name]}/{len(self.jobs)} "
                f"{_clock(time.time() - self.t_start)}] {job.name}")

    def blocked_by(self, job: Job) -> str | None:
        if job.waits_for_any:  # the report draws whatever finished
            return None
        return next((d for d in job.deps if self.status.get(d) in ("failed", "blocked")), None)

    def waiting(self, job: Job) -> bool:
        """A dependency planned in this invocation has not finished yet."""
        return any(d in self.index and self.status.get(d) not in ("done", "skipped", "failed", "blocked")
                   for d in job.deps)

    def settle(self, job: Job) -> bool:
        """Mark a job blocked or skipped when it needs no running; True when it was settled."""
        blocker = self.blocked_by(job)
        if blocker:
            self.status[job.name] = "blocked"
            _say(f"{self.prefix(job)}: blocked by failed {blocker}")
            log_event(self.spec, "blocked", job.name, by=blocker)
            return True
        # redone when something it reads was redone in this invocation (the report, mostly)
        if not (set(job.deps) & self.ran) and is_done(self.spec, job):
            self.status[job.name] = "skipped"
            _say(f"{self.prefix(job)}: done already, skipped")
            log_event(self.spec, "skip", job.name)
            return True
        return False

    def started(self, job: Job) -> None:
        self.status[job.name] = "running"
        _say(f"{self.prefix(job)}: running  ({job.command})")
        log_event(self.spec, "start", job.name)

    def finished(self, job: Job, seconds: float, error: str | None) -> None:
        if error is None:
            self.status[job.name] = "done"
            self.ran.add(job.name)
            _say(f"{self.prefix(job)}: done in {seconds:.0f}s")
            log_event(self.spec, "done", job.name, seconds=round(seconds, 1))
        else:
            self.status[job.name] = "failed"
            _say(f"{self.prefix(job)}: FAILED after {seconds:.0f}s: {error}")
            log_event(self.spec, "failed", job.name, error=error)

    def summary(self) -> None:
        counts: dict[str, int] = {}
        for s in self.status.values():
            counts[s] = counts.get(s, 0) + 1
        _say(f"[sweep {self.spec.name}] finished in {_clock(time.time() - self.t_start)}: "
             + ", ".join(f"{n} {s}" for s, n in counts.items()))


def _error(e: BaseException) -> str:
    return f"{type(e).__name__}: {' '.join(str(e).split())}"


def run_local(spec: Spec, jobs: list[Job] | None = None, workers: int | None = None) -> dict[str, str]:
    """Run the jobs here; returns {job name: "skipped" | "done" | "failed" | "blocked"}."""
    jobs = plan(spec) if jobs is None else jobs
    write_snapshot(spec)
    workers = spec.local.workers if workers is None else workers
    book = _Book(spec, jobs)
    if workers <= 1:
        _sequential(book)
    else:
        _parallel(book, workers)
    book.summary()
    return {k: v for k, v in book.status.items()}


def _sequential(book: _Book) -> None:
    import torch

    # the spec's thread count here too: CPU results depend on it (the order of float sums), so a job gives
    # the same numbers in this process as in a worker, and a resumed evaluation matches an uninterrupted one
    threads, before = book.spec.local.threads, torch.get_num_threads()
    try:
        if threads:
            torch.set_num_threads(threads)
        for job in book.jobs:
            if book.settle(job):
                continue
            book.started(job)
            t0 = time.time()
            try:
                run_job(book.spec, job)
            except KeyboardInterrupt:
                log_event(book.spec, "interrupted", job.name)
                _stopped(book.spec, [job])
                raise
            except Exception as e:  # noqa: BLE001 - recorded and reported; the sweep goes on
                book.finished(job, time.time() - t0, _error(e))
                if os.environ.get("FLUIDBENCH_DEBUG"):
                    traceback.print_exc()
                continue
            book.finished(job, time.time() - t0, None)
    finally:
        torch.set_num_threads(before)


# ----------------------------------------------------------------------------------------------- parallel
def _exit_with_parent(orphaned: threading.Event, grace_s: float = 300.0, poll_s: float = 0.5) -> None:
    """In a worker: when the sweep process is gone (even SIGKILLed), SIGTERM this process, as the sweep would
    have (a trainer saves a checkpoint and returns), and set `orphaned`; exit after `grace_s` regardless."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(poll_s)
        orphaned.set()
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(grace_s)
        os._exit(1)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


def _worker(spec: Spec, inbox, outbox, wid: int) -> None:
    """A long-lived worker process: imports torch once (~7 CPU-seconds), then runs the jobs it is sent, each
    with its own thread count and its output in that job's log."""
    import torch

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides; it sends SIGTERM
    orphaned = threading.Event()
    _exit_with_parent(orphaned)
    while not orphaned.is_set():
        try:
            item = inbox.get(timeout=1.0)
        except queue.Empty:
            continue
        if item is None:
            return
        job, threads, log_path = item
        sys.stdout.flush()
        sys.stderr.flush()
        fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        os.close(fd)
        torch.set_num_threads(threads)
        error = None
        try:
            run_job(spec, job)
        except Exception as e:  # noqa: BLE001 - reported to the parent
            traceback.print_exc()
            error = _error(e)
        sys.stdout.flush()
        sys.stderr.flush()
        outbox.put((wid, job.name, error))


class _Pool:
    """N worker processes, each fed through its own queue; a worker that dies is replaced."""

    def __init__(self, spec: Spec, n: int):
        self.spec, self.ctx = spec, multiprocessing.get_context("spawn")  # fresh interpreters, no shared pools
        self.outbox = self.ctx.Queue()
        self.procs: list = [None] * n
        self.inboxes: list = [None] * n
        for wid in range(n):
            self.start(wid)

    def start(self, wid: int) -> None:
        self.inboxes[wid] = self.ctx.Queue()
        self.procs[wid] = self.ctx.Process(target=_worker, args=(self.spec, self.inboxes[wid], self.outbox, wid),
                                           daemon=True)
        self.procs[wid].start()

    def stop(self, terminate: bool) -> None:
        for wid, proc in enumerate(self.procs):
            if terminate:
                proc.terminate()  # SIGTERM: a trainer saves a checkpoint and stops
            self.inboxes[wid].put(None)  # ... and its worker, free again, exits instead of waiting for work
        for proc in self.procs:
            proc.join(timeout=120)


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def _parallel(book: _Book, workers: int) -> None:
    # SIGTERM (kill, a job scheduler, `timeout`) stops the workers cleanly, as Ctrl-C does
    in_main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _interrupt) if in_main else None
    try:
        _run_pool(book, workers)
    finally:
        if in_main:
            signal.signal(signal.SIGTERM, previous)


def _run_pool(book: _Book, workers: int) -> None:
    spec = book.spec
    threads = spec.local.threads or 1
    exclusive = spec.local.exclusive
    status_every = spec.local.status_every
    logs = spec.root / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    pool = _Pool(spec, workers)
    busy: dict[int, tuple[Job, float, int]] = {}  # worker -> (job, start time, slots)
    pending = list(book.jobs)
    last_status = time.time()
    try:
        while pending or busy:
            try:
                wid, name, error = pool.outbox.get(timeout=0.3)
                job, t0, _ = busy.pop(wid)
                book.finished(job, time.time() - t0, error)
            except queue.Empty:
                pass
            for wid, (job, t0, _) in list(busy.items()):
                if not pool.procs[wid].is_alive():  # killed (out of memory?) or crashed in native code
                    busy.pop(wid)
                    book.finished(job, time.time() - t0, f"worker process died (exit code {pool.procs[wid].exitcode}); "
                                                         f"log: {logs / _log_name(job)}")
                    pool.start(wid)
            _schedule(book, pool, busy, pending, workers, threads, exclusive, logs)
            if busy and time.time() - last_status > status_every:
                last_status = time.time()
                for job, t0, _ in busy.values():
                    _say(f"    {job.name} ({_clock(time.time() - t0)}): {_latest_line(logs / _log_name(job))}")
            if pending and not busy and all(book.waiting(j) for j in pending):
                raise RuntimeError(f"sweep stuck: {pending[0].name} waits for jobs that will not run")
    except KeyboardInterrupt:
        for job, _, _ in busy.values():
            log_event(spec, "interrupted", job.name)
        pool.stop(terminate=True)
        _stopped(spec, [job for job, _, _ in busy.values()])
        raise
    pool.stop(terminate=False)


def _stopped(spec: Spec, jobs: list[Job]) -> None:
    names = ", ".join(job.name for job in jobs) or "none"
    _say(f"[sweep {spec.name}] stopped; interrupted: {names}. Run the same command again to resume (training "
         "runs from their last checkpoint).")


def _latest_line(log_path: Path) -> str:
    """The last progress line a job wrote (tqdm rewrites its line with carriage returns)."""
    try:
        with open(log_path, "rb") as f:
            f.seek(max(0, f.seek(0, 2) - 4096))
            tail = f.read().decode(errors="replace")
    except OSError:
        return ""
    parts = [ANSI.sub("", p).strip() for p in re.split(r"[\r\n]", tail)]
    parts = [p for p in parts if p]
    return parts[-1][:160] if parts else ""


def _log_name(job: Job) -> str:
    return job.name.replace("/", "__") + ".log"


def _schedule(book: _Book, pool: _Pool, busy: dict, pending: list[Job], workers: int, threads: int,
              exclusive: list[str], logs: Path) -> None:
    """Start every pending job whose dependencies finished, while workers (slots) are free, in plan order."""
    used = sum(slots for _, _, slots in busy.values())
    for job in list(pending):
        if book.waiting(job):
            continue
        if book.settle(job):
            pending.remove(job)
            continue
        alone = any(fnmatch(job.name, pattern) for pattern in exclusive)
        slots = workers if alone else 1
        if used + slots > workers:
            if alone:
                return  # hold the queue until the machine is free for it: no starvation
            continue
        wid = next(w for w in range(workers) if w not in busy)
        book.started(job)
        pool.inboxes[wid].put((job, slots * threads, str(logs / _log_name(job))))
        busy[wid] = (job, time.time(), slots)
        pending.remove(job)
        used += slots
