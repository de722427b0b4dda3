"""The `fluidbench` command line: one typer app; each area registers its commands from harness/commands/.

Command modules import torch and friends inside the command functions, so `fluidbench --help` stays fast.
Bad input raises FluidbenchError (or FileNotFoundError / ValueError with a clear message): main() prints it
on one line and exits 2. Set FLUIDBENCH_DEBUG=1 to see the traceback instead.
"""
from __future__ import annotations

import os
import sys

import typer

from harness.commands import bench, data, eval as eval_cmds, report, sample, sweep, tokenizer, train, variants
from harness.errors import FluidbenchError

app = typer.Typer(
    name="fluidbench",
    help="Scaling study of autoregressive text-to-image models: VQ vs KL tokens, raster vs random order.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

for module in (data, tokenizer, variants, train, sample, eval_cmds, sweep, report, bench):
    module.register(app)


def main(argv: list[str] | None = None) -> None:
    try:
        app(args=argv, prog_name="fluidbench", standalone_mode=True)
    except (FluidbenchError, FileNotFoundError, NotADirectoryError, ValueError) as e:
        if os.environ.get("FLUIDBENCH_DEBUG"):
            raise
        msg = " ".join(str(e).split())  # one line, whatever the exception carried
        print(f"error: {msg}", file=sys.stderr)
        sys.exit(2)
