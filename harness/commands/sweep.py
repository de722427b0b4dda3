"""CLI: `fluidbench sweep SPEC`: run a scaling sweep here or on Slurm, print its jobs, or its scale plan."""
from __future__ import annotations

from enum import Enum
from fnmatch import fnmatch
from functools import partial
from pathlib import Path
from typing import Any, Optional

import typer


class Executor(str, Enum):
    local = "local"
    slurm = "slurm"


def sweep(
    spec: str = typer.Argument(..., help="A shipped spec (embedded, fluid-paper) or a path to a YAML spec."),
    executor: Executor = typer.Option(Executor.local, "--executor", help="local: here, one job after another; "
                                      "slurm: submit every unfinished job through submitit."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print every job with its state, resources and command; "
                                 "run and submit nothing."),
    plan: bool = typer.Option(False, "--plan", help="Print the scale plan (GPU-hours, memory per GPU, parallelism "
                              "per rung) from the variants' FLOP accounting; run nothing."),
    out: Optional[Path] = typer.Option(None, "--out", help="Sweep folder (default: the spec's `out`)."),
    only: Optional[str] = typer.Option(None, "--only", help="Run only the jobs whose names match this glob, e.g. "
                                       "'train/kl-*' or 'ceiling/vq' (their dependencies must be done)."),
    wait: bool = typer.Option(False, "--wait", help="slurm: after submitting, wait until the jobs leave the queue "
                              "(squeue) and exit non-zero if any did not finish."),
) -> None:
    """Run a sweep: data, tokenizers, every (variant, size) training run, its evaluations, then the report."""
    from harness import sweep as sweeps

    loaded = sweeps.load_spec(spec, out=out)
    if plan:
        from harness.scale_plan import format_plan, scale_plan

        typer.echo(format_plan(loaded, scale_plan(loaded)))
        return
    jobs = sweeps.plan(loaded)
    if only:
        by_name = {j.name: j for j in jobs}
        jobs = [j for j in jobs if fnmatch(j.name, only)]
        if not jobs:
            raise ValueError(f"--only {only!r}: no job matches (see --dry-run for the names)")
        selected = {j.name for j in jobs}
        missing = sorted({d for j in jobs for d in j.deps if d not in selected
                          and not sweeps.is_done(loaded, by_name[d])})
        if missing and not dry_run and executor is Executor.local:
            raise ValueError(f"--only {only!r}: needs {', '.join(missing)} done first (run them, or widen --only)")
    if dry_run:
        if loaded.isoflop is not None:
            from harness.isoflop import cells, format_cells

            typer.echo(format_cells(loaded, cells(loaded)))
        sbatch = None
        if executor is Executor.slurm:
            from harness.slurm import dry_run_sbatch

            sbatch = partial(dry_run_sbatch, loaded)
        typer.echo(sweeps.describe(loaded, jobs, executor.value, sbatch))
        return
    if executor is Executor.slurm:
        from harness import slurm

        ids = slurm.submit(loaded, jobs)
        if wait:
            _report(loaded, slurm.wait(loaded, ids))
        return
    from harness.local import run_local

    _report(loaded, run_local(loaded, jobs))


def _report(loaded: Any, status: dict[str, str]) -> None:
    """The end of a sweep here (or of one waited for on Slurm): what failed, else where the results are."""
    failed = [name for name, s in status.items() if s in ("failed", "blocked")]
    if failed:
        typer.echo(f"{len(failed)} job(s) failed or blocked: {', '.join(failed)} (details: "
                   f"{loaded.root / 'sweep.log.jsonl'}); run the same command again to retry them", err=True)
        raise typer.Exit(1)
    report = loaded.root / "report.md"
    if report.is_file():
        typer.echo(f"results: {loaded.root / 'runs.csv'}; report: {report}")


def register(app: typer.Typer) -> None:
    app.command("sweep")(sweep)
