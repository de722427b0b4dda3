"""Generate images from a trained run: captions -> text embeddings -> variant.sample -> tokenizer.decode -> uint8.

Every evaluation that needs samples (FID, GenEval, CLIP score, sample grids) goes through `generate`, so the
sampling settings and the cost accounting are recorded the same way everywhere.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Collection, Iterator, Sequence

import numpy as np
import torch
from tqdm import tqdm

from eval.settings import SamplingSettings  # noqa: F401 - its home is eval/settings.py (no torch)


@dataclass
class SamplingStats:
    """Wall time and model cost of one generation pass, per image."""

    images: int = 0
    seconds: float = 0.0
    cost: dict = field(default_factory=dict)

    def summary(self) -> dict:
        per_image = self.seconds / max(self.images, 1)
        out = {"images": self.images, "seconds": round(self.seconds, 3), "seconds_per_image": per_image}
        # variant.sampling_cost is already per image; name its two bare keys so the table reads unambiguously
        names = {"forward_passes": "sequential_passes", "flops": "flops_per_image"}
        out.update({names.get(k, k): v for k, v in self.cost.items()})
        return out


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(B, 3, H, W) in [-1, 1] -> uint8 (B, H, W, 3), rounding to nearest like torchvision's save_image."""
    x = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


@torch.no_grad()
def generate(run: Any, captions: Sequence[str], settings: SamplingSettings, stats: SamplingStats | None = None,
             progress: bool = True, desc: str = "sampling", skip: Collection[int] = ()) -> Iterator[tuple[int, np.ndarray]]:
    """Yield (caption index, uint8 (H, W, 3) image) for each caption not in `skip`, in order, batch by batch.

    `run` is a harness.runs.LoadedRun (variant with EMA weights, tokenizer, text encoder). Batch b draws its
    randomness from a generator seeded with (seed, b), so a sample does not depend on what was generated before.
    Batches keep their places when captions are skipped (a batch with any caption left runs whole), so a
    resumed evaluation makes exactly the images the uninterrupted one would have.
    """
    skip = set(skip)
    variant, tokenizer, text_encoder = run.variant, run.tokenizer, run.text_encoder
    variant.eval()
    device = next(variant.parameters()).device
    resolved = settings.resolved(variant)
    cost = variant.sampling_cost(steps=resolved["steps"], cfg_scale=resolved["cfg_scale"],
                                 head_steps=resolved["head_steps"])
    if stats is not None:  # per image, known before any batch runs (a resumed pass may have none left)
        stats.cost = {k: v for k, v in cost.items() if isinstance(v, (int, float))}
    bar = tqdm(total=len(captions) - len(skip), desc=desc, unit="img", disable=not progress, leave=False)
    for b, start in enumerate(range(0, len(captions), settings.batch_size)):
        batch = list(captions[start:start + settings.batch_size])
        wanted = [i for i in range(len(batch)) if start + i not in skip]
        if not wanted:
            continue
        t0 = time.perf_counter()
        generator = torch.Generator(device=device).manual_seed(settings.seed * 1_000_003 + b)
        text, text_mask = text_encoder.encode(batch)
        tokens = variant.sample(text.to(device), text_mask.to(device), cfg_scale=resolved["cfg_scale"],
                                temperature=resolved["temperature"], steps=resolved["steps"],
                                head_steps=resolved["head_steps"], x0_clip=resolved["x0_clip"],
                                generator=generator)
        images = to_uint8(tokenizer.decode(tokens))
        if stats is not None:
            stats.images += len(batch)
            stats.seconds += time.perf_counter() - t0
        bar.update(len(wanted))
        for i in wanted:
            yield start + i, images[i]
    bar.close()


def image_grid(images: Sequence[np.ndarray], ncols: int | None = None, pad: int = 2) -> np.ndarray:
    """Tile uint8 (H, W, 3) images into one (rows, cols) grid with a white border between them."""
    n = len(images)
    ncols = ncols or int(np.ceil(np.sqrt(n)))
    nrows = int(np.ceil(n / ncols))
    h, w, _ = images[0].shape
    grid = np.full((nrows * (h + pad) + pad, ncols * (w + pad) + pad, 3), 255, np.uint8)
    for i, image in enumerate(images):
        r, c = divmod(i, ncols)
        grid[pad + r * (h + pad):pad + r * (h + pad) + h, pad + c * (w + pad):pad + c * (w + pad) + w] = image
    return grid
