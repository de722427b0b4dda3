"""The two heads that turn backbone outputs z into a loss and into tokens.

Both follow MAR's `DiffLoss` seam, two methods and nothing else the orders need:
    loss(z (N, W), target, weight (N,) | None, generator, validation) -> scalar   # weighted mean over rows
    sample(z, *, temperature, cfg_scale, generator, steps, x0_clip) -> tokens  # (N,) codes or (N, C) latents
With guidance (`cfg_scale` not None), z holds [conditional rows; null-text rows] (2N, W) and N tokens come
back. `token_kind` says which tokenizer layout the head speaks. `validation` asks for the validation protocol's
low-variance draws where the head has any (the diffusion head's timesteps).
"""
from __future__ import annotations

import math

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
               x0_clip: float | None = None) -> torch.Tensor:
        """Codes (N,): guidance on logits l_u + w (l_c - l_u), then temperature, top-k, Gumbel-max draw.
        `steps` and `x0_clip` are diffusion settings, ignored here so one setting serves every variant."""
        logits = self.proj(z).float()
        if cfg_scale is not None:
            cond, uncond = logits.chunk(2)
            logits = uncond + cfg_scale * (cond - uncond)
        if temperature <= 0:
            return logits.argmax(dim=-1)
        logits = logits / temperature
        if self.top_k is not None and self.top_k < self.vocab_size:
            kth = logits.topk(self.top_k, dim=-1).values[:, -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        u = rng.uniform(tuple(logits.shape), generator, logits.device).clamp_(1e-20, 1 - 1e-7)
        return (logits - torch.log(-torch.log(u))).argmax(dim=-1)  # Gumbel-max == a categorical draw


class TimestepEmbedder(nn.Module):
    """Sinusoidal features of the timestep index -> MLP (DiT / MAR)."""

    def __init__(self, width: int, frequencies: int = 256):
        super().__init__()
        self.frequencies = frequencies
        self.mlp = nn.Sequential(nn.Linear(frequencies, width), nn.SiLU(), nn.Linear(width, width))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        half = self.frequencies // 2
        freqs = torch.exp(-math.log(10000) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
        args = t.float()[:, None] * freqs[None]
        return self.mlp(torch.cat([torch.cos(args), torch.sin(args)], dim=-1))


class AdaLNBlock(nn.Module):
    """LayerNorm, adaLN shift/scale, Linear-SiLU-Linear, gated residual (MAR's ResBlock)."""

    def __init__(self, width: int):
        super().__init__()
        self.norm = nn.LayerNorm(width, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(width, width), nn.SiLU(), nn.Linear(width, width))
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(width, 3 * width))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        shift, scale, gate = self.ada(y).chunk(3, dim=-1)
        return x + gate * self.mlp(self.norm(x) * (1 + scale) + shift)


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

    def forward(self, x: torch.Tensor, t_emb: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """x (N, C), t_emb (N or 1, w), c = cond_embed(z) (N, w) -> eps (N, C)."""
        y = t_emb + c
        h = self.input_proj(x)
        for block in self.blocks:
            h = block(h, y)
        shift, scale = self.final_ada(y).chunk(2, dim=-1)
        return self.out(self.final_norm(h) * (1 + scale) + shift)


class DiffusionHead(nn.Module):
    """MAR's Diffusion Loss: a per-token denoiser conditioned on z, trained with eps-MSE, sampled by DDPM."""

    token_kind = "kl"
    decay_weights = False  # MAR: no weight decay anywhere in the diffusion head

    def __init__(self, width: int, token_dim: int, *, blocks: int = 6, head_width: int | None = None,
                 batch_mul: int = 4, train_steps: int = 1000):
        super().__init__()
        if token_dim < 1:
            raise ValueError(f"token_dim must be >= 1 for a diffusion head, got {token_dim}")
        self.token_dim, self.batch_mul = token_dim, batch_mul
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
        m, n = self.batch_mul, z.shape[0]
        c = self.net.cond_embed(z.repeat(m, 1))  # (mN, w)
        t = None
        if validation:
            strata = rng.permutations(1, m * n, generator, z.device)[0]  # (mN,): stratum of each row
            u = rng.uniform((m * n,), generator, z.device)
            t = ((strata + u) * (self.diffusion.train_steps / (m * n))).long()  # (mN,) in [0, S)
        per_row = self.diffusion.training_loss(lambda x_t, t: self.net(x_t, self.net.time_embed(t), c),
                                               target.repeat(m, 1), generator, t=t)
        return _weighted_mean(per_row, None if weight is None else weight.repeat(m))

    def sample(self, z: torch.Tensor, *, temperature: float, cfg_scale: float | None = None,
               generator: torch.Generator | None = None, steps: int | None = 100,
               x0_clip: float | None = None) -> torch.Tensor:
        """Latents (N, C) for every row of z at once; guidance on eps with the same noise for both halves;
        `x0_clip` bounds the predicted x0 at every step (None: MAR's unclipped sampler)."""
        c = self.net.cond_embed(z)  # once per call, not per denoising step
        n = z.shape[0] // 2 if cfg_scale is not None else z.shape[0]

        def denoise(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            t_emb = self.net.time_embed(t[:1])  # every row shares the timestep: embed it once
            if cfg_scale is None:
                return self.net(x, t_emb, c)
            cond, uncond = self.net(torch.cat([x, x]), t_emb, c).chunk(2)
            return uncond + cfg_scale * (cond - uncond)

        noise = rng.normal((n, self.token_dim), generator, z.device)
        return self.diffusion.sample(denoise, noise, steps or 100, temperature, generator, x0_clip=x0_clip)
