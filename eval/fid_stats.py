"""FID's statistics: float64 running sums of features -> Frechet distance, and uint8 image batches from
data sets, PNG files or a .npy.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch

from eval.fid_extractors import FeatureExtractor
from harness.atomic import atomic_path
from harness.errors import FluidbenchError


class FeatureStats:
    """Float64 running sums of features and of their outer products; mergeable across shards and workers."""

    def __init__(self, dim: int):
        self.n = 0
        self.sum = np.zeros(dim, dtype=np.float64)
        self.outer = np.zeros((dim, dim), dtype=np.float64)

    def update(self, features: torch.Tensor | np.ndarray) -> None:
        f = torch.as_tensor(features).detach().cpu().double().numpy()  # (B, D)
        if f.ndim != 2 or f.shape[1] != self.sum.shape[0]:
            raise FluidbenchError(f"features of shape {tuple(f.shape)}: expected (B, {self.sum.shape[0]})")
        self.n += f.shape[0]
        self.sum += f.sum(axis=0)
        self.outer += f.T @ f

    def merge(self, other: "FeatureStats") -> "FeatureStats":
        out = FeatureStats(self.sum.shape[0])
        out.n, out.sum, out.outer = self.n + other.n, self.sum + other.sum, self.outer + other.outer
        return out

    @property
    def mean(self) -> np.ndarray:
        return self.sum / self.n

    @property
    def cov(self) -> np.ndarray:
        """Unbiased covariance (ddof=1), as np.cov(features, rowvar=False) in torch-fidelity and pytorch-fid."""
        if self.n < 2:
            raise FluidbenchError(f"FID needs at least 2 images, got {self.n}")
        mu = self.mean
        return (self.outer - self.n * np.outer(mu, mu)) / (self.n - 1)

    def save(self, path: str | Path) -> None:
        """npz with the sums (to merge later) and `mu`/`sigma` (pytorch-fid's keys, readable by other tools)."""
        with atomic_path(path) as tmp:
            with open(tmp, "wb") as f:
                np.savez(f, n=np.int64(self.n), sum=self.sum, outer=self.outer, mu=self.mean, sigma=self.cov)

    @classmethod
    def load(cls, path: str | Path) -> "FeatureStats":
        try:
            data = np.load(path)
            stats = cls(data["sum"].shape[0])
            stats.n, stats.sum, stats.outer = int(data["n"]), data["sum"], data["outer"]
        except (OSError, KeyError, ValueError) as e:
            raise FluidbenchError(f"{path}: not a fluidbench statistics file ({e})") from None
        return stats


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray,
                     eps: float = 1e-6) -> float:
    """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 sqrt(S1 S2)), with scipy's sqrtm as in TTUR's fid.py and pytorch-fid."""
    from scipy import linalg

    mu1, mu2 = np.atleast_1d(mu1).astype(np.float64), np.atleast_1d(mu2).astype(np.float64)
    sigma1, sigma2 = np.atleast_2d(sigma1).astype(np.float64), np.atleast_2d(sigma2).astype(np.float64)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != mu1.shape * 2:
        raise FluidbenchError(f"statistics of different shapes: mu {mu1.shape} vs {mu2.shape}, "
                              f"sigma {sigma1.shape} vs {sigma2.shape}")
    diff = mu1 - mu2
    covmean = linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():
        # Singular product (fewer images than dimensions): pytorch-fid's remedy, a small offset on the diagonal.
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        # Numerical error can leave a tiny imaginary part; a large one means the statistics are broken.
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise FluidbenchError(f"sqrtm of the covariance product has imaginary part "
                                  f"{np.max(np.abs(covmean.imag)):.3g}: too few images for the feature dimension?")
        covmean = covmean.real
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def fid_between(a: FeatureStats, b: FeatureStats) -> float:
    return frechet_distance(a.mean, a.cov, b.mean, b.cov)


