"""CLI: `fluidbench data shapes|shapes-render|check`: make ShapesT2I, render true GenEval scenes, open data."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

import typer

from harness.errors import FluidbenchError


def register(app: typer.Typer) -> None:
    data = typer.Typer(help="Data sets: generate ShapesT2I, render true GenEval scenes, check a data set.",
                       no_args_is_help=True)
    app.add_typer(data, name="data", help="Data sets: generate ShapesT2I, render true GenEval scenes, check one.")

    @data.command("shapes")
    def shapes(
        out: Path = typer.Option(..., "--out", help="folder to write (images, captions, GenEval prompts, manifest)"),
        seed: int = typer.Option(0, "--seed"),
        train: int = typer.Option(20000, "--train", help="training images"),
        val: int = typer.Option(1000, "--val", help="validation images"),
        size: int = typer.Option(32, "--size", help="image side: 32 (default) or 64"),
        prompts_per_task: int = typer.Option(32, "--prompts-per-task", help="GenEval prompts per task"),
        align: int = typer.Option(0, "--align", help="put every object's box on a grid of this many pixels (at "
                                  "32x32; 4 = the 8x8-token tokenizers' patches): an easier set; 0 = anywhere"),
    ) -> None:
        """Generate the ShapesT2I data set; the same arguments give byte-identical files."""
        import sys

        from harness.data.shapes import write_shapes

        s = write_shapes(out, seed=seed, n_train=train, n_val=val, size=size, prompts_per_task=prompts_per_task,
                         progress=sys.stderr.isatty(), align=align)
        print(f"wrote {out}: {train} train + {val} val images ({size}x{size}), {s['prompts']} GenEval prompts; "
              f"rendered in {s['seconds']:.1f} s, {s['images_per_cpu_s']:,.0f} images/s on one core")

    @data.command("shapes-render")
    def shapes_render(
        prompts: Path = typer.Option(..., "--prompts", help="a GenEval-format metadata file over ShapesT2I classes"),
        out: Path = typer.Option(..., "--out", help="folder to write in GenEval's layout"),
        per_prompt: int = typer.Option(4, "--per-prompt", help="images per prompt"),
        seed: int = typer.Option(0, "--seed"),
        size: int = typer.Option(32, "--size", help="image side: 32 or 64"),
        align: int = typer.Option(0, "--align", help="the layout grid of `data shapes --align` (0 = anywhere)"),
    ) -> None:
        """Render true scenes for every prompt (what a perfect model draws) in GenEval's folder layout."""
        import numpy as np
        from tqdm import tqdm

        from eval.geneval_folder import load_prompts, write_prompt_folder
        from harness.data.shapes import check_align, render_prompt

        check_align(align, "--align")
        if per_prompt < 1:
            raise FluidbenchError(f"--per-prompt: expected at least 1, got {per_prompt}")
        metadata = load_prompts(prompts)
        start = time.perf_counter()
        for index, meta in enumerate(tqdm(metadata, desc="render", unit="prompt", leave=False)):
            rng = np.random.default_rng([seed, index])  # one stream per prompt: a prompt's images never shift
            write_prompt_folder(out, index, meta, [render_prompt(meta, rng, size, align=align)[0]
                                                         for _ in range(per_prompt)])
        print(f"wrote {out}: {len(metadata)} prompts x {per_prompt} images ({size}x{size}) "
              f"in {time.perf_counter() - start:.1f} s")

    @data.command("check")
    def check(
        kind: str = typer.Option(..., "--kind", help="shapes, coco or wds"),
        path: Path = typer.Option(..., "--path", help="the data set's folder, file or shard pattern"),
        split: str = typer.Option("train", "--split"),
        n: Optional[int] = typer.Option(None, "--n", help="open a sample of n items"),
        image_size: Optional[int] = typer.Option(None, "--image-size", help="resolution (default: native / 256)"),
    ) -> None:
        """Open a data set, decode its first image (streamed shards: every sample) and print its size."""
        from harness.data import open_dataset

        dataset = open_dataset(kind, path, split, image_size=image_size, n=n)
        if hasattr(dataset, "__len__"):
            count = len(dataset)
            if count == 0:
                raise FluidbenchError(f"{path}: no items in split '{split}'")
            image, caption = dataset[0]
        else:  # streamed shards: read them all, so a broken one is found now
            count, first = 0, None
            for item in dataset:
                count, first = count + 1, first or item
            if first is None:
                raise FluidbenchError(f"{path}: no samples")
            image, caption = first
        print(f"{kind} {path} ({split}): {count} items; first: uint8 {tuple(image.shape)}, '{caption}'")
