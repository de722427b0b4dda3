"""FID's reference statistics: real images under a named protocol (data set, split, N, seed, crop, resize
filter, resolution, source), cached under a name hashing the protocol with the extractor and its weights
checksum, so a changed setting can never reuse stale numbers; and FID of generated images against them.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable

import torch

from eval.fid_extractors import FeatureExtractor
from eval.fid_stats import FeatureStats, extract_stats, fid_between
from harness.atomic import write_json
from harness.errors import FluidbenchError
from harness.hashing import sha256_json


STATS_VERSION = 2  # bump when the statistics format or the cache key changes


@dataclass(frozen=True)
class ReferenceProtocol:
    """How the real images were chosen and prepared; with the extractor it names the cached statistics."""

    dataset: str            # "coco", "shapes", "webdataset"
    split: str              # "train2014", "val2014", "val", ...
    n: int | None           # None = the whole split
    seed: int               # which N images (and which caption of each)
    crop: str               # "center" for COCO, "none" for ShapesT2I
    resize_filter: str      # e.g. "bicubic", "none"
    resolution: int         # the generation resolution; generated images must match it
    source: str = ""        # which copy of the data: a content hash for ShapesT2I and shards ("" for COCO 2014,
                            # which is the same everywhere, so its statistics are shared across machines)


def reference_protocol(kind: str, split: str, n: int | None, seed: int, resolution: int,
                       resize_filter: str = "bicubic", path: str | Path | None = None) -> ReferenceProtocol:
    """The protocol with canonical names, so the CLI and run evaluation share one cache entry per protocol.

    COCO splits are named as the annotation files ("train2014", Fluid's; "val2014", Imagen's and Muse's);
    ShapesT2I is used at its generated size, neither cropped nor resized; COCO and WebDataset images are
    centre-cropped and resized with `resize_filter` (harness.data.RESIZE_FILTER unless a setting says otherwise).
    """
    kind = "wds" if kind == "webdataset" else kind
    source = _source(path) if path is not None and kind != "coco" else ""
    if kind == "shapes":
        return ReferenceProtocol(kind, split, n, seed, "none", "none", resolution, source)
    if kind == "coco":
        split = split.removesuffix("2014") + "2014"
    return ReferenceProtocol(kind, split, n, seed, "center", resize_filter, resolution, source)


def _source(path: str | Path) -> str:
    """A short content identity of a data set (two ShapesT2I folders of other seeds never share statistics)."""
    from harness.cache import data_fingerprint

    fingerprint = {k: v for k, v in data_fingerprint(path).items() if k != "path"} or {"path": str(path)}
    return sha256_json(fingerprint)[:16]


def reference_key(protocol: ReferenceProtocol, extractor: FeatureExtractor) -> dict:
    return {**asdict(protocol), "extractor": extractor.name, "weights_sha256": extractor.checksum,
            "stats_version": STATS_VERSION}


def reference_path(cache_dir: str | Path, key: dict) -> Path:
    digest = sha256_json(key)[:16]
    n = "all" if key["n"] is None else key["n"]
    name = f"{key['dataset']}-{key['split']}-n{n}-{key['resolution']}px-{key['extractor']}-{digest}.npz"
    return Path(cache_dir) / name


@dataclass
class ReferenceStats:
    """Cached statistics of real images and the protocol that produced them."""

    path: Path
    stats: FeatureStats
    key: dict


def load_reference_stats(path: str | Path) -> ReferenceStats:
    """Read a statistics file written by `compute_reference_stats` (with its protocol beside it)."""
    path = Path(path)
    if not path.is_file():
        raise FluidbenchError(f"{path}: reference statistics not found (build them with `fluidbench eval fid-ref`)")
    key_path = path.with_suffix(".json")
    if not key_path.is_file():
        raise FluidbenchError(f"{key_path}: protocol file missing beside the statistics")
    return ReferenceStats(path, FeatureStats.load(path), json.loads(key_path.read_text())["protocol"])


def compute_reference_stats(protocol: ReferenceProtocol, images: Iterable[torch.Tensor],
                            extractor: FeatureExtractor, cache_dir: str | Path, *, rebuild: bool = False,
                            progress: str | None = "reference", total: int | None = None) -> ReferenceStats:
    """Statistics of the real images under `protocol`, from the cache when present (`images` is then not read).

    `images` should be lazy (a generator), so that a cache hit costs nothing; it must yield exactly the
    protocol's images as uint8 batches (B, 3, resolution, resolution).
    """
    key = reference_key(protocol, extractor)
    path = reference_path(cache_dir, key)
    if path.is_file() and path.with_suffix(".json").is_file() and not rebuild:
        return load_reference_stats(path)
    stats = extract_stats(images, extractor, limit=protocol.n, resolution=protocol.resolution, progress=progress,
                          total=total)
    if protocol.n is not None and stats.n != protocol.n:
        raise FluidbenchError(f"--n {protocol.n}: the data set gave only {stats.n} images")
    stats.save(path)
    write_json(path.with_suffix(".json"), {"protocol": key, "n_images": stats.n})  # written last: marks complete
    return ReferenceStats(path, stats, key)


def fid_from_images(images: Iterable[torch.Tensor], reference: ReferenceStats | str | Path,
                    extractor: FeatureExtractor, *, limit: int | None = None,
                    progress: str | None = "generated", total: int | None = None) -> dict:
    """FID of uint8 batches (B, 3, H, W) against cached reference statistics; returns the number and its protocol.

    The extractor must be the one the reference was computed with (same name and weights checksum).
    """
    if not isinstance(reference, ReferenceStats):
        reference = load_reference_stats(reference)
    ref = reference.key
    if (ref["extractor"], ref["weights_sha256"]) != (extractor.name, extractor.checksum):
        raise FluidbenchError(f"{reference.path}: computed with {ref['extractor']} weights "
                              f"{ref['weights_sha256'][:12]}, not {extractor.name} {extractor.checksum[:12]}")
    stats = extract_stats(images, extractor, limit=limit, resolution=ref["resolution"], progress=progress,
                          total=total)
    return {"fid": fid_between(stats, reference.stats), "n_images": stats.n,
            "reference": str(reference.path), "reference_protocol": ref}


def default_cache_dir() -> Path:
    """Where reference statistics live unless --cache says otherwise ($FLUIDBENCH_FID_CACHE or results/fid-ref)."""
    return Path(os.environ.get("FLUIDBENCH_FID_CACHE", "results/fid-ref"))
