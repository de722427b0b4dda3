"""Data: ShapesT2I (procedural, embedded default) and loaders for MS-COCO captions and WebDataset shards.

Every data set yields `(image, caption)` with `image` a uint8 tensor (3, H, W); `open_dataset` opens any kind.
`profile(kind)` says what else differs by kind (default FID extractor, GenEval detector and prompt file, ...),
so no other code asks which kind of data it has.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from harness.errors import FluidbenchError

RESIZE_FILTER = "bicubic"  # centre crop, then this filter down to the resolution (COCO and WebDataset)
DEFAULT_RESOLUTION = 256  # the paper's; ShapesT2I keeps the size it was generated at


def _open_shapes(path, split, image_size, n, seed, resize_filter):
    from harness.data.shapes import ShapesDataset

    dataset = ShapesDataset(path, split, n=n)
    if image_size is not None and image_size != dataset.image_size:
        raise FluidbenchError(f"image size {image_size}: ShapesT2I at {path} is "
                              f"{dataset.image_size}x{dataset.image_size} (generate it at that size)")
    return dataset


def _open_coco(path, split, image_size, n, seed, resize_filter):
    from harness.data.coco import CocoCaptions

    return CocoCaptions(path, split, image_size or DEFAULT_RESOLUTION, n=n, seed=seed, resize_filter=resize_filter)


def _open_wds(path, split, image_size, n, seed, resize_filter):
    from harness.data.wds import WebDatasetShards

    return WebDatasetShards(path, split, image_size or DEFAULT_RESOLUTION, n=n, resize_filter=resize_filter)


@dataclass(frozen=True)
class DataProfile:
    """What differs by kind of data, in one place: how to open it and what evaluating on it means by default."""

    kind: str
    open: Callable[..., Any]        # (path, split, image_size, n, seed, resize_filter) -> data set
    native_size: bool               # images keep the size they were made at (ShapesT2I), else resized
    extractor: str                  # FID feature extractor (eval/fid.py): Shapes-FID or torch-fidelity's Inception
    detector: str                   # GenEval detector (eval/detectors.py)
    trains_extractor: bool          # its FID extractor is trained on the data itself (a sweep job)
    scene_oracle: bool              # eval/shapes_oracle.py reads its images exactly
    prompt_file: str | None         # its own GenEval prompt file inside the data folder (None: GenEval's official)
    reference_n: int | None = None  # images of its FID reference by default (None: the whole split)
    fid_floor: bool = False         # eval fid also scores real images of the other split (the real-vs-real floor)
    plain_background: bool = False  # every image's background is one flat colour: one vq code (eval fid's paint)

    def prompts(self, path: str | Path) -> Path | None:
        """The GenEval prompt file that goes with data at `path`, or None for GenEval's official prompts."""
        return Path(path) / self.prompt_file if self.prompt_file else None


_WEB = dict(open=_open_wds, native_size=False, extractor="inception", detector="mmdet", trains_extractor=False,
            scene_oracle=False, prompt_file=None)
PROFILES = {
    "shapes": DataProfile("shapes", _open_shapes, native_size=True, extractor="shapes", detector="shapes-oracle",
                          trains_extractor=True, scene_oracle=True, prompt_file="geneval_metadata.jsonl",
                          fid_floor=True, plain_background=True),
    "coco": DataProfile("coco", _open_coco, native_size=False, extractor="inception", detector="mmdet",
                        trains_extractor=False, scene_oracle=False, prompt_file=None, reference_n=30000),  # COCO-30K
    "wds": DataProfile("wds", **_WEB),
    "webdataset": DataProfile("webdataset", **_WEB),
}
KINDS = tuple(PROFILES)


def profile(kind: str) -> DataProfile:
    """The profile of a data kind; an unknown kind is a one-line error naming the choices."""
    if kind not in PROFILES:
        raise FluidbenchError(f"data kind '{kind}': expected one of {', '.join(PROFILES)}")
    return PROFILES[kind]


def open_dataset(kind: str, path: str | Path, split: str = "train", image_size: int | None = None,
                 n: int | None = None, seed: int = 0, resize_filter: str = RESIZE_FILTER):
    """Open a data set of (uint8 tensor (3, H, W), caption) items.

    kind: "shapes" (a `fluidbench data shapes` folder; n = its first n images, already a random sample),
    "coco" (a COCO 2014 folder; a seeded sample of n images, one caption each) or "wds" / "webdataset"
    (tar shards: a file, a folder of .tar files or a brace pattern; `{split}` in the path is replaced; an
    iterable of its first n samples). image_size: None = the data set's own (ShapesT2I) or 256.
    """
    return profile(kind).open(path, split, image_size, n, seed, resize_filter)
