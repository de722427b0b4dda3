"""CLI: `fluidbench eval loss`: the validation loss of a run's latest checkpoint (EMA weights)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer


def loss(
    run: Path = typer.Option(..., "--run", help="Run folder written by `fluidbench train`."),
    size: Optional[int] = typer.Option(None, "--size", min=0, help="Validation images (default: the run's; 0 = all)."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", min=1, help="Default: the run's val_batch_size."),
    device: Optional[str] = typer.Option(None, "--device", help="cpu or cuda (default: cuda if available)."),
) -> None:
    """Recompute the validation loss with the run's fixed-seed protocol; writes RUN/eval/loss.json."""
    from eval.loss import evaluate_run

    result = evaluate_run(run, size=size, batch_size=batch_size, device=device)
    typer.echo(json.dumps(result, sort_keys=True))


def register(app: typer.Typer) -> None:
    app.command("loss")(loss)
