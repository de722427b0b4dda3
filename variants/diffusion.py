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

# eps = net(x_t (N, C), t (N,) int64 original indices) -> (N, C): training
Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
# eps = net(x_t (N, C), k) at step index k of GaussianDiffusion.timesteps(steps): sampling
StepDenoiser = Callable[[torch.Tensor, int], torch.Tensor]


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
    """Forward process and respaced sampling (DDPM, DDIM, DPM-Solver++) for eps-prediction."""

    def __init__(self, train_steps: int = 1000):
        self.train_steps = train_steps
        self.betas = cosine_betas(train_steps)
        self.alphas_cumprod = torch.cumprod(1 - self.betas, dim=0)  # (S,) float64
        self._train_ab: dict[str, torch.Tensor] = {}  # alphas_cumprod per device

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

    def timesteps(self, steps: int, solver: str = "ddpm") -> list[int]:
        """The original timestep indices a `steps`-step sampler visits, increasing (it walks them backwards).

        ddpm: IDDPM's respacing (MAR), from 0 to S - 1. ddim, dpm++: diffusers' DPMSolverMultistepScheduler
        "linspace" spacing, linspace(0, S - 1, steps + 1) rounded without its 0, then a last step to the data
        (sigma = 0). Not IDDPM's list for these: its final step from t = 0 to sigma = 0 spends an evaluation
        on nothing, and the second-order step before it, into t = 0 (lambda ~5), overshoots (data std 1.29x
        at 10 steps on exact Gaussian eps, tests/test_head_solvers.py; 0.95x with this spacing)."""
        if solver == "ddpm":
            return respaced_timesteps(self.train_steps, steps)
        if not 1 <= steps <= self.train_steps:
            raise ValueError(f"head_steps must be in [1, {self.train_steps}], got {steps}")
        S = self.train_steps
        return sorted({round((S - 1) * i / steps) for i in range(1, steps + 1)})

    def solver(self, kind: str, steps: int, *, temperature: float = 1.0, x0_clip: float | None = None,
               generator: torch.Generator | None = None) -> "Solver":
        """A stateful `step(k, x, eps) -> x` for step index k = K-1 .. 0 of `timesteps(steps)` (see `Solver`)."""
        if kind not in SOLVERS:
            raise ValueError(f"head_solver must be one of {', '.join(SOLVERS)}, got {kind!r}")
        return Solver(kind, self.alphas_cumprod, self.timesteps(steps, kind), temperature, x0_clip, generator)

    def sample(self, net: StepDenoiser, noise: torch.Tensor, steps: int, temperature: float,
               generator: torch.Generator | None, x0_clip: float | None = None, solver: str = "ddpm") -> torch.Tensor:
        """Denoise `noise` (N, C) in `steps` steps of `solver`; `net(x, k)` is eps at step index k (the caller
        embeds `timesteps(steps, solver)[k]`, once per call rather than once per step).

        `solver`: "ddpm" (MAR's ancestral sampler: fresh noise each step, scaled by `temperature`), "ddim"
        (eta = 0) or "dpm++" (DPM-Solver++ 2M); the last two are deterministic ODE solvers whose only noise is
        the initial one, so `temperature` scales that (the temperature of flow models, Kingma & Dhariwal 2018).

        `x0_clip`: clamp the predicted x0 to [-x0_clip, x0_clip] at every step (diffusers' `clip_sample`, IDDPM's
        `clip_denoised`). None is MAR's path (`clip_denoised=False`). Why it matters: alpha_bar at the last
        training step of the capped cosine schedule is ~2.4e-9, so x0 = (x - sqrt(1 - ab) eps) / sqrt(ab)
        multiplies the head's eps error by ~2e4 at the first step; a long-trained head gets eps at t ~ T right,
        a briefly trained one does not, and without the clamp its latents explode (std ~500 for unit-variance
        data, measured on the embedded sweep, docs/design.md).
        """
        step = self.solver(solver, steps, temperature=temperature, x0_clip=x0_clip, generator=generator)
        x = noise if solver == "ddpm" else noise * temperature
        for k in reversed(range(len(step.timesteps))):
            x = step(k, x, net(x, k).to(x.dtype))
        return x


