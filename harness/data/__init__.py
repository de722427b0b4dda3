"""Data: ShapesT2I (procedural, embedded default) and loaders for MS-COCO captions and WebDataset shards.

Every data set yields `(image, caption)` with `image` a uint8 tensor (3, H, W); `open_dataset` opens any kind.
"""
from __future__ import annotations

from pathlib import Path

from harness.errors import FluidbenchError

KINDS = ("shapes", "coco", "wds")
RESIZE_FILTER = "bicubic"  # centre crop, then this filter down to the resolution (COCO and WebDataset)
DEFAULT_RESOLUTION = 256  # the paper's; ShapesT2I keeps the size it was generated at


def open_dataset(kind: str, path: str | Path, split: str = "train", image_size: int | None = None,
                 n: int | None = None, seed: int = 0, resize_filter: str = RESIZE_FILTER):
    """Open a data set of (uint8 tensor (3, H, W), caption) items.

    kind: "shapes" (a `fluidbench data shapes` folder; n = its first n images, already a random sample),
    "coco" (a COCO 2014 folder; a seeded sample of n images, one caption each) or "wds" / "webdataset"
    (tar shards: a file, a folder of .tar files or a brace pattern; `{split}` in the path is replaced; an
    iterable of its first n samples). image_size: None = the data set's own (ShapesT2I) or 256.
    """
    if kind == "shapes":
        from harness.data.shapes import ShapesDataset

        dataset = ShapesDataset(path, split, n=n)
        if image_size is not None and image_size != dataset.image_size:
            raise FluidbenchError(f"image size {image_size}: ShapesT2I at {path} is "
                                  f"{dataset.image_size}x{dataset.image_size} (generate it at that size)")
        return dataset
    if kind == "coco":
        from harness.data.coco import CocoCaptions

        return CocoCaptions(path, split, image_size or DEFAULT_RESOLUTION, n=n, seed=seed,
                            resize_filter=resize_filter)
    if kind in ("wds", "webdataset"):
        from harness.data.wds import WebDatasetShards

        return WebDatasetShards(path, split, image_size or DEFAULT_RESOLUTION, n=n, resize_filter=resize_filter)
    raise FluidbenchError(f"data kind '{kind}': expected one of {', '.join(KINDS)}")
