"""CLI: `fluidbench report results/<sweep>`: the results table, the scaling fits, the plots and report.md."""
from __future__ import annotations

from pathlib import Path

import typer


def report(
    sweep_dir: Path = typer.Argument(..., help="A sweep folder: results/<sweep> (with runs/ or a runs.csv)."),
    offset: bool = typer.Option(False, "--offset", help="Fit L = a N^-alpha + c instead of L = a N^-alpha."),
    n_boot: int = typer.Option(1000, "--n-boot", min=0, help="Bootstrap resamples for alpha's 95% interval."),
    fit_boot: int = typer.Option(200, "--fit-boot", min=0, help="Bootstrap refits of the compute-optimal fits "
                                 "(IsoFLOP profiles, frontier, L(N, D); harness/isoflop_report.py)."),
    intermediate: bool = typer.Option(False, "--intermediate", help="Also fit L(N, D) to each run's earlier "
                                      "validations (constant-lr checkpoints, not separate runs: marked in the "
                                      "report)."),
) -> None:
    """Collect the runs into runs.csv / runs.parquet (when run folders exist), then write report.md and plots."""
    import pandas as pd

    from harness.report import write_report
    from harness.results import collect_runs, write_table

    if not sweep_dir.is_dir():
        raise FileNotFoundError(f"{sweep_dir}: sweep folder not found")
    if (sweep_dir / "runs").is_dir():
        table = collect_runs(sweep_dir)
        columns = None
        if (sweep_dir / "runs.csv").is_file():  # keep the columns the sweep chose (e.g. no CLIP score), plus
            columns = list(pd.read_csv(sweep_dir / "runs.csv", nrows=0).columns)  # newer ones with values
            columns += [c for c in table.columns if c not in columns and table[c].notna().any()]
        write_table(table, sweep_dir, columns)
    out = write_report(sweep_dir, offset=offset, n_boot=n_boot, intermediate=intermediate, fit_boot=fit_boot)
    typer.echo(f"wrote {out} and its plots; table: {sweep_dir / 'runs.csv'}")


def register(app: typer.Typer) -> None:
    app.command("report")(report)
