"""A run's parts, built from its config: checked names, tokenizer and text encoder, the variant, the cached
splits; and `load_run(RUN)`, a finished (or running) run opened for evaluation with its EMA weights."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from harness.checkpoint import load_latest
from harness.config import RunConfig
from harness.devices import default_device
from harness.errors import FluidbenchError


@dataclass
class LoadedRun:
    """A run opened for evaluation: the variant holds the EMA weights, in eval mode."""
    variant: nn.Module
    tokenizer: nn.Module
    text_encoder: Any
    config: RunConfig
    step: int
    checkpoint: Path


def check_names(cfg: RunConfig) -> None:
    """Unknown variant, ladder or size: a one-line error naming the config field, before any work."""
    from variants.registry import LADDERS, VARIANTS
    if cfg.model.variant not in VARIANTS:
        raise FluidbenchError(f"config model.variant={cfg.model.variant!r}: choose from {', '.join(VARIANTS)}")
    if cfg.model.ladder not in LADDERS:
        raise FluidbenchError(f"config model.ladder={cfg.model.ladder!r}: choose from {', '.join(LADDERS)}")
    sizes = [r.name for r in LADDERS[cfg.model.ladder]]
    if cfg.model.size and cfg.model.size not in sizes:
        raise FluidbenchError(f"config model.size={cfg.model.size!r}: ladder {cfg.model.ladder!r} has "
                              f"{', '.join(sizes)}")


def size_name(cfg: RunConfig) -> str:
    """The rung's name; "" in the config means the smallest rung of the ladder."""
    from variants.registry import LADDERS
    return cfg.model.size or LADDERS[cfg.model.ladder][0].name


def load_tokenizer(cfg: RunConfig, device: torch.device | str = "cpu") -> nn.Module:
    from variants.tokenizers import load_tokenizer as load
    try:
        return load(cfg.tokenizer.path, device=device)
    except (FileNotFoundError, ValueError) as e:
        raise FluidbenchError(f"config tokenizer.path: {e}") from e


def load_text_encoder(cfg: RunConfig, device: torch.device | str = "cpu") -> Any:
    from variants.text import load_text_encoder as load
    try:
        return load(cfg.text.encoder, cfg.text.path or None, max_length=cfg.text.max_length, device=device)
    except (FileNotFoundError, ValueError) as e:
        raise FluidbenchError(f"config text.encoder={cfg.text.encoder!r}: {e}") from e


def check_token_kind(cfg: RunConfig, tokenizer: nn.Module) -> None:
    """The variant's head must read the tokenizer's kind of tokens (known before building anything)."""
    from variants.registry import VARIANTS
    needs = VARIANTS[cfg.model.variant][1].token_kind
    if needs != tokenizer.kind:
        raise FluidbenchError(f"config tokenizer.path={cfg.tokenizer.path}: a {tokenizer.kind} tokenizer, but "
                              f"model.variant={cfg.model.variant} needs {needs} tokens")


def build_model(cfg: RunConfig, tokenizer: nn.Module, text_dim: int) -> nn.Module:
    """The variant sized for the tokenizer and text encoder."""
    from variants.registry import build_variant
    check_token_kind(cfg, tokenizer)
    try:
        variant = build_variant(cfg.model.variant, size_name(cfg), seq_len=tokenizer.seq_len,
                                vocab_size=tokenizer.vocab_size, token_dim=tokenizer.token_dim, text_dim=text_dim,
                                ladder=cfg.model.ladder, **cfg.model.options)
    except (ValueError, TypeError) as e:
        raise FluidbenchError(f"config model ({cfg.model.variant} {size_name(cfg)}, options "
                              f"{cfg.model.options}): {e}") from e
    return variant


def open_split(cfg: RunConfig, split: str, tokenizer: nn.Module, text_encoder: Any):
    """The cached tokens and text of one split (built on first use), as eval.loss.Batches."""
    from harness.cache import CachedSplit
    return CachedSplit.open(cfg, split, tokenizer, text_encoder)


def load_run(run_dir: str | os.PathLike, *, device: str | torch.device | None = None) -> LoadedRun:
    """Open RUN for evaluation: its config, tokenizer, text encoder, and the variant with the EMA weights of
    its newest good checkpoint."""
    run = Path(run_dir)
    if not (run / "config.json").is_file():
        raise FluidbenchError(f"{run}: not a run folder (no config.json; create one with `fluidbench train`)")
    cfg = RunConfig.from_dict(json.loads((run / "config.json").read_text()))
    found = load_latest(run, quarantine=False)
    if found is None:
        raise FluidbenchError(f"{run}: no readable checkpoint in {run / 'checkpoints'}")
    state, path = found
    device = default_device(device)
    tokenizer = load_tokenizer(cfg, device)
    text_encoder = load_text_encoder(cfg, device)
    variant = build_model(cfg, tokenizer, text_encoder.dim)
    variant.load_state_dict(state["ema"])
    variant.to(device).eval().requires_grad_(False)
    return LoadedRun(variant, tokenizer, text_encoder, cfg, int(state["step"]), path)
