"""Per-image features beside the FID statistics: KID, precision / recall and the bootstrap need every image's
features, not only their mean and covariance.

The reference's features are cached beside its statistics (same name, `-features.npy`), computed in the same pass
so the statistics are exactly eval.fid's; a generated set's are kept with its samples.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable

import numpy as np
import torch

from eval.fid import (FeatureExtractor, FeatureStats, ReferenceProtocol, ReferenceStats, extract_stats,
                      load_reference_stats, reference_key, reference_path)
from harness.atomic import atomic_path, write_json
from harness.errors import FluidbenchError


class _Recording:
    """An extractor that keeps a float32 CPU copy of every batch of features it returns."""

    def __init__(self, extractor: FeatureExtractor):
        self.inner, self.rows = extractor, []
        self.name, self.dim, self.checksum = extractor.name, extractor.dim, extractor.checksum

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        features = self.inner(images)
        self.rows.append(features.detach().float().cpu())
        return features


def extract_features(images: Iterable[torch.Tensor], extractor: FeatureExtractor, *, limit: int | None = None,
                     resolution: int | None = None, progress: str | None = None,
                     total: int | None = None) -> tuple[torch.Tensor, FeatureStats]:
    """(features (N, D) float32, their float64 statistics) of uint8 batches, through eval.fid.extract_stats."""
    recording = _Recording(extractor)
    stats = extract_stats(images, recording, limit=limit, resolution=resolution, progress=progress, total=total)
    features = torch.cat(recording.rows)[: stats.n] if recording.rows else torch.zeros(0, extractor.dim)
    return features, stats


def save_features(path: str | Path, features: torch.Tensor) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.save(f, features.numpy().astype(np.float32))


def load_features(path: str | Path, dim: int) -> torch.Tensor:
    try:
        array = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise FluidbenchError(f"{path}: not a features file ({e})") from None
    if array.ndim != 2 or array.shape[1] != dim:
        raise FluidbenchError(f"{path}: features of shape {array.shape}, expected (N, {dim})")
    return torch.from_numpy(array)


def features_path(stats_path: Path) -> Path:
    return stats_path.with_name(stats_path.stem + "-features.npy")


def reference_features(protocol: ReferenceProtocol, images: Iterable[torch.Tensor], extractor: FeatureExtractor,
                       cache_dir: str | Path, *, rebuild: bool = False, progress: str | None = "reference",
                       total: int | None = None) -> tuple[ReferenceStats, torch.Tensor]:
    """The reference statistics and per-image features under `protocol`, from the cache when both are there."""
    key = reference_key(protocol, extractor)
    path = reference_path(cache_dir, key)
    feats = features_path(path)
    if path.is_file() and path.with_suffix(".json").is_file() and feats.is_file() and not rebuild:
        return load_reference_stats(path), load_features(feats, extractor.dim)
    features, stats = extract_features(images, extractor, limit=protocol.n, resolution=protocol.resolution,
                                       progress=progress, total=total)
    if protocol.n is not None and stats.n != protocol.n:
        raise FluidbenchError(f"--n {protocol.n}: the data set gave only {stats.n} images")
    save_features(feats, features)
    stats.save(path)
    write_json(path.with_suffix(".json"), {"protocol": key, "n_images": stats.n})  # last: marks complete
    return ReferenceStats(path, stats, key), features
