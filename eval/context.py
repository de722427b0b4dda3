"""The context diagnostic: a run's loss on a validation token as a function of how many image tokens it knows.

A model that draws coherent scenes predicts a token far better once its neighbours are known; one that only
learned which colours and shapes a caption brings predicts it from the text and a bag of visible tokens, and
its loss barely falls with context. The curve separates the two without sampling. For each count k:

- raster order: the loss at position k, which knows the k tokens before it in raster order;
- random order: the loss over the L - k unknown positions when k tokens at random positions are known.

k = L - 1 is "everything but the token" for random order and "the whole prefix" for raster order: not the same
context, but both hold every neighbour above and to the left. Each loss is the variant's own (cross-entropy in
nats, or the diffusion head's eps-MSE with stratified timesteps), on the first `size` validation images, with
every draw (orders, kl token samples, timesteps, noise) from generators seeded by `seed`, so the curve is
deterministic. `context_gain` = 1 - loss(L - 1 known) / loss(0 known): the fraction of the loss that context
removes.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from eval.loss import LOSS_SEED_OFFSET


def known_counts(fractions: str, seq_len: int) -> list[int]:
    """Token counts from comma-separated fractions of L, each rounded and capped at L - 1, sorted, unique."""
    try:
        values = [float(f) for f in fractions.split(",") if f.strip()]
    except ValueError:
        raise ValueError(f"known must be comma-separated fractions of the tokens in [0, 1], got {fractions!r}")
    if not values or any(not 0 <= f <= 1 for f in values):
        raise ValueError(f"known must be comma-separated fractions of the tokens in [0, 1], got {fractions!r}")
    return sorted({min(round(f * seq_len), seq_len - 1) for f in values})


@torch.no_grad()
def context_losses(variant: Any, data: Any, known: list[int], *, size: int, batch_size: int, seed: int,
                   device: torch.device | str = "cpu") -> list[float]:
    """Mean loss per predicted token at each count in `known` over the first `size` items of `data` (a
    CachedSplit); `variant` in eval mode."""
    from harness.devices import to_device

    device = torch.device(device)
    n = min(size, len(data)) if size > 0 else len(data)
    sums = torch.zeros(len(known), dtype=torch.float64)
    for start in range(0, n, batch_size):
        index = seed + start // batch_size
        batch = to_device(data.batch(torch.arange(start, min(start + batch_size, n)),
                                     torch.Generator().manual_seed(index)), device)
        tokens, text = variant._check(batch["tokens"], batch["text"], batch["text_mask"])
        ctx, mask = variant.backbone.encode_text(text, batch["text_mask"])
        x = variant.embed(tokens)
        for i, k in enumerate(known):
            generator = torch.Generator(device).manual_seed(index + LOSS_SEED_OFFSET + k)
            z, predicted = variant.order.outputs_known(variant.backbone, x, ctx, mask, k, generator)
            rows = predicted.flatten().nonzero().squeeze(1)  # every sample predicts the same number of tokens
            loss = variant.head.loss(z.flatten(0, 1).index_select(0, rows), tokens.flatten(0, 1).index_select(0, rows),
                                     None, generator, validation=True)
            sums[i] += loss.double().cpu() * tokens.shape[0]
    return (sums / n).tolist()


def eval_context(run_dir: str | Path, *, known: str = "0,0.125,0.5,1", size: int = 500, batch_size: int = 250,
                 seed: int = 1234, device: str | None = None, **_: Any) -> dict:
    """The context curve of a run's latest checkpoint (EMA weights); writes RUN/eval/context.json."""
    from harness.atomic import write_json
    from harness.cache import open_cached_split
    from harness.runs import load_run

    run = load_run(run_dir, device=device)
    variant = run.variant.eval()
    counts = known_counts(known, variant.seq_len)
    data = open_cached_split(run.config, "val", tokenizer=run.tokenizer, text_encoder=run.text_encoder)
    device = next(variant.parameters()).device
    losses = context_losses(variant, data, counts, size=size, batch_size=batch_size, seed=seed, device=device)
    result = {"known": counts, "loss": losses, "seq_len": variant.seq_len, "order": variant.order.kind,
              "loss_no_context": losses[0], "loss_full_context": losses[-1],
              "context_gain": 1 - losses[-1] / losses[0] if len(counts) > 1 and losses[0] else None,
              "step": run.step, "checkpoint": str(run.checkpoint), "variant": run.config.model.variant,
              "protocol": {"split": run.config.data.val_split, "size": min(size, len(data)) if size else len(data),
                           "batch_size": batch_size, "seed": seed}}
    write_json(Path(run_dir) / "eval" / "context.json", result)
    return result
