"""Generate images from a trained run: captions -> text embeddings -> variant.sample -> tokenizer.decode -> uint8.

Every evaluation that needs samples (FID, GenEval, CLIP score, sample grids) goes through `generate`, so the
sampling settings and the cost accounting are recorded the same way everywhere.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Collection, Iterator, Sequence

import numpy as np
import torch
from tqdm import tqdm

from eval.settings import SamplingSettings  # noqa: F401 - its home is eval/settings.py (no torch)


@dataclass
class LatentStats:
    """Running moments of continuous tokens over every value: whether sampled latents stay in the data's
    distribution (a diverging diffusion-head sampler shows as a std hundreds of times the data's)."""

    n: int = 0
    total: float = 0.0
    total_sq: float = 0.0
    total_abs: float = 0.0
    max_abs: float = 0.0

    def add(self, tokens: torch.Tensor) -> None:
        x = tokens.detach().double()
        self.n += x.numel()
        self.total += float(x.sum())
        self.total_sq += float(x.pow(2).sum())
        self.total_abs += float(x.abs().sum())
        self.max_abs = max(self.max_abs, float(x.abs().max())) if x.numel() else self.max_abs

    def merged(self, other: "LatentStats") -> "LatentStats":
        return LatentStats(self.n + other.n, self.total + other.total, self.total_sq + other.total_sq,
                           self.total_abs + other.total_abs, max(self.max_abs, other.max_abs))

    def summary(self) -> dict:
        """std, mean |x| and max |x| of the values seen (and how many), or {} before any."""
        if not self.n:
            return {}
        mean = self.total / self.n
        std = math.sqrt(max(self.total_sq / self.n - mean ** 2, 0.0))
        return {"std": std, "mean": mean, "mean_abs": self.total_abs / self.n, "max_abs": self.max_abs,
                "values": self.n}


@torch.no_grad()
def data_latent_stats(tokenizer: Any, images: Sequence[torch.Tensor] | Iterator[torch.Tensor],
                      seed: int = 0) -> LatentStats:
    """The same moments for the data's latents as training sees them (posterior mean + std * eps, seeded), from
    uint8 image batches (B, 3, H, W)."""
    stats, generator = LatentStats(), torch.Generator().manual_seed(seed)
    for batch in images:
        x = batch.to(tokenizer.device).float() / 127.5 - 1
        mean, std = tokenizer.encode_moments(x)
        eps = torch.randn(mean.shape, generator=generator).to(mean.device)
        stats.add(mean + std * eps)
    return stats


def latent_comparison(sampled: LatentStats, data: LatentStats) -> dict:
    """Sampled vs data latent moments and the ratio of their stds (~1 when the sampler stays in distribution)."""
    s, d = sampled.summary(), data.summary()
    ratio = s["std"] / d["std"] if s and d and d["std"] > 0 else None
    return {"sampled": s, "data": d, "std_ratio": ratio}


@dataclass
class CodeStats:
    """How often each code was sampled, over every token: the vq counterpart of LatentStats. On data with a plain
    background (ShapesT2I) the background is one code, so the tokens that are not it are the paint, and a sampler
    that paints twice what the data holds can raise GenEval without drawing better (docs/recipe.md, 9b)."""

    images: int = 0
    counts: list[int] = field(default_factory=list)  # counts[c] = tokens of code c

    def add(self, tokens: torch.Tensor) -> None:
        """(B, L) integer codes."""
        self.counts = _add_counts(self.counts, torch.bincount(tokens.detach().flatten().long().cpu()).tolist())
        self.images += tokens.shape[0]

    def merged(self, other: "CodeStats") -> "CodeStats":
        return CodeStats(self.images + other.images, _add_counts(self.counts, other.counts))

    def commonest(self) -> int:
        """The code seen most often (ties: the smallest): on a plain-background data set, the background."""
        return max(range(len(self.counts)), key=lambda c: (self.counts[c], -c))

    def other_than(self, code: int) -> float:
        """Tokens per image that are not `code` (0 before any image)."""
        if not self.images:
            return 0.0
        total = sum(self.counts)
        return (total - (self.counts[code] if code < len(self.counts) else 0)) / self.images


def _add_counts(a: list[int], b: list[int]) -> list[int]:
    """Element-wise sum of two count lists of any lengths."""
    n = max(len(a), len(b))
    return [x + y for x, y in zip(a + [0] * (n - len(a)), b + [0] * (n - len(b)))]


@torch.no_grad()
def data_code_stats(tokenizer: Any, images: Sequence[torch.Tensor] | Iterator[torch.Tensor]) -> CodeStats:
    """The codes of real uint8 image batches (B, 3, H, W), encoded as training sees them."""
    stats = CodeStats()
    for batch in images:
        stats.add(tokenizer.encode(batch.to(tokenizer.device).float() / 127.5 - 1))
    return stats


def paint_comparison(sampled: CodeStats, data: CodeStats) -> dict:
    """Non-background tokens per image, sampled against data, the background being the data's commonest code
    (ties: the smallest), and their ratio (~1 when the sampler paints as much as the data holds)."""
    if not data.images or not sampled.images:
        return {}
    background = data.commonest()
    s, d = sampled.other_than(background), data.other_than(background)
    return {"background_code": background, "sampled_per_image": s, "data_per_image": d,
            "ratio": s / d if d > 0 else None, "sampled_images": sampled.images, "data_images": data.images}


@dataclass
class SamplingStats:
    """Wall time and model cost of one generation pass, per image; moments of the latents when continuous, the
    count of each code when discrete."""

    images: int = 0
    seconds: float = 0.0
    cost: dict = field(default_factory=dict)
    latents: LatentStats = field(default_factory=LatentStats)
    codes: CodeStats = field(default_factory=CodeStats)

    def summary(self) -> dict:
        per_image = self.seconds / max(self.images, 1)
        out = {"images": self.images, "seconds": round(self.seconds, 3), "seconds_per_image": per_image}
        # variant.sampling_cost is already per image; name its two bare keys so the table reads unambiguously
        names = {"forward_passes": "sequential_passes", "flops": "flops_per_image"}
        out.update({names.get(k, k): v for k, v in self.cost.items()})
        if self.latents.n:
            out["latents"] = self.latents.summary()
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
                                head_solver=resolved["head_solver"], reveal=resolved["reveal"],
                                generator=generator)
        images = to_uint8(tokenizer.decode(tokens))
        if stats is not None:
            stats.images += len(batch)
            stats.seconds += time.perf_counter() - t0
            if tokens.is_floating_point():
                stats.latents.add(tokens)
            else:
                stats.codes.add(tokens)
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
