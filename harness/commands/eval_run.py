"""CLI: `fluidbench eval <metric> --run RUN` for every metric of eval/metrics.py: sample a run's EMA weights and
score. Each command's options are its settings type's fields (eval/settings.py: flags, defaults, help) plus the
sampling settings, so the command line a sweep job prints is one these commands take."""
from __future__ import annotations

import dataclasses
import inspect
import typing
from pathlib import Path
from typing import Any, Callable, Optional

import typer

from eval.metrics import METRICS, Metric
from eval.settings import SamplingSettings

RUN = typer.Option(..., "--run", help="Run folder written by `fluidbench train`.")
DEVICE = typer.Option(None, "--device", help="cpu, cuda, cuda:1 ... (default: cuda when available).")
SAMPLING = "sampling_"  # prefix of the sampling options' parameter names (a metric has its own `seed`)


def _options(settings: type, prefix: str = "") -> list[inspect.Parameter]:
    """A typer option per field of a settings dataclass, from the field's flags, default and help."""
    hints = typing.get_type_hints(settings)
    params = []
    for f in dataclasses.fields(settings):
        hint = hints[f.name]
        inner = [a for a in typing.get_args(hint) if a is not type(None)]
        annotation = Optional[inner[0]] if inner else hint  # typer reads Optional[X], not X | None
        meta = f.metadata
        option = typer.Option(f.default, *meta["flags"], help=meta.get("help") or None, min=meta.get("min"))
        params.append(inspect.Parameter(prefix + f.name, inspect.Parameter.KEYWORD_ONLY, default=option,
                                        annotation=annotation))
    return params


def command(metric: Metric) -> Callable[..., None]:
    """`fluidbench eval <metric.name>`: settings from the options, the metric's function, its one-line result."""

    def run_metric(run: Path, device: Optional[str], **options: Any) -> None:
        sampling = SamplingSettings(**{k.removeprefix(SAMPLING): v for k, v in options.items()
                                       if k.startswith(SAMPLING)})
        settings = metric.settings(**{k: v for k, v in options.items() if not k.startswith(SAMPLING)})
        result = metric.run(run, settings, sampling, device=device)
        typer.echo(f"{metric.line(result)} -> {run / 'eval' / metric.result}")

    params = [inspect.Parameter("run", inspect.Parameter.KEYWORD_ONLY, default=RUN, annotation=Path),
              *_options(metric.settings), *_options(SamplingSettings, SAMPLING),
              inspect.Parameter("device", inspect.Parameter.KEYWORD_ONLY, default=DEVICE, annotation=Optional[str])]
    run_metric.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    run_metric.__doc__ = metric.help
    run_metric.__name__ = metric.name
    return run_metric


def register(app: typer.Typer) -> None:
    for metric in METRICS.values():
        app.command(metric.name)(command(metric))
