"""CLI: `fluidbench eval geneval-score`: score an image folder in GenEval's official layout, whatever made it."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer


def geneval_score(
    images: Annotated[Path, typer.Option("--images", help="Folder in GenEval's layout: <index:05d>/metadata.jsonl "
                                         "and <index:05d>/samples/<n>.png.")],
    detector: Annotated[str, typer.Option(help="shapes-oracle (ShapesT2I), hf-mask2former (transformers; not "
                                          "comparable to published GenEval) or mmdet (GenEval's own).")] = "mmdet",
    detector_path: Annotated[Optional[Path], typer.Option(help="Local detector weights: the hf-mask2former folder "
                                                          "or the folder holding GenEval's mmdet checkpoint.")] = None,
    clip_path: Annotated[Optional[Path], typer.Option(help="Local CLIP ViT-L/14 (OpenAI) weights for colour clauses; "
                                                      "default: open_clip's cache.")] = None,
    clip_torchscript: Annotated[bool, typer.Option(help="Allow --clip-path to be a TorchScript archive (OpenAI's "
                                                   "ViT-L-14.pt): loading one runs the code inside it, so only "
                                                   "for a file you trust.")] = False,
    device: Annotated[Optional[str], typer.Option(help="cpu, cuda, ... (default: cuda when available).")] = None,
    batch_size: Annotated[int, typer.Option(help="Images per detector call.")] = 8,
    per_prompt: Annotated[Optional[int], typer.Option("--n", min=1, help="Images every prompt folder must hold "
                                                      "(GenEval: 4); default: any count.")] = None,
) -> None:
    """Score an existing GenEval image folder; write DIR/results.jsonl and DIR/summary.json."""
    from eval.colors import load_clip_colors
    from eval.detectors import load_detector
    from eval.geneval import needs_colors, score_folder
    from eval.geneval_folder import iter_prompt_folders

    from harness.devices import default_device

    device = str(default_device(device))
    found = load_detector(detector, detector_path, device=device)
    colors = None
    if not found.colors and needs_colors([meta for _, meta, _ in iter_prompt_folders(images, strict=True)]):
        colors = load_clip_colors(clip_path, device=device, torchscript=clip_torchscript)
    summary = score_folder(images, found, colors, batch_size=batch_size, per_prompt=per_prompt)
    tasks = " ".join(f"{tag}={summary[tag]:.3f}" for tag in summary["tasks"])
    label = "" if summary["comparable_to_published"] else " (not comparable to published GenEval)"
    typer.echo(f"GenEval overall={summary['overall']:.4f} {tasks} correct_images={summary['correct_images']:.3f} "
               f"correct_prompts={summary['correct_prompts']:.3f} images={summary['images']} "
               f"detector={summary['detector']}{label} -> {images / 'summary.json'}")


def register(app: typer.Typer) -> None:
    app.command("geneval-score")(geneval_score)
