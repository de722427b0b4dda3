"""Where tensors live and in what precision: one rule for training, evaluation, caches and benchmarks."""
from __future__ import annotations

import torch


def default_device(name: str | torch.device | None = None) -> torch.device:
    """`name` as a device; None or "auto" is the first GPU when there is one, else the CPU."""
    if name is None or name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def autocast_dtype(setting: str, device: torch.device | str) -> torch.dtype | None:
    """The autocast dtype of a run's `dist.dtype` (auto | fp32 | bf16) on `device`: bf16 when asked, or by
    default on CUDA; None = full fp32. Training and the validation loss of its checkpoints use the same rule."""
    if setting == "bf16" or (setting == "auto" and torch.device(device).type == "cuda"):
        return torch.bfloat16
    return None


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """Host batch -> device without a sync: a copy from pageable memory would wait for the stream."""
    if device.type == "cpu":
        return batch
    return {k: v.pin_memory().to(device, non_blocking=True) for k, v in batch.items()}
