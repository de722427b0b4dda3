"""Generation orders: what the backbone sees in training and how tokens come out at sampling.

An order turns embedded tokens into backbone outputs z (B, L, W) at the positions it predicts plus a loss
weight over positions (None = every position counts), and runs the sampling loop, asking the head for
tokens. Both orders take the same arguments so that the Variant never branches on which one it holds.

Sampling statistics (returned with the tokens, kept by the Variant as `last_sample_stats`):
  forward_passes           backbone calls; a guided call runs cond and null rows as one doubled batch
  batch_doubled            whether those calls carried the doubled batch (guidance)
  forward_passes_per_image forward_passes x 2 when batch_doubled: the compute-relevant count per image
  head_calls               head.sample calls, each batched over every token produced in that step
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
from torch import nn

from variants import rng

if TYPE_CHECKING:
    from variants.backbone import Backbone
    from variants.variant import Variant


def reveal_schedule(seq_len: int, steps: int) -> list[int]:
    """Tokens revealed at each of `steps` steps: at step k keep floor(L cos(pi/2 (k+1)/K)) masked (MAR),
    at least one revealed per step, all L after the last step."""
    if not 1 <= steps <= seq_len:
        raise ValueError(f"steps must be in [1, seq_len={seq_len}] for random order, got {steps}")
    counts, masked = [], seq_len
    for k in range(steps):
        keep = math.floor(seq_len * math.cos(math.pi / 2 * (k + 1) / steps))
        keep = max(steps - 1 - k, min(masked - 1, keep))  # >= 1 now, and >= 1 left for every later step
        counts.append(masked - keep)
        masked = keep
    return counts


def _stats(passes: int, doubled: bool, head_calls: int) -> dict:
    return {"forward_passes": passes, "batch_doubled": doubled,
            "forward_passes_per_image": passes * (2 if doubled else 1), "head_calls": head_calls}


class RasterOrder(nn.Module):
    """GPT-like: input [start, x_0..x_{L-2}] with causal attention predicts x_0..x_{L-1}; KV-cache sampling."""

    kind = "raster"

    def __init__(self, width: int, seq_len: int):
        super().__init__()
        self.seq_len = seq_len
        self.start = nn.Parameter(torch.zeros(width))

    def default_steps(self) -> int:
        return self.seq_len

    def check_steps(self, steps: int | None) -> int:
        """The steps actually taken: always seq_len. A requested count is ignored rather than refused, so that
        one sampling setting can serve all four variants; the stats and sampling_cost report the real count."""
        return self.seq_len

    def pass_shapes(self, steps: int, kv_cache: bool = True) -> list[tuple[int, int, bool]]:
        """(queries, keys, computes text K/V) of each sampling pass, for FLOP accounting."""
        if kv_cache:
            return [(1, t + 1, t == 0) for t in range(self.seq_len)]
        return [(t + 1, t + 1, True) for t in range(self.seq_len)]

    def outputs(self, backbone: "Backbone", x: torch.Tensor, ctx: torch.Tensor, text_mask: torch.Tensor,
                generator: torch.Generator | None = None, validation: bool = False) -> tuple[torch.Tensor, None]:
        """x: embedded tokens (B, L, W) -> z (B, L, W) where z_i predicts token i from tokens < i (no draws:
        `validation` changes nothing)."""
        start = self.start.to(x.dtype).expand(x.shape[0], 1, -1)
        inputs = torch.cat([start, x[:, :-1]], dim=1)  # (B, L, W), teacher forcing
        return backbone(inputs, ctx, text_mask, causal=True), None

    def outputs_known(self, backbone: "Backbone", x: torch.Tensor, ctx: torch.Tensor, text_mask: torch.Tensor,
                      known: int, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """z (B, L, W) and the positions predicted from exactly `known` image tokens (B, L) bool: position
        `known`, whose prefix is known (the context diagnostic, eval/context.py)."""
        z, _ = self.outputs(backbone, x, ctx, text_mask)
        predicted = torch.zeros(x.shape[:2], dtype=torch.bool, device=x.device)
        predicted[:, known] = True
        return z, predicted

    def sample(self, variant: "Variant", ctx: torch.Tensor, text_mask: torch.Tensor, *, cfg_scale: float | None,
               temperature: float, steps: int, head_steps: int, generator: torch.Generator | None,
               kv_cache: bool = True, x0_clip: float | None = None,
               head_solver: str = "ddpm", reveal: str = "random") -> tuple[torch.Tensor, dict]:
        """Tokens (B, L[, C]) one position at a time; constant guidance. `kv_cache=False` recomputes the
        whole prefix every step (the reference for the cache and the benchmark's baseline)."""
        backbone, L = variant.backbone, self.seq_len
        rows, W = ctx.shape[0], backbone.width  # rows = 2B when guided: [cond; null]
        x = self.start.to(ctx.dtype).expand(rows, 1, W)  # (rows, 1, W)
        if kv_cache:
            cache = backbone.new_cache(ctx, text_mask)
        else:
            inputs = ctx.new_empty(rows, L, W)
            inputs[:, :1] = x
        out = []
        for t in range(L):
            if kv_cache:
                z = backbone.decode(x, cache)[:, 0]  # (rows, W)
            else:
                z = backbone(inputs[:, : t + 1], ctx, text_mask, causal=True)[:, -1]
            token = variant.head.sample(z, temperature=temperature, cfg_scale=cfg_scale, generator=generator,
                                        steps=head_steps, x0_clip=x0_clip,
                                        solver=head_solver)  # (B,) or (B, C)
            out.append(token)
            if t + 1 < L:
                e = variant.embed(token)  # (B, W)
                e = torch.cat([e, e]) if cfg_scale is not None else e
                x = e[:, None]
                if not kv_cache:
                    inputs[:, t + 1] = e
        stats = _stats(L, cfg_scale is not None, L) | {"kv_cache": kv_cache, "revealed_per_step": [1] * L}
        return torch.stack(out, dim=1), stats


class RandomOrder(nn.Module):
    """BERT-like: bidirectional attention; positions to predict hold a learned mask token; a random order per
    sample; sampling reveals tokens in that order on the cosine schedule."""

    kind = "random"
    MASK_RATIOS = ("truncnorm", "cosine")

    def __init__(self, width: int, seq_len: int, *, mask_ratio: str = "truncnorm", mask_ratio_min: float = 0.7,
                 mask_ratio_mean: float = 1.0, mask_ratio_std: float = 0.25, default_steps: int = 64):
        super().__init__()
        if mask_ratio not in self.MASK_RATIOS:
            raise ValueError(f"mask_ratio must be one of {self.MASK_RATIOS}, got {mask_ratio!r}")
        self.seq_len, self.mask_ratio = seq_len, mask_ratio
        self.ratio_min, self.ratio_mean, self.ratio_std = mask_ratio_min, mask_ratio_mean, mask_ratio_std
        self._default_steps = default_steps
        self.mask_token = nn.Parameter(torch.zeros(width))

    def default_steps(self) -> int:
        return min(self._default_steps, self.seq_len)  # MAR/Fluid: 64 steps for 256 tokens

    def check_steps(self, steps: int | None) -> int:
        steps = self.default_steps() if steps is None else steps
        reveal_schedule(self.seq_len, steps)  # validates the range
        return steps

    def pass_shapes(self, steps: int, kv_cache: bool = True) -> list[tuple[int, int, bool]]:
        """(queries, keys, computes text K/V) of each sampling pass: `steps` full bidirectional passes."""
        return [(self.seq_len, self.seq_len, True)] * steps

    def masked_counts(self, batch: int, generator: torch.Generator | None, device: torch.device,
                      validation: bool = False) -> torch.Tensor:
        """How many positions to mask: (1, 1) per batch (MAR's truncated Gaussian) or (B, 1) per sample
        (MaskGIT's cos(pi/2 u)); at least one, at most L; no host sync.

        `validation`: (B, 1) with no draw, sample b at the (b + 1/2) / B quantile of the same distribution. A
        batch then covers the ratios on a fixed grid, where one draw per batch left a 500-image validation
        split with 2 ratios and a seed-to-seed spread the size of a rung's gain (the validation protocol,
        docs/design.md)."""
        L = self.seq_len
        if validation:
            u = ((torch.arange(batch, device=device, dtype=torch.float32) + 0.5) / batch)[:, None]  # (B, 1)
        else:
            u = rng.uniform((1, 1) if self.mask_ratio == "truncnorm" else (batch, 1), generator, device)
        if self.mask_ratio == "truncnorm":
            # MAR: scipy truncnorm((min - 1) / 0.25, 0, loc=1, scale=0.25), drawn by inverse CDF
            phi = lambda x: 0.5 * (1 + math.erf(x / math.sqrt(2)))  # noqa: E731
            lo = phi((self.ratio_min - self.ratio_mean) / self.ratio_std)
            hi = phi((1.0 - self.ratio_mean) / self.ratio_std)
            ratio = self.ratio_mean + self.ratio_std * torch.special.ndtri(lo + u * (hi - lo))
        else:
            ratio = torch.cos(math.pi / 2 * u)
        return torch.ceil(ratio * L).long().clamp(1, L)

    def outputs(self, backbone: "Backbone", x: torch.Tensor, ctx: torch.Tensor, text_mask: torch.Tensor,
                generator: torch.Generator | None = None,
                validation: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """x: embedded tokens (B, L, W) -> z (B, L, W) and the loss weight (B, L): 1 at masked positions.

        `validation`: mask ratios on the fixed grid of `masked_counts`. With the truncated Gaussian each sample's
        masked positions then weigh 1 / n_masked, so every ratio counts equally, as every training batch's ratio
        does (a weight of 1 would favour the high ratios); MaskGIT's per-sample ratios keep weight 1."""
        B, L, _ = x.shape
        order = rng.permutations(B, L, generator, x.device)  # (B, L): order[b, i] = i-th position revealed
        n_masked = self.masked_counts(B, generator, x.device, validation)
        z, masked = self._masked_outputs(backbone, x, ctx, text_mask, order, L - n_masked)
        weight = masked.float()
        if validation and self.mask_ratio == "truncnorm":
            weight = weight * (L / n_masked)  # (B, L); x L keeps the weights near 1 (the mean is scale-free)
        return z, weight

    def outputs_known(self, backbone: "Backbone", x: torch.Tensor, ctx: torch.Tensor, text_mask: torch.Tensor,
                      known: int, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """z (B, L, W) and the positions predicted (B, L) bool when exactly `known` tokens of each sample, at
        random positions, are known: every other position (the context diagnostic, eval/context.py)."""
        order = rng.permutations(x.shape[0], self.seq_len, generator, x.device)
        return self._masked_outputs(backbone, x, ctx, text_mask, order, known)

    def _masked_outputs(self, backbone: "Backbone", x: torch.Tensor, ctx: torch.Tensor, text_mask: torch.Tensor,
                        order: torch.Tensor, known: torch.Tensor | int) -> tuple[torch.Tensor, torch.Tensor]:
        """The first `known` positions of each `order` (B, L) hold their tokens, the rest the mask token."""
        B, L, _ = x.shape
        rank = torch.empty_like(order).scatter_(1, order, torch.arange(L, device=x.device).expand(B, L))
        masked = rank >= known  # (B, L): the positions after the known ones in each order are predicted
        inputs = torch.where(masked[..., None], self.mask_token.to(x.dtype), x)
        return backbone(inputs, ctx, text_mask, causal=False), masked

    def sample(self, variant: "Variant", ctx: torch.Tensor, text_mask: torch.Tensor, *, cfg_scale: float | None,
               temperature: float, steps: int, head_steps: int, generator: torch.Generator | None,
               kv_cache: bool = True, x0_clip: float | None = None,
               head_solver: str = "ddpm", reveal: str = "random") -> tuple[torch.Tensor, dict]:
        """Tokens (B, L[, C]) in `steps` full passes; guidance ramps w_k = 1 + (w - 1) * revealed / L with
        `revealed` counted after the step (MAR). `kv_cache` is ignored: bidirectional attention has none.
        `reveal`: which positions each step writes, "random" (a random order per sample, MAR and Fluid) or
        "confidence" (the most confident of codes drawn at every masked position, MaskGIT; codes only)."""
        backbone, L, head = variant.backbone, self.seq_len, variant.head
        guided = cfg_scale is not None
        B = ctx.shape[0] // 2 if guided else ctx.shape[0]
        device = ctx.device
        order = rng.permutations(B, L, generator, device)  # (B, L)
        tokens = variant.empty_tokens(B, device)  # (B, L[, C]) zeros: code 0 / zero latent, all masked
        known = torch.zeros(B, L, dtype=torch.bool, device=device)
        reveals = torch.zeros(B, L, dtype=torch.int64, device=device)  # times each position was written
        counts = reveal_schedule(L, steps)
        text_kv = backbone.text_kv(ctx)  # every pass sees the same text: its K/V once, not once per pass
        revealed = 0
        for k, n in enumerate(counts):
            x = torch.where(known[..., None], variant.embed(tokens), self.mask_token.to(ctx.dtype))  # (B, L, W)
            x = torch.cat([x, x]) if guided else x  # (rows, L, W)
            w = 1 + (cfg_scale - 1) * (revealed + n) / L if guided else None
            if reveal == "confidence":
                tokens, idx = self._confident(variant, x, ctx, text_mask, text_kv, tokens, known, n, w, temperature,
                                              1 - (k + 1) / len(counts), generator)
            else:
                idx = order[:, revealed: revealed + n]  # (B, n): positions revealed now
                z_new = backbone(x, ctx, text_mask, causal=False, text_kv=text_kv,
                                 positions=torch.cat([idx, idx]) if guided else idx)  # (rows, n, W): those only
                new = head.sample(z_new.flatten(0, 1), temperature=temperature, cfg_scale=w, generator=generator,
                                  steps=head_steps, x0_clip=x0_clip, solver=head_solver)  # (B * n[, C])
                new = new.view(B, n, *tokens.shape[2:])
                scatter_idx = idx.view(B, n, *([1] * (tokens.dim() - 2))).expand_as(new)
                tokens = tokens.scatter(1, scatter_idx, new.to(tokens.dtype))
            known = known.scatter(1, idx, True)
            reveals = reveals.scatter_add(1, idx, torch.ones_like(idx))
            revealed += n
        stats = _stats(len(counts), guided, len(counts)) | {"revealed_per_step": counts, "reveal_counts": reveals,
                                                             "reveal": reveal}
        return tokens, stats

    CHOICE_TEMPERATURE = 4.5  # MaskGIT's: the Gumbel noise on the confidences, annealed to 0 at the last step

    def _confident(self, variant: "Variant", x: torch.Tensor, ctx: torch.Tensor, text_mask: torch.Tensor,
                   text_kv: list, tokens: torch.Tensor, known: torch.Tensor, n: int, cfg_scale: float | None,
                   temperature: float, anneal: float,
                   generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
        """One step of MaskGIT's reveal (Chang et al. 2022): draw a code at every masked position, keep the `n`
        whose log-probability plus Gumbel noise x CHOICE_TEMPERATURE x `anneal` is highest, re-mask the rest.
        Returns the tokens with those n written and their positions (B, n)."""
        B, L = known.shape
        z = variant.backbone(x, ctx, text_mask, causal=False, text_kv=text_kv)  # (rows, L, W)
        codes, logp = variant.head.sample_scored(z.flatten(0, 1), temperature=temperature, cfg_scale=cfg_scale,
                                                 generator=generator)
        score = logp.view(B, L) + self.CHOICE_TEMPERATURE * anneal * rng.gumbel((B, L), generator, known.device)
        idx = score.masked_fill(known, float("-inf")).topk(n, dim=1).indices  # (B, n): never a known position
        return tokens.scatter(1, idx, codes.view(B, L).gather(1, idx)), idx