SOLVERS = ("ddpm", "ddim", "dpm++")


class Solver:
    """One sampler's update rule over timesteps t_{K-1} > ... > t_0, called once per step with the model's eps.

    Coefficients are Python floats computed in float64 once per call (no per-step table lookups on the device).
    ddpm   IDDPM's p_sample on the respaced posterior (fixed small variance, clipped at the first step).
    ddim   diffusers' DDIMScheduler.step with eta = 0, `clip_sample` = x0_clip and the final alpha_bar set to one;
           the previous timestep is the next one of the list (diffusers subtracts 1000 // K, the same for its
           "leading"/"trailing" spacing when K divides 1000).
    dpm++  diffusers' DPMSolverMultistepScheduler(algorithm_type="dpmsolver++", solver_order=2,
           solver_type="midpoint", final_sigmas_type="zero"): first order at the first and last steps, the
           predicted x0 clamped where diffusers would threshold it (Lu et al. 2022, arXiv 2211.01095).
    """

    def __init__(self, kind: str, alphas_cumprod: torch.Tensor, timesteps: list[int], temperature: float,
                 x0_clip: float | None, generator: torch.Generator | None):
        self.kind, self.timesteps, self.temperature = kind, timesteps, temperature
        self.x0_clip, self.generator = x0_clip, generator
        self.ab = [float(alphas_cumprod[t]) for t in timesteps]
        self.ab_prev = [1.0] + self.ab[:-1]  # alpha_bar where step k lands (t_{k-1}); 1.0 after the last
        self.previous_x0: torch.Tensor | None = None  # dpm++: the data prediction of the step before

    def _x0(self, k: int, x: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        ab = self.ab[k]
        x0 = math.sqrt(1 / ab) * x - math.sqrt(1 / ab - 1) * eps
        return x0 if self.x0_clip is None else x0.clamp(-self.x0_clip, self.x0_clip)

    def __call__(self, k: int, x: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        x0 = self._x0(k, x, eps)
        ab, ab_prev = self.ab[k], self.ab_prev[k]
        if self.kind == "ddpm":
            beta = 1 - ab / ab_prev
            mean = (beta * math.sqrt(ab_prev) / (1 - ab)) * x0 + ((1 - ab_prev) * math.sqrt(1 - beta) / (1 - ab)) * x
            if k == 0:  # the posterior variance is 0 at the first timestep: no noise (IDDPM)
                return mean
            sigma = math.sqrt(beta * (1 - ab_prev) / (1 - ab))
            noise = rng.normal(tuple(x.shape), self.generator, x.device).to(x.dtype)
            return mean + (sigma * self.temperature) * noise
        if self.kind == "ddim":
            return math.sqrt(ab_prev) * x0 + math.sqrt(1 - ab_prev) * eps
        # dpm++ 2M in diffusers' variables: alpha_t = sqrt(ab), sigma_t = sqrt(1 - ab), lambda = log(alpha / sigma)
        lam = lambda a: 0.5 * math.log(a / (1 - a))  # noqa: E731
        previous, self.previous_x0 = self.previous_x0, x0
        if k == 0:  # the final step lands on sigma = 0: the data prediction itself
            return x0
        h = lam(ab_prev) - lam(ab)
        scale = math.sqrt((1 - ab_prev) / (1 - ab))
        step = -math.sqrt(ab_prev) * math.expm1(-h)  # alpha_t (1 - e^-h)
        if previous is None:
            return scale * x + step * x0
        h_last = lam(ab) - lam(self.ab[k + 1])
        d1 = (x0 - previous) * (h / h_last)
        return scale * x + step * x0 + (0.5 * step) * d1
