"""GenEval's official image-folder layout: `<index:05d>/metadata.jsonl` + `<index:05d>/samples/<n>.png`.

Written by every generator here (models, the ShapesT2I renderer) so that the official evaluator can also read
our folders, and read by our scorer whatever model made the images.
"""
from __future__ import annotations

import io
import json
import re
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
from PIL import Image

from harness.atomic import write_bytes, write_text
from harness.errors import FluidbenchError


def load_prompts(path: str | Path) -> list[dict]:
    """Read a GenEval-format metadata file (one JSON object per line, each with `tag`, `prompt`, `include`)."""
    path = Path(path)
    if not path.is_file():
        raise FluidbenchError(f"{path}: prompt file not found (expected GenEval evaluation_metadata.jsonl format)")
    prompts = []
    for lineno, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            meta = json.loads(line)
        except json.JSONDecodeError as e:
            raise FluidbenchError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
        for key in ("tag", "prompt", "include"):
            if key not in meta:
                raise FluidbenchError(f"{path}:{lineno}: missing key '{key}' (GenEval metadata schema)")
        prompts.append(meta)
    return prompts


def png_bytes(image: np.ndarray) -> bytes:
    """Encode a uint8 (H, W, 3) image losslessly (never JPEG: FID and detectors see the exact pixels)."""
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(image)).save(buf, format="PNG")
    return buf.getvalue()


def write_prompt_folder(root: str | Path, index: int, metadata: dict, images: Sequence[np.ndarray]) -> Path:
    """Write one prompt's folder: its metadata line and its samples as 0.png, 1.png, ..."""
    folder = Path(root) / f"{index:05d}"
    for n, image in enumerate(images):
        write_bytes(folder / "samples" / f"{n}.png", png_bytes(image))
    write_text(folder / "metadata.jsonl", json.dumps(metadata) + "\n")  # last: marks the folder complete
    return folder


def iter_prompt_folders(root: str | Path, strict: bool = False,
                        per_prompt: int | None = None) -> Iterator[tuple[int, dict, list[Path]]]:
    """Yield (index, metadata, sample paths) for each complete prompt folder, in index order.

    Without `strict` (a generator resuming its own folder) an unfinished folder, one without metadata.jsonl
    yet, is skipped. With it (scoring someone's images) every prompt folder must be complete: metadata.jsonl
    and samples numbered 0.png .. (n-1).png, so a missing image is an error rather than a score over fewer
    images. Prompts may have different n; `per_prompt` (GenEval: 4) makes every folder hold exactly that many,
    which also catches a missing last image."""
    root = Path(root)
    if not root.is_dir():
        raise FluidbenchError(f"{root}: image folder not found (expected GenEval layout <index:05d>/samples/<n>.png)")
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and p.name.isdigit()):
        meta_path = folder / "metadata.jsonl"
        if not meta_path.is_file():
            if strict:
                raise FluidbenchError(f"{meta_path}: missing (an incomplete prompt folder; GenEval layout "
                                      "<index:05d>/metadata.jsonl)")
            continue
        try:
            metadata = json.loads(meta_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise FluidbenchError(f"{meta_path}: not valid JSON ({getattr(e, 'msg', e)})") from None
        if not isinstance(metadata, dict):
            raise FluidbenchError(f"{meta_path}: expected one JSON object (GenEval metadata schema)")
        samples = sorted((p for p in (folder / "samples").glob("*.png") if re.fullmatch(r"\d+\.png", p.name)),
                         key=lambda p: int(p.stem))
        if strict:
            numbers = [int(p.stem) for p in samples]
            if numbers != list(range(len(numbers))) or not numbers:
                gap = next((i for i, n in enumerate(numbers) if n != i), len(numbers))
                raise FluidbenchError(f"{folder / 'samples' / f'{gap}.png'}: missing (samples must be 0.png .. "
                                      f"n-1.png; found {', '.join(p.name for p in samples) or 'none'})")
            if per_prompt is not None and len(samples) != per_prompt:
                missing = folder / "samples" / f"{len(samples)}.png"
                raise FluidbenchError(f"{missing if len(samples) < per_prompt else folder / 'samples'}: "
                                      f"{'missing' if len(samples) < per_prompt else 'too many images'} (expected "
                                      f"{per_prompt} images per prompt, found {len(samples)})")
        yield int(folder.name), metadata, samples
