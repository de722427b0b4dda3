"""CLI: `fluidbench eval ...`: loss, FID, GenEval, CLIP score (each area registers its commands)."""
from __future__ import annotations

import typer

from harness.commands import eval_fid, eval_geneval, eval_loss, eval_run

eval_app = typer.Typer(help="Measure: validation loss, FID, GenEval, CLIP score.", no_args_is_help=True)
for module in (eval_loss, eval_fid, eval_geneval, eval_run):
    module.register(eval_app)


def register(app: typer.Typer) -> None:
    app.add_typer(eval_app, name="eval")
