"""Random draws through an explicit torch.Generator, made on the generator's device, then moved.

A CPU generator may drive a CUDA model (the harness keeps its RNG state on the host for exact resume), so
tensors are created where the generator lives and moved to the model's device afterwards.
"""
from __future__ import annotations

import torch


def _where(generator: torch.Generator | None, device: torch.device) -> torch.device:
    return generator.device if generator is not None else torch.device(device)


def uniform(shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    """U[0, 1) float32 of `shape` on `device`."""
    x = torch.rand(shape, generator=generator, device=_where(generator, device))
    return x.to(device, non_blocking=True)


def normal(shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    """N(0, 1) float32 of `shape` on `device`."""
    x = torch.randn(shape, generator=generator, device=_where(generator, device))
    return x.to(device, non_blocking=True)


def gumbel(shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    """Standard Gumbel float32 of `shape` on `device`: -log(-log(u)), u uniform kept off 0 and 1 (Gumbel-max)."""
    u = uniform(shape, generator, device).clamp_(1e-20, 1 - 1e-7)
    return -torch.log(-torch.log(u))


def integers(high: int, shape: tuple[int, ...], generator: torch.Generator | None,
             device: torch.device) -> torch.Tensor:
    """Uniform int64 in [0, high) of `shape` on `device`."""
    x = torch.randint(0, high, shape, generator=generator, device=_where(generator, device))
    return x.to(device, non_blocking=True)


def permutations(batch: int, length: int, generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    """One random permutation of range(length) per row: (batch, length) int64."""
    return uniform((batch, length), generator, device).argsort(dim=1)
