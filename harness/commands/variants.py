"""CLI: `fluidbench variants`: the four variants and the size ladders with their parameter counts."""
from __future__ import annotations

import json

import typer


def variants_table() -> dict:
    """{"variants": [4 names], "ladders": {ladder: [{name, blocks, width, heads, params: {variant: total}}]}}."""
    from variants.registry import LADDERS, VARIANTS, ladder_table

    return {"variants": list(VARIANTS), "ladders": {ladder: ladder_table(ladder) for ladder in LADDERS}}


def _human(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.3f}M"


def register(app: typer.Typer) -> None:
    @app.command("variants")
    def variants_cmd(
        as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
    ) -> None:
        """List the four variants and the size ladders with parameter counts."""
        table = variants_table()
        if as_json:
            print(json.dumps(table, indent=2))
            return
        from rich.console import Console
        from rich.table import Table

        from variants.registry import LADDER_SHAPES

        console = Console()
        for ladder, rungs in table["ladders"].items():
            shapes = ", ".join(f"{k} {v}" for k, v in LADDER_SHAPES[ladder].items())
            t = Table(title=f"ladder {ladder} ({shapes})")
            for col in ("size", "blocks", "width", "heads", *table["variants"]):
                t.add_column(col, justify="left" if col == "size" else "right")
            for r in rungs:
                t.add_row(r["name"], str(r["blocks"]), str(r["width"]), str(r["heads"]),
                          *(_human(r["params"][v]) for v in table["variants"]))
            console.print(t)
