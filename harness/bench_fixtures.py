"""What the bench runs on: its settings (model shapes), a cache of random tokens and text written in
harness/cache.py's format, stand-in tokenizers of the embedded architecture, random text and fixed captions."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

CAPTIONS = ["a red circle", "a blue square to the left of a green triangle", "two yellow stars",
            "a purple circle above an orange square", "three green triangles", "a white star below a red circle",
            "a photo of a blue triangle and a yellow square", "four red squares"]


@dataclass
class Setting:
    """One model shape at which all four variants are measured."""
    name: str
    ladder: str
    size: str
    seq_len: int
    vocab_size: int
    token_dim: int
    image_size: int           # the stand-in tokenizer's resolution (f4, so grid = image_size / 4)
    train_batch: int
    sample_batch: int
    head_steps: int | None    # diffusion head steps while timing; None = the paper's (100)
    kv_batch: int = 0         # > 0: also time raster sampling without its KV cache, at this batch
    options: dict = field(default_factory=dict)  # build_variant options (tests: fewer random-order steps)


def fake_cache(folder: Path, kind: str, setting: Setting, items: int, text_len: int, text_dim: int,
                seed: int) -> Path:
    """A cache folder in harness.cache's layout filled with random tokens and text, so that the training step
    reads its batches through the same CachedSplit.batch as a real run."""
    from harness.cache import LAYOUTS, write_arrays

    rng = np.random.default_rng(seed)
    L, C = setting.seq_len, setting.token_dim
    arrays = {"text": rng.standard_normal((items, text_len, text_dim)).astype(np.float16),
              "text_mask": np.arange(text_len)[None] < rng.integers(3, text_len + 1, (items, 1)),
              **LAYOUTS[kind].random(rng, items, L, C, setting.vocab_size)}
    return write_arrays(folder, kind, arrays, seq_len=L, token_dim=C, vocab_size=setting.vocab_size,
                        text_dim=text_dim, max_length=text_len, note="random arrays written by fluidbench bench")


def stand_in_tokenizer(kind: str, setting: Setting, seed: int, device: torch.device) -> nn.Module:
    """A randomly initialised tokenizer of the embedded architecture (f4) giving `setting.seq_len` tokens."""
    from variants.tokenizer_train import TokenizerTrainConfig, build_tokenizer
    grid = int(round(setting.seq_len ** 0.5))
    from harness.cache import LAYOUTS

    channels = LAYOUTS[kind].latent_channels(setting.token_dim) or TokenizerTrainConfig.latent_channels
    tc = TokenizerTrainConfig(kind=kind, image_size=setting.image_size, grid=grid, latent_channels=channels,
                              codebook_size=setting.vocab_size, seed=seed)
    return build_tokenizer(tc).to(device)


class RandomText:
    """Stands in for the text encoder: random (B, 32, 384) embeddings, MiniLM's shape, at no cost."""
    name, dim, max_length = "random", 384, 32

    def __init__(self, device: torch.device):
        self.generator = torch.Generator().manual_seed(0)
        self.device = device

    def encode(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        text = torch.randn(len(captions), self.max_length, self.dim, generator=self.generator)
        return text.to(self.device), torch.ones(len(captions), self.max_length, dtype=torch.bool, device=self.device)


def captions(n: int) -> list[str]:
    return [CAPTIONS[i % len(CAPTIONS)] for i in range(n)]
