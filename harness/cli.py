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


def _click_error(e: Exception) -> bool:
    """click's own errors (typer vendors click, so its classes are not importable by one name): an unknown or
    missing option, a value out of range, a file it could not open."""
    return callable(getattr(e, "format_message", None)) and isinstance(getattr(e, "exit_code", None), int)


def main(argv: list[str] | None = None) -> None:
    try:
        code = app(args=argv, prog_name="fluidbench", standalone_mode=False)
    except typer.Abort:  # Ctrl-C outside a command's own handling
        print("Aborted.", file=sys.stderr)
        sys.exit(1)
    except (FluidbenchError, FileNotFoundError, NotADirectoryError, ValueError) as e:
        if os.environ.get("FLUIDBENCH_DEBUG"):
            raise
        msg = " ".join(str(e).split())  # one line, whatever the exception carried
        print(f"error: {msg}", file=sys.stderr)
        sys.exit(2)
    except Exception as e:
        if not _click_error(e):
            raise
        ctx = getattr(e, "ctx", None)  # bad usage, reported like bad input: one line naming the option
        where = f"{ctx.command_path}: " if ctx is not None else ""
        hint = f" (see {ctx.command_path} --help)" if ctx is not None else ""
        print(f"error: {where}{' '.join(e.format_message().split())}{hint}", file=sys.stderr)
        sys.exit(e.exit_code)
    sys.exit(code if isinstance(code, int) else 0)  # click returns an Exit's code (--help: 0) without raising
