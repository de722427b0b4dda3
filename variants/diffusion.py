"""DDPM maths for the per-token diffusion head (MAR's `create_diffusion`, trimmed to what the head uses).

Cosine betas (IDDPM's `squaredcos_cap_v2`), 1000 training steps, eps-prediction with a plain MSE. MAR also
learns the variance with IDDPM's hybrid loss; that is left out here: sampling uses the fixed posterior variance
("fixed small", clipped at t = 0 as IDDPM does). Sampling is respaced to `steps` timesteps exactly like IDDPM's
`space_timesteps(1000, [steps])`, the network still sees the original timestep indices, and the injected noise
is multiplied by the temperature (MAR's `p_sample`). No parameters: schedules are recomputed from settings.
"""
from __future__ import annotations

import math
from typing import Callable

import torch

from variants import rng

# eps = net(x_t (N, C), t (N,) int64 original indices, cond rows) -> (N, C)
Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def cosine_betas(steps: int, max_beta: float = 0.999) -> torch.Tensor:
    """IDDPM's cosine schedule: alpha_bar(t) = cos((t + 0.008) / 1.008 * pi / 2)^2, betas capped at 0.999."""
    def alpha_bar(t: float) -> float:
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2
    return torch.tensor([min(1 - alpha_bar((i + 1) / steps) / alpha_bar(i / steps), max_beta)
                         for i in range(steps)], dtype=torch.float64, device="cpu")


def respaced_timesteps(train_steps: int, steps: int) -> list[int]:
    """IDDPM's space_timesteps(train_steps, [steps]): `steps` indices spread evenly, rounded, from 0."""
    if not 1 <= steps <= train_steps:
        raise ValueError(f"head_steps must be in [1, {train_steps}], got {steps}")
    stride = (train_steps - 1) / (steps - 1) if steps > 1 else 1
    return sorted({round(i * stride) for i in range(steps)})


class GaussianDiffusion:
    """Forward process and respaced ancestral sampling for eps-prediction; float64 tables moved per call."""

    def __init__(self, train_steps: int = 1000):
        self.train_steps = train_steps
        self.betas = cosine_betas(train_steps)
        self.alphas_cumprod = torch.cumprod(1 - self.betas, dim=0)  # (S,) float64
        self._train_ab: dict[str, torch.Tensor] = {}  # alphas_cumprod per device
        self._tables: dict[tuple[int, str], dict[str, torch.Tensor]] = {}  # per (steps, device)

    def training_loss(self, net: Denoiser, x0: torch.Tensor, generator: torch.Generator | None,
                      t: torch.Tensor | None = None) -> torch.Tensor:
        """Per-row eps MSE (N,), t ~ U{0..S-1} (unless given, (N,) int64) and noise drawn from `generator`."""
        n = x0.shape[0]
        if t is None:
            t = rng.integers(self.train_steps, (n,), generator, x0.device)
        noise = rng.normal(tuple(x0.shape), generator, x0.device).to(x0.dtype)
        if str(x0.device) not in self._train_ab:
            self._train_ab[str(x0.device)] = self.alphas_cumprod.float().to(x0.device)
        ab = self._train_ab[str(x0.device)][t][:, None]  # (N, 1)
        x_t = ab.sqrt() * x0 + (1 - ab).sqrt() * noise
        return (net(x_t, t) - noise).float().pow(2).mean(dim=-1)

    def _sample_table(self, steps: int, device: torch.device) -> dict[str, torch.Tensor]:
        """Respaced betas and posterior coefficients (IDDPM's SpacedDiffusion), float32 on `device`."""
        key = (steps, str(device))
        if key not in self._tables:
            kept = respaced_timesteps(self.train_steps, steps)
            ab = self.alphas_cumprod[kept]  # (K,)
            ab_prev = torch.cat([torch.ones(1, dtype=torch.float64, device="cpu"), ab[:-1]])
            betas = 1 - ab / ab_prev
            var = betas * (1 - ab_prev) / (1 - ab)
            # log variance clipped at the first step, where the posterior variance is 0 (IDDPM)
            log_var = torch.log(torch.cat([var[1:2], var[1:]])) if len(kept) > 1 else torch.log(betas)
            table = {
                "t": torch.tensor(kept, dtype=torch.int64, device="cpu"),
                "recip_ab": (1 / ab).sqrt(), "recipm1_ab": (1 / ab - 1).sqrt(),
                "coef_x0": betas * ab_prev.sqrt() / (1 - ab), "coef_xt": (1 - ab_prev) * (1 - betas).sqrt() / (1 - ab),
                "sigma": (0.5 * log_var).exp(),
            }
            self._tables[key] = {k: (v if v.dtype == torch.int64 else v.float()).to(device) for k, v in table.items()}
        return self._tables[key]

    def sample(self, net: Denoiser, noise: torch.Tensor, steps: int, temperature: float,
               generator: torch.Generator | None, x0_clip: float | None = None) -> torch.Tensor:
        """Denoise `noise` (N, C) in `steps` respaced steps; fresh noise each step is scaled by `temperature`.

        `x0_clip`: clamp the predicted x0 to [-x0_clip, x0_clip] before each posterior step (diffusers'
        `DDPMScheduler(clip_sample=True, clip_sample_range=...)`, IDDPM's `clip_denoised`). None is MAR's path
        (`clip_denoised=False`). Why it matters: alpha_bar at the last training step of the capped cosine
        schedule is ~2.4e-9, so x0 = (x - sqrt(1 - ab) eps) / sqrt(ab) multiplies the head's eps error by
        ~2e4 at the first step; a long-trained head gets eps at t ~ T right, a briefly trained one does not,
        and without the clamp its latents explode (std ~500 for unit-variance data, measured on the embedded
        sweep, docs/design.md).
        """
        table = self._sample_table(steps, noise.device)
        x = noise
        n_steps = table["t"].shape[0]
        for i in reversed(range(n_steps)):
            t = table["t"][i].expand(x.shape[0])
            eps = net(x, t).to(x.dtype)
            x0 = table["recip_ab"][i] * x - table["recipm1_ab"][i] * eps
            if x0_clip is not None:
                x0 = x0.clamp(-x0_clip, x0_clip)
            mean = table["coef_x0"][i] * x0 + table["coef_xt"][i] * x
            if i > 0:
                x = mean + table["sigma"][i] * temperature * rng.normal(tuple(x.shape), generator, x.device)
            else:
                x = mean
        return x
