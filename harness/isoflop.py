"""IsoFLOP designs: a spec's budgets C_1..C_k x sizes x variants -> one training run per cell.

A spec asks for them with

    isoflop:
      budgets: [2.0e+12, 4.0e+12, 8.0e+12]   # training FLOPs per run (2.0e12, a string to PyYAML, works too)
      sizes: [cpu-xs, cpu-s, cpu-m]          # optional: the spec's `sizes`
      shapes: {vocab_size: 512}              # optional: seq_len, vocab_size, token_dim, text_dim of the FLOP
                                             # accounting, over the ladder's (LADDER_SHAPES)

Each cell's steps come from its budget and the variant's own accounting (`Variant.train_flops_per_image`,
the same number the trainer writes to summary.json) times the batch: steps = round(C / (FLOPs per image x
batch)), so a cell's training FLOPs are within half a step of C. The cell is an ordinary training job (its
steps in its config, resumable, skipped when done, on the local or Slurm executor) whose run folder,
runs/<variant>-<size>-<budget>, also holds isoflop.json: the budget, the steps, the FLOPs per step it was
planned with and the relative rounding, written before step 0. The report (harness/isoflop_report.py) reads
the budget from there. Before training, the cell checks the accounting against the real tokenizer's shapes,
so a plan made with the wrong token shapes fails before it spends the budget (the text encoder's width is
taken from the ladder or isoflop.shapes.text_dim, not checked: loading T5-XXL to read it costs too much).

The spec section is harness/spec.py's IsoflopSpec; harness/plan.py lays the cells out as TrainCell jobs
(harness/jobs.py). Hoffmann et al. 2022 train every IsoFLOP run with a cosine schedule to its own length;
this harness's default is constant after warm-up (optim.schedule), which the spec may change.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

from harness.errors import FluidbenchError


@dataclass(frozen=True)
class Cell:
    """One (variant, size, budget) of an IsoFLOP design and the steps that spend its budget."""

    variant: str
    size: str
    budget: float                    # training FLOPs asked for
    steps: int                       # round(budget / flops_per_step)
    flops_per_step: float            # train_flops_per_image x batch
    batch_size: int

    @property
    def label(self) -> str:
        """The budget in a file name: 2e12, 4.5e12."""
        return f"{self.budget:.3g}".replace("+", "")

    @property
    def name(self) -> str:
        return f"{self.variant}-{self.size}-{self.label}"

    @property
    def flops(self) -> float:
        return self.steps * self.flops_per_step

    @property
    def rounding(self) -> float:
        """Relative error of the planned FLOPs against the budget (|.| <= half a step's share)."""
        return self.flops / self.budget - 1

    def record(self) -> dict:
        return {**asdict(self), "planned_flops": self.flops, "rounding": self.rounding}


def check_isoflop(spec) -> None:
    """Sizes outside the ladder, unknown shape keys: one line naming the key (budgets: IsoflopSpec checks)."""
    from variants.registry import LADDER_SHAPES, LADDERS

    rungs = [r.name for r in LADDERS[spec.ladder]]
    for size in spec.isoflop.sizes:
        if size not in rungs:
            raise FluidbenchError(f"isoflop.sizes: {size!r} not in the {spec.ladder} ladder ({', '.join(rungs)})")
    known = [k for k in LADDER_SHAPES[spec.ladder] if k != "text_len"]  # text_len: model.options.text_len
    for key in spec.isoflop.shapes:
        if key not in known:
            raise FluidbenchError(f"isoflop.shapes.{key}: unknown (known: {', '.join(known)})")


def sizes(spec) -> list[str]:
    return list(spec.isoflop.sizes or spec.sizes)


def shapes(spec) -> dict:
    """Token and text shapes of the FLOP accounting: the ladder's, with the spec's isoflop.shapes on top."""
    from variants.registry import LADDER_SHAPES

    return {**LADDER_SHAPES[spec.ladder], **spec.isoflop.shapes}


def flops_per_image(variant: str, size: str, ladder: str, shape: dict, options: dict) -> float:
    """The variant's training FLOPs per image at this size, built without weights (free even at 10.5B); the
    text length from the options, else the ladder's, as the trainer builds it (harness.runs.build_model)."""
    from variants.registry import build_variant, empty_weights

    shape = {k: v for k, v in shape.items() if k != "text_len"}
    with empty_weights():
        return float(build_variant(variant, size, ladder=ladder, **shape, **options).train_flops_per_image())


def cells(spec) -> list[Cell]:
    """Every cell of the design, budgets ascending, then sizes, then variants."""
    from harness.config import RunConfig

    out = []
    per_step = {}
    for budget in sorted(spec.isoflop.budgets):
        for size in sizes(spec):
            for variant in spec.variants:
                if (variant, size) not in per_step:
                    cfg = RunConfig.from_overrides(spec.run_values(size))
                    per_image = flops_per_image(variant, size, spec.ladder, shapes(spec), cfg.model.options)
                    per_step[(variant, size)] = (per_image * cfg.train.batch_size, cfg.train.batch_size)
                step_flops, batch = per_step[(variant, size)]
                steps = round(budget / step_flops)
                if steps < 1:
                    raise FluidbenchError(f"sweep {spec.name}: isoflop.budgets: {budget:.3g} FLOPs is less than one "
                                          f"step of {variant} {size} ({step_flops:.3g} FLOPs at batch {batch})")
                out.append(Cell(variant, size, budget, steps, step_flops, batch))
    return out


def cell_dir(spec, cell: Cell) -> Path:
    return spec.root / "runs" / cell.name


def format_cells(spec, design: list[Cell]) -> str:
    """The design for --dry-run: every cell with its steps, FLOPs and rounding, and the total."""
    from harness.tables import markdown_table

    rows = [[c.variant, c.size, c.budget, c.batch_size, c.flops_per_step, c.steps, c.flops, f"{c.rounding:+.2%}"]
            for c in design]
    total = sum(c.flops for c in design)
    return "\n".join([f"IsoFLOP design of {spec.name}: {len(spec.isoflop.budgets)} budgets x {len(sizes(spec))} "
                      f"sizes x {len(spec.variants)} variants = {len(design)} training runs, {total:.3g} FLOPs in all",
                      markdown_table(["variant", "size", "budget C", "batch", "FLOPs/step", "steps", "FLOPs",
                                      "vs budget"], rows), ""])


def check_accounting(cfg, cell: dict, planned_shapes: dict) -> None:
    """Before a cell trains: its FLOPs per image with the real tokenizer's shapes must be the plan's."""
    from variants.tokenizers import load_tokenizer

    tokenizer = load_tokenizer(cfg.tokenizer.path)
    real = {**planned_shapes, "seq_len": tokenizer.seq_len, "vocab_size": tokenizer.vocab_size,
            "token_dim": tokenizer.token_dim}
    planned = cell["flops_per_step"] / cell["batch_size"]
    actual = flops_per_image(cell["variant"], cell["size"], cfg.model.ladder, real, cfg.model.options)
    if not math.isclose(actual, planned, rel_tol=1e-9):
        wrong = {k: real[k] for k in ("seq_len", "vocab_size", "token_dim") if real[k] != planned_shapes.get(k)}
        raise FluidbenchError(f"isoflop cell {cell['variant']}-{cell['size']}: the tokenizer {cfg.tokenizer.path} has "
                              f"{wrong or real}, the plan assumed {planned_shapes}: set isoflop.shapes to match "
                              "(the steps would miss the budget)")