def _check_batch(images: Any) -> torch.Tensor:
    images = torch.as_tensor(images)
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
        raise FluidbenchError(f"images of dtype {images.dtype} and shape {tuple(images.shape)}: "
                              f"expected uint8 (B, 3, H, W)")
    return images


def extract_stats(images: Iterable[torch.Tensor], extractor: FeatureExtractor, *, limit: int | None = None,
                  resolution: int | None = None, progress: str | None = None,
                  total: int | None = None) -> FeatureStats:
    """Stream uint8 batches (B, 3, H, W) through the extractor into float64 statistics (at most `limit` images)."""
    from tqdm import tqdm

    stats = FeatureStats(extractor.dim)
    total = limit if total is None else total
    bar = tqdm(total=total, desc=progress, unit="img", disable=progress is None, file=sys.stderr, mininterval=1.0)
    for batch in images:
        batch = _check_batch(batch)
        if resolution is not None and tuple(batch.shape[-2:]) != (resolution, resolution):
            raise FluidbenchError(f"images of size {tuple(batch.shape[-2:])}: the reference statistics were "
                                  f"computed at {resolution}x{resolution}")
        if limit is not None:
            batch = batch[: limit - stats.n]
        if len(batch):
            stats.update(extractor(batch))
            bar.update(len(batch))
        if limit is not None and stats.n >= limit:
            break
    bar.close()
    return stats


def batches_from_dataset(dataset: Any, batch_size: int = 64, workers: int = 0) -> Iterable[torch.Tensor]:
    """uint8 batches (B, 3, H, W) from a data set of (image, caption) items (harness.data.open_dataset)."""
    from torch.utils.data import DataLoader, IterableDataset

    def collate(items: list) -> torch.Tensor:
        return torch.stack([torch.as_tensor(image) for image, _ in items])

    # Workers only for map-style data: an IterableDataset would be replicated in every worker.
    workers = 0 if isinstance(dataset, IterableDataset) else workers
    yield from DataLoader(dataset, batch_size=batch_size, num_workers=workers, collate_fn=collate)


def batches_from_files(paths: list[Path], batch_size: int = 64) -> Iterable[torch.Tensor]:
    """uint8 batches from PNG files (or one .npy of uint8 (N, H, W, 3)); never JPEG for generated images."""
    from PIL import Image

    if len(paths) == 1 and paths[0].suffix == ".npy":
        array = np.load(paths[0], mmap_mode="r")
        if array.dtype != np.uint8 or array.ndim != 4 or array.shape[-1] != 3:
            raise FluidbenchError(f"{paths[0]}: expected uint8 (N, H, W, 3), got {array.dtype} {array.shape}")
        for start in range(0, len(array), batch_size):
            yield torch.from_numpy(np.array(array[start:start + batch_size])).permute(0, 3, 1, 2)
        return
    for start in range(0, len(paths), batch_size):
        batch = [np.asarray(Image.open(p).convert("RGB")) for p in paths[start:start + batch_size]]
        if len({b.shape for b in batch}) > 1:
            raise FluidbenchError(f"images of different sizes near {paths[start]}")
        yield torch.from_numpy(np.stack(batch)).permute(0, 3, 1, 2)


def image_files(root: str | Path) -> list[Path]:
    """Every PNG under `root` (a flat folder or GenEval's <index>/samples/<n>.png), sorted; or a .npy file."""
    root = Path(root)
    if root.is_file() and root.suffix == ".npy":
        return [root]
    if not root.is_dir():
        raise FluidbenchError(f"--images {root}: not a folder of PNG files or a .npy file")
    paths = sorted(root.rglob("*.png"))
    if not paths:
        jpegs = list(root.rglob("*.jp*g"))
        hint = " (JPEG files are not used: generated images must be lossless PNG)" if jpegs else ""
        raise FluidbenchError(f"--images {root}: no PNG files found{hint}")
    return paths
