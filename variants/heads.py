"""The two heads that turn backbone outputs z into a loss and into tokens.

Both follow MAR's `DiffLoss` seam, two methods and nothing else the orders need:
    loss(z (N, W), target, weight (N,) | None, generator, validation) -> scalar   # weighted mean over rows
    sample(z, *, temperature, cfg_scale, generator, steps, x0_clip, solver) -> tokens  # (N,) codes or (N, C) latents
With guidance (`cfg_scale` not None), z holds [conditional rows; null-text rows] (2N, W) and N tokens come
back. `token_kind` says which tokenizer layout the head speaks. `validation` asks for the validation protocol's
low-variance draws where the head has any (the diffusion head's timesteps).
"""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from variants import rng
from variants.diffusion import GaussianDiffusion


def _weighted_mean(per_row: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
    if weight is None:
        return per_row.mean()
    weight = weight.to(per_row.dtype)
    return (per_row * weight).sum() / weight.sum().clamp_min(1.0)  # clamp: no host sync, no division by 0


class CategoricalHead(nn.Module):
    """Linear to the codebook; softmax cross-entropy; temperature (and optional top-k) sampling."""

    token_kind = "vq"
    batch_mul = 1  # rows per token in the loss
    decay_weights = True  # AdamW weight decay on the projection (MAR's recipe)

    def __init__(self, width: int, vocab_size: int, top_k: int | None = None):
        super().__init__()
        if vocab_size < 2:
            raise ValueError(f"vocab_size must be >= 2 for a categorical head, got {vocab_size}")
        self.vocab_size, self.top_k = vocab_size, top_k
        self.proj = nn.Linear(width, vocab_size)

    def activation_bytes(self, seq_len: int) -> float:
        """Activation bytes kept for the backward pass per image (harness/scale_plan.py): fp32 logits and
        their softmax."""
        return 2 * 4.0 * seq_len * self.vocab_size

    def loss(self, z: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None,
             generator: torch.Generator | None = None, validation: bool = False) -> torch.Tensor:
        """Cross-entropy (nats) of codes `target` (N,) given z (N, W), averaged with `weight` (no draws)."""
        logits = self.proj(z).float()  # (N, V)
        return _weighted_mean(F.cross_entropy(logits, target, reduction="none"), weight)

    def sample(self, z: torch.Tensor, *, temperature: float, cfg_scale: float | None = None,
               generator: torch.Generator | None = None, steps: int | None = None,
               x0_clip: float | None = None, solver: str = "ddpm") -> torch.Tensor:
        """Codes (N,): guidance on logits l_u + w (l_c - l_u), then temperature, top-k, Gumbel-max draw.
        `steps`, `x0_clip` and `solver` are diffusion settings, ignored here so one setting serves every variant."""
        return self._draw(z, temperature, cfg_scale, generator)[0]

    def sample_scored(self, z: torch.Tensor, *, temperature: float, cfg_scale: float | None = None,
                      generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Codes (N,) as `sample` draws them and each code's log-probability (N,) under the distribution it was
        drawn from (guided, tempered, top-k): the confidence of MaskGIT's reveal order (variants/orders.py)."""
        codes, logits = self._draw(z, temperature, cfg_scale, generator)
        return codes, logits.log_softmax(dim=-1).gather(1, codes[:, None])[:, 0]

    def _draw(self, z: torch.Tensor, temperature: float, cfg_scale: float | None,
              generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Codes (N,) and the logits (N, V) they were drawn from."""
        logits = self.proj(z).float()
        if cfg_scale is not None:
            cond, uncond = logits.chunk(2)
            logits = uncond + cfg_scale * (cond - uncond)
        if temperature <= 0:
            return logits.argmax(dim=-1), logits
        logits = logits / temperature
        if self.top_k is not None and self.top_k < self.vocab_size:
            kth = logits.topk(self.top_k, dim=-1).values[:, -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        gumbel = rng.gumbel(tuple(logits.shape), generator, logits.device)
        return (logits + gumbel).argmax(dim=-1), logits  # Gumbel-max == a categorical draw


class TimestepEmbedder(nn.Module):
    """Sinusoidal features of the timestep index -> MLP (DiT / MAR)."""

    def __init__(self, width: int, frequencies: int = 256):
        super().__init__()
        self.frequencies = frequencies
        self.mlp = nn.Sequential(nn.Linear(frequencies, width), nn.SiLU(), nn.Linear(width, width))

    def forward(self, t: torch.Tensor, table_size: int | None = None) -> torch.Tensor:
        """Embeddings (N, w) of timesteps t (N,). With `table_size` S < N the MLP runs on the S possible
        timesteps and rows are looked up (training: mN rows draw from only S = 1000 timesteps)."""
        if table_size is not None and table_size < t.shape[0]:
            return F.embedding(t, self(torch.arange(table_size, device=t.device)))
        half = self.frequencies // 2
        freqs = torch.exp(-math.log(10000) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
        args = t.float()[:, None] * freqs[None]
        return self.mlp(torch.cat([torch.cos(args), torch.sin(args)], dim=-1))


def _modulation(y: torch.Tensor, linear: nn.Linear, one: torch.Tensor) -> list[torch.Tensor]:
    """adaLN parameters from y = SiLU(t-embedding + c): `linear` then split into width-sized pieces; `one`
    (1 at the scale pieces, 0 elsewhere) is added to the bias, so the scale comes out as 1 + scale."""
    width = linear.in_features
    return list(F.linear(y, linear.weight, linear.bias + one.to(linear.bias.dtype)).split(width, dim=-1))


class AdaLNBlock(nn.Module):
    """LayerNorm, adaLN shift/scale, Linear-SiLU-Linear, gated residual (MAR's ResBlock)."""

    def __init__(self, width: int):
        super().__init__()
        self.norm = nn.LayerNorm(width, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(width, width), nn.SiLU(), nn.Linear(width, width))
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(width, 3 * width))  # the SiLU runs once for all blocks
        # not saved: a constant (shift, scale, gate) -> (0, 1, 0) offset
        self.register_buffer("ada_one", torch.zeros(3 * width).index_fill_(0, torch.arange(width, 2 * width), 1.0),
                             persistent=False)

    def forward(self, x: torch.Tensor, y: torch.Tensor, mod: list[torch.Tensor] | None = None) -> torch.Tensor:
        """x (N, w); y = SiLU(t-embedding + c) (N, w), already activated (once for every block, not per block);
        `mod`: this block's (shift, 1 + scale, gate) when the caller computed them (the fused sampling path).
        The adaLN projection runs here otherwise, inside forward, where FSDP2 unshards this block's weights."""
        shift, scale, gate = _modulation(y, self.ada[1], self.ada_one) if mod is None else mod
        return torch.addcmul(x, gate, self.mlp(torch.addcmul(shift, self.norm(x), scale)))


class AdaLNMLP(nn.Module):
    """MAR's SimpleMLPAdaLN: eps = f(x_t, t-embedding + Linear(z)); adaLN and output zero-initialised."""

    def __init__(self, token_dim: int, cond_dim: int, width: int, blocks: int):
        super().__init__()
        self.time_embed = TimestepEmbedder(width)
        self.cond_embed = nn.Linear(cond_dim, width)
        self.input_proj = nn.Linear(token_dim, width)
        self.blocks = nn.ModuleList(AdaLNBlock(width) for _ in range(blocks))
        self.final_norm = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.final_ada = nn.Sequential(nn.SiLU(), nn.Linear(width, 2 * width))
        self.out = nn.Linear(width, token_dim)
        self.register_buffer("final_one", torch.cat([torch.zeros(width), torch.ones(width)]), persistent=False)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        for m in self.time_embed.mlp[0], self.time_embed.mlp[2]:
            nn.init.normal_(m.weight, std=0.02)
        # zero-init: each block starts as the identity and the head predicts eps = 0 (MAR's initialize_weights)
        for m in [b.ada[-1] for b in self.blocks] + [self.final_ada[-1], self.out]:
            nn.init.zeros_(m.weight)
            nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor, t_emb: torch.Tensor, c: torch.Tensor,
                mod: list[torch.Tensor] | None = None) -> torch.Tensor:
        """x (N, C), t_emb (N or 1, w), c = cond_embed(z) (N, w) -> eps (N, C). `mod`: every adaLN parameter
        from `fused_modulation` (sampling), else each block computes its own."""
        y = None if mod is not None else F.silu(t_emb + c)  # SiLU once: every adaLN projection starts with it
        h = self.input_proj(x)
        for i, block in enumerate(self.blocks):
            h = block(h, y, None if mod is None else mod[3 * i: 3 * i + 3])
        shift, scale = _modulation(y, self.final_ada[1], self.final_one) if mod is None else mod[-2:]
        return self.out(torch.addcmul(shift, self.final_norm(h), scale))

    def fused_modulation(self) -> Callable[[torch.Tensor], list[torch.Tensor]]:
        """y = t-embedding + c -> every block's (shift, 1 + scale, gate) and the final (shift, 1 + scale) in one
        matmul over all blocks' adaLN weights, concatenated once (sampling: one call per denoising step instead
        of blocks + 1; outside any block's forward, so not for FSDP2-sharded training)."""
        linears = [b.ada[1] for b in self.blocks] + [self.final_ada[1]]
        weight = torch.cat([m.weight for m in linears])  # ((3 blocks + 2) w, w)
        bias = torch.cat([m.bias for m in linears]) + torch.cat([b.ada_one for b in self.blocks] + [self.final_one])
        width = self.out.in_features
        return lambda y: list(F.linear(F.silu(y), weight, bias).split(width, dim=-1))


class DiffusionHead(nn.Module):
    """MAR's Diffusion Loss: a per-token denoiser conditioned on z, trained with eps-MSE, sampled by DDPM
    (or a fast solver: DDIM, DPM-Solver++)."""

    token_kind = "kl"
    decay_weights = False  # MAR: no weight decay anywhere in the diffusion head

    def __init__(self, width: int, token_dim: int, *, blocks: int = 6, head_width: int | None = None,
                 batch_mul: int = 4, train_steps: int = 1000):
        super().__init__()
        if token_dim < 1:
            raise ValueError(f"token_dim must be >= 1 for a diffusion head, got {token_dim}")
        self.token_dim, self.batch_mul = token_dim, batch_mul
        self.skip_zero_weight_rows = True  # on a CPU (loss)
        self.net = AdaLNMLP(token_dim, width, head_width or width, blocks)
        self.diffusion = GaussianDiffusion(train_steps)

    def activation_bytes(self, seq_len: int) -> float:
        """Activation bytes kept for the backward pass per image (harness/scale_plan.py): ~16 x width bytes per
        block for each of the seq_len x batch_mul token copies of the per-token MLP."""
        return 16.0 * seq_len * self.batch_mul * self.net.input_proj.out_features * len(self.net.blocks)

    def loss(self, z: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None,
             generator: torch.Generator | None = None, validation: bool = False) -> torch.Tensor:
        """eps-MSE of latents `target` (N, C) given z (N, W); each row repeated `batch_mul` times with its
        own timestep and noise (MAR's diffusion_batch_mul), averaged with `weight`.

        `validation`: stratified timesteps instead of independent ones: the mN rows take one timestep from each
        of mN equal strata of [0, S) (a random row gets each stratum), so every batch covers the schedule evenly
        and the mean over t has little sampling noise left; noise is still drawn from `generator`."""
        if weight is not None and not validation and self.skip_zero_weight_rows and z.device.type == "cpu":
            # Rows of weight 0 (random order's known tokens, ~16% of rows at MAR's mask ratios) add nothing to
            # the mean, so they are not computed: a kl-random training step 1.16x faster on one core
            # (docs/benchmarks.md). The row count depends on the data, a host sync, free on a CPU; on an
            # accelerator every row runs, as in MAR.
            keep = (weight > 0).nonzero().squeeze(1)
            z, target, weight = z.index_select(0, keep), target.index_select(0, keep), weight.index_select(0, keep)
        m, n, steps = self.batch_mul, z.shape[0], self.diffusion.train_steps
        c = self.net.cond_embed(z).repeat(m, 1)  # (mN, w): projected before repeating, the same rows m times
        t = None
        if validation:
            strata = rng.permutations(1, m * n, generator, z.device)[0]  # (mN,): stratum of each row
            u = rng.uniform((m * n,), generator, z.device)
            t = ((strata + u) * (steps / (m * n))).long()  # (mN,) in [0, S)
        per_row = self.diffusion.training_loss(lambda x_t, t: self.net(x_t, self.net.time_embed(t, steps), c),
                                               target.repeat(m, 1), generator, t=t)
        return _weighted_mean(per_row, None if weight is None else weight.repeat(m))

    def sample(self, z: torch.Tensor, *, temperature: float, cfg_scale: float | None = None,
               generator: torch.Generator | None = None, steps: int | None = 100,
               x0_clip: float | None = None, solver: str = "ddpm") -> torch.Tensor:
        """Latents (N, C) for every row of z at once; guidance on eps with the same noise for both halves;
        `x0_clip` bounds the predicted x0 at every step (None: MAR's unclipped sampler); `solver`: ddpm (MAR),
        ddim or dpm++ (variants/diffusion.py)."""
        steps = steps or 100
        c = self.net.cond_embed(z)  # once per call, not per denoising step
        n = z.shape[0] // 2 if cfg_scale is not None else z.shape[0]
        timesteps = torch.tensor(self.diffusion.timesteps(steps, solver), device=z.device)
        t_emb = self.net.time_embed(timesteps)  # (K, w): every step's embedding in one call
        modulation = self.net.fused_modulation()

        def denoise(x: torch.Tensor, k: int) -> torch.Tensor:
            mod = modulation(t_emb[k] + c)  # every row shares the timestep
            if cfg_scale is None:
                return self.net(x, None, None, mod)
            cond, uncond = self.net(torch.cat([x, x]), None, None, mod).chunk(2)
            return uncond + cfg_scale * (cond - uncond)

        noise = rng.normal((n, self.token_dim), generator, z.device)
        return self.diffusion.sample(denoise, noise, steps, temperature, generator, x0_clip=x0_clip, solver=solver)
