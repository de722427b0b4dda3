"""Validation loss: each variant's own training loss on a held-out split, deterministic by seed.

Batch i (of a fixed batch size, over the first `size` items in order) draws every random quantity from its own
generators: the KL token samples (mean + std * eps, on the host where the cache lives) from one seeded with
`seed + i`, and the loss's draws (orders, mask ratios, timesteps, noise) from one on the model's device seeded
with `seed + i + LOSS_SEED_OFFSET`, a distinct stream. Two evaluations of one checkpoint therefore agree exactly, and the value
does not depend on how many processes share the batches. Evaluation uses the EMA weights (harness.runs).

The loss is the variant's `loss(..., validation=True)`: the training loss's expectation estimated with little
sampling noise, so that a rung's gain is not lost in the spread between validation seeds. Random order masks each
sample at its own ratio from a fixed grid of quantiles of the training distribution (training draws one ratio per
batch: a 500-image split saw 2 ratios), and the diffusion head's timesteps are stratified over the schedule.

`fluidbench eval loss --run RUN` recomputes it from the run's latest checkpoint into RUN/eval/loss.json.
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Callable, Protocol

import torch
import torch.distributed as dist


class Batches(Protocol):
    """A split of cached inputs: `batch` gathers items by index; KL tokens are drawn with `generator`."""

    def __len__(self) -> int: ...

    def batch(self, indices: torch.Tensor, generator: torch.Generator | None) -> dict[str, torch.Tensor]: ...


LOSS_SEED_OFFSET = 0x9E3779B9  # any constant: keeps the loss's stream apart from the token samples' on the CPU
LossFn = Callable[..., torch.Tensor]  # (tokens, text, text_mask, generator, *, validation) -> scalar


@torch.no_grad()
def validation_loss(loss_fn: LossFn, data: Batches, *, batch_size: int, seed: int, size: int = 0,
                    device: torch.device | str = "cpu", autocast_dtype: torch.dtype | None = None) -> float:
    """Mean loss per image over the first `size` items of `data` (0 = all).

    loss_fn(tokens, text, text_mask, generator, validation=True) -> scalar: a variant's `loss`, or the training module
    (which under FSDP2 must be called by every process, so each process runs the same number of batches,
    padding with zero-weight repeats). Under torch.distributed, batches are dealt round-robin to processes and
    the totals summed over them.
    """
    from harness.devices import to_device

    device = torch.device(device)
    n = len(data) if size <= 0 else min(size, len(data))
    if n == 0:
        raise ValueError("validation split is empty")
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    starts = list(range(0, n, batch_size))
    mine = starts[rank::world]
    totals = torch.zeros(2, dtype=torch.float64, device=device)  # (sum of loss x images, images)
    for r in range(math.ceil(len(starts) / world)):
        start, weight = (mine[r], 1.0) if r < len(mine) else (starts[0], 0.0)
        index = seed + start // batch_size
        batch = data.batch(torch.arange(start, min(start + batch_size, n)), torch.Generator().manual_seed(index))
        batch = to_device(batch, device)
        generator = torch.Generator(device).manual_seed(index + LOSS_SEED_OFFSET)
        with torch.autocast(device.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
            loss = loss_fn(batch["tokens"], batch["text"], batch["text_mask"], generator, validation=True)
        count = batch["tokens"].shape[0] * weight
        totals += torch.stack([loss.double() * count, totals.new_tensor(count)])
    if dist.is_initialized():
        dist.all_reduce(totals)
    return (totals[0] / totals[1]).item()


def evaluate_run(run_dir: str | os.PathLike, *, size: int | None = None, batch_size: int | None = None,
                 device: str | None = None) -> dict[str, Any]:
    """Validation loss of a run's latest checkpoint (EMA weights) with the run's own protocol; writes
    RUN/eval/loss.json and returns it."""
    from harness.atomic import write_json
    from harness.cache import open_cached_split
    from harness.runs import load_run

    from harness.devices import autocast_dtype, default_device

    device = default_device(device)
    run = load_run(run_dir, device=device)
    cfg = run.config.train
    size = cfg.val_size if size is None else size
    batch_size = batch_size or cfg.val_batch_size
    data = open_cached_split(run.config, "val", tokenizer=run.tokenizer, text_encoder=run.text_encoder)
    dtype = autocast_dtype(run.config.dist.dtype, device)  # the rule the training used
    run.variant.eval()
    loss = validation_loss(run.variant.loss, data, batch_size=batch_size, seed=cfg.val_seed, size=size,
                           device=device, autocast_dtype=dtype)
    result = dict(val_loss=loss, step=run.step, checkpoint=str(run.checkpoint), weights="ema",
                  protocol=dict(split=run.config.data.val_split, size=min(size, len(data)) if size else len(data),
                                batch_size=batch_size, seed=cfg.val_seed, data=run.config.data.source("val")[1]))
    write_json(Path(run_dir) / "eval" / "loss.json", result)
    return result
