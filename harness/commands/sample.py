"""CLI: `fluidbench sample`: a grid of samples from a run's EMA weights."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer


def sample(
    run: Path = typer.Option(..., "--run", help="Run folder written by `fluidbench train`."),
    prompt: str = typer.Option(..., "--prompt", help="Caption to sample from."),
    n: int = typer.Option(8, "--n", min=1, help="Number of samples."),
    cfg: Optional[float] = typer.Option(None, "--cfg", help="Guidance scale (default: the variant's paper value)."),
    temperature: Optional[float] = typer.Option(None, "--temperature", help="Sampling temperature."),
    steps: Optional[int] = typer.Option(None, "--steps", help="Random-order steps (default: variant default)."),
    head_steps: Optional[int] = typer.Option(None, "--head-steps", help="Diffusion-head steps (kl variants)."),
    x0_clip: Optional[float] = typer.Option(None, "--x0-clip", min=0.0, help="Clamp the diffusion head's "
                                            "predicted x0 to +-X each step (default: the variant's)."),
    head_solver: Optional[str] = typer.Option(None, "--head-solver", help="Diffusion-head sampler: ddpm, ddim "
                                              "or dpm++ (default: the variant's, ddpm)."),
    reveal: Optional[str] = typer.Option(None, "--reveal", help="Random order: which positions each step writes, "
                                         "random (MAR) or confidence (MaskGIT, vq only)."),
    seed: int = typer.Option(0, "--seed"),
    out: Path = typer.Option(..., "--out", help="PNG file to write the grid to."),
) -> None:
    """Write a grid of samples for one prompt from a run's EMA weights."""
    from eval.geneval_folder import png_bytes
    from eval.sampling import SamplingSettings, generate, image_grid
    from harness.atomic import write_bytes
    from harness.runs import load_run

    if out.suffix.lower() != ".png":
        raise ValueError(f"--out {out}: expected a .png file (samples are never stored lossy)")
    loaded = load_run(run)
    settings = SamplingSettings(cfg_scale=cfg, temperature=temperature, steps=steps, head_steps=head_steps,
                                x0_clip=x0_clip, head_solver=head_solver, reveal=reveal, batch_size=n,
                                seed=seed)
    images = [image for _, image in generate(loaded, [prompt] * n, settings, progress=False)]
    write_bytes(out, png_bytes(image_grid(images)))
    typer.echo(f"wrote {out} ({n} samples of {prompt!r}, {settings.resolved(loaded.variant)})")


def register(app: typer.Typer) -> None:
    app.command("sample")(sample)
