"""FID: uint8 images -> a frozen feature extractor -> float64 running statistics -> Frechet distance.

Two extractors behind one small interface (`FeatureExtractor`):
- `inception`: torch-fidelity's `inception-v3-compat` (TF 2015-12-05 weights, 2048-d pool features), the
  network behind the reference TF FID; it resizes to 299 internally with TF1's bilinear rule.
- `shapes`: the ShapesT2I domain extractor of eval/shapes_features.py (its penultimate layer).

Reference statistics are cached under a name hashing the whole protocol (data set, split, N, seed, crop, resize
filter, resolution, extractor, weights checksum), so a changed setting can never reuse stale numbers.
"""
from __future__ import annotations

import io
import json
import os
import pickle
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterable, Protocol

import numpy as np
import torch

from harness.atomic import atomic_path, write_json
from harness.errors import FluidbenchError
from harness.hashing import sha256_file, sha256_json

# torch-fidelity's published weights (torch_fidelity.feature_extractor_inceptionv3.URL_INCEPTION_V3); the
# suffix is the start of the file's sha256, torch.hub's naming convention.
INCEPTION_WEIGHTS_FILE = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_URL = f"https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/{INCEPTION_WEIGHTS_FILE}"
INCEPTION_NAME = "inception-v3-compat"
STATS_VERSION = 2  # bump when the statistics format or the cache key changes


class FeatureExtractor(Protocol):
    """A frozen network mapping uint8 images (B, 3, H, W) to float features (B, dim)."""

    name: str       # recorded in every protocol, e.g. "inception-v3-compat", "shapes-v1"
    dim: int
    checksum: str   # sha256 of the weights file: part of the reference-statistics key

    def __call__(self, images: torch.Tensor) -> torch.Tensor: ...


def inception_weights_path(path: str | Path | None = None) -> Path:
    """The Inception weights file: `path` if given, else torch-fidelity's own download location (downloading there)."""
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise FluidbenchError(f"--inception-weights {path}: file not found (expected torch-fidelity's "
                                  f"{INCEPTION_WEIGHTS_FILE} from {INCEPTION_URL})")
        return path
    # The same place torch_fidelity's load_state_dict_from_url uses: $TORCH_HOME/hub/checkpoints/.
    cached = Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_WEIGHTS_FILE
    if cached.is_file():
        return cached
    try:
        cached.parent.mkdir(parents=True, exist_ok=True)
        torch.hub.download_url_to_file(INCEPTION_URL, str(cached), progress=sys.stderr.isatty())
    except Exception as e:  # no network (urllib raises several types): one clear line instead of a trace
        raise FluidbenchError(f"Inception weights {INCEPTION_WEIGHTS_FILE} not found in {cached.parent} and the "
                              f"download from {INCEPTION_URL} failed ({type(e).__name__}); download it elsewhere "
                              f"and pass --inception-weights PATH") from None
    return cached


class InceptionFeatures:
    """torch-fidelity's TF-compatible InceptionV3, 2048-d pool3 features of uint8 images."""

    name = INCEPTION_NAME
    dim = 2048

    def __init__(self, weights: str | Path | None = None, device: str | torch.device = "cpu"):
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

        path = inception_weights_path(weights)
        self.checksum = sha256_file(path)
        try:
            # torch-fidelity would torch.load(weights_only=False) the file itself, which runs any pickled code
            # it holds: we read it with weights_only=True and hand the library our re-serialised tensors
            state = torch.load(path, map_location="cpu", weights_only=True)
            if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
                raise KeyError("expected a flat dict of tensors")
            buffer = io.BytesIO()
            torch.save(state, buffer)
            buffer.seek(0)
            self.net = FeatureExtractorInceptionV3(INCEPTION_NAME, ["2048"], feature_extractor_weights_path=buffer)
        except (RuntimeError, KeyError, EOFError, pickle.UnpicklingError) as e:
            raise FluidbenchError(f"{path}: not a torch-fidelity InceptionV3 state dict "
                                  f"({' '.join(str(e).split())[:200]})") from None
        self.net.to(device)

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        device = next(self.net.parameters()).device
        (features,) = self.net(images.to(device))
        return features  # (B, 2048) float32


def load_extractor(name: str, weights: str | Path | None = None,
                   device: str | torch.device = "cpu") -> FeatureExtractor:
    """`inception` (weights: torch-fidelity's .pth file) or `shapes` (weights: a train-features folder)."""
    if name in ("inception", INCEPTION_NAME):
        return InceptionFeatures(weights, device)
    if name == "shapes" or name.startswith("shapes-"):
        from eval.shapes_features import load_shapes_features

        if weights is None:
            raise FluidbenchError("--features: the shapes extractor needs the folder written by "
                                  "`fluidbench eval train-features`")
        return load_shapes_features(weights, device)
    raise FluidbenchError(f"--extractor {name}: unknown (expected 'inception' or 'shapes')")


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


def default_cache_dir() -> Path:
    """Where reference statistics live unless --cache says otherwise ($FLUIDBENCH_FID_CACHE or results/fid-ref)."""
    return Path(os.environ.get("FLUIDBENCH_FID_CACHE", "results/fid-ref"))
