"""CLI: `fluidbench eval` commands (eval_geneval)."""
from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    pass
