"""CLI: `fluidbench train`: one variant at one size; the same command on an existing RUN resumes it."""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer


def train(
    out: Path = typer.Option(..., "--out", help="Run folder (resumed if it already holds checkpoints)."),
    variant: Optional[str] = typer.Option(None, "--variant", help="vq-raster | vq-random | kl-raster | kl-random."),
    size: Optional[str] = typer.Option(None, "--size", help="Rung of the ladder, e.g. cpu-xs (default: smallest)."),
    data: Optional[Path] = typer.Option(None, "--data", help="Data set folder (ShapesT2I by default)."),
    tokenizer: Optional[Path] = typer.Option(None, "--tokenizer", help="Tokenizer folder or checkpoint."),
    steps: Optional[int] = typer.Option(None, "--steps", min=1, help="Training steps (train.steps)."),
    config: Optional[Path] = typer.Option(None, "--config", help="JSON/YAML config file, applied before overrides."),
    overrides: Optional[List[str]] = typer.Argument(
        None, help="key=value settings with dotted keys, e.g. optim.lr=1e-3 train.batch_size=64 dist.strategy=fsdp2."),
) -> None:
    """Train one variant at one size (resolved config, metrics.jsonl, checkpoints and summary.json in --out).

    On SIGTERM or SIGUSR1 it saves a checkpoint and exits with status 75; the same command resumes."""
    from harness.config import apply_overrides, load_config
    from harness.train import EXIT_INTERRUPTED, train as run_training

    flags = {"out": str(out), "model.variant": variant, "model.size": size,
             "data.path": str(data) if data else None, "tokenizer.path": str(tokenizer) if tokenizer else None,
             "train.steps": steps}
    # defaults, then the file, then the flags, then key=value
    cfg = load_config(config, {k: v for k, v in flags.items() if v is not None})
    cfg = apply_overrides(cfg, overrides or [])
    summary = run_training(cfg)
    if summary.get("status") == "interrupted":
        typer.echo(f"interrupted at step {summary['steps']}: checkpoint {summary['checkpoint']}; "
                   f"run the same command to resume (exit status {EXIT_INTERRUPTED})", err=True)
        raise typer.Exit(EXIT_INTERRUPTED)  # not 0: `train && eval` must not evaluate an unfinished run
    if summary:
        typer.echo(f"{summary['variant']} {summary['size']}: {summary['steps']} steps, train loss "
                   f"{summary['train_loss']:.4f}, val loss {summary['val_loss']:.4f}, "
                   f"{summary['wall_s']:.0f} s -> {out / 'summary.json'}")


def register(app: typer.Typer) -> None:
    app.command("train")(train)
