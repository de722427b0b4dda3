"""MS-COCO 2014 captions: a seeded sample of images, one caption each, centre-cropped and resized.

Expected layout (the official archives unpacked into one folder):
ROOT/annotations/captions_{train,val}2014.json (or ROOT/captions_{split}2014.json) and ROOT/{split}2014/*.jpg.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from harness.data.images import FILTERS, center_crop_resize, decode
from harness.errors import FluidbenchError


def _annotation_file(root: Path, split: str) -> Path:
    name = f"captions_{split}2014.json"
    for candidate in (root / "annotations" / name, root / name):
        if candidate.is_file():
            return candidate
    if not root.exists():
        raise FluidbenchError(f"{root}: COCO folder not found (expected annotations/{name} and {split}2014/)")
    raise FluidbenchError(f"{root / 'annotations' / name}: COCO captions file not found")


def _read_captions(path: Path) -> list[tuple[int, str, list[str]]]:
    """(image id, file name, captions) for every image with at least one caption, in id order."""
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise FluidbenchError(f"{path}: malformed JSON ({e.msg} at line {e.lineno}, column {e.colno})") from None
    except UnicodeDecodeError as e:
        raise FluidbenchError(f"{path}: not a text file ({e.reason})") from None
    if not isinstance(data, dict) or not isinstance(data.get("images"), list) \
            or not isinstance(data.get("annotations"), list):
        raise FluidbenchError(f"{path}: not a COCO captions file (expected 'images' and 'annotations' lists)")
    try:
        captions: dict[int, list[str]] = {}
        for ann in data["annotations"]:
            captions.setdefault(int(ann["image_id"]), []).append(" ".join(str(ann["caption"]).split()))
        files = {int(img["id"]): str(img["file_name"]) for img in data["images"]}
    except (KeyError, TypeError, ValueError) as e:
        raise FluidbenchError(f"{path}: malformed COCO entry (missing or bad field {e})") from None
    return [(i, files[i], captions[i]) for i in sorted(files) if i in captions]


class CocoCaptions(torch.utils.data.Dataset):
    """COCO 2014 images with one seeded caption each: item i is (uint8 tensor (3, S, S), caption)."""

    def __init__(self, root: str | Path, split: str = "val", image_size: int = 256, n: int | None = None,
                 seed: int = 0, resize_filter: str = "bicubic"):
        if resize_filter not in FILTERS:
            raise FluidbenchError(f"resize filter '{resize_filter}': expected one of {', '.join(FILTERS)}")
        root, split = Path(root), split.removesuffix("2014")  # "train2014" (Fluid's FID, its val loss) = "train"
        self.annotations = _annotation_file(root, split)
        self.image_dir = root / f"{split}2014"
        if not self.image_dir.is_dir():
            raise FluidbenchError(f"{self.image_dir}: COCO image folder not found (next to {self.annotations})")
        images = _read_captions(self.annotations)
        rng = np.random.default_rng(seed)
        if n is not None:
            if not 0 < n <= len(images):
                raise FluidbenchError(f"n={n}: {self.annotations} has {len(images)} captioned images")
            images = [images[i] for i in np.sort(rng.choice(len(images), n, replace=False))]
        # One caption per image, from the same seeded stream: (seed, n) fixes the whole protocol.
        self.items = [(name, caps[int(rng.integers(len(caps)))]) for _, name, caps in images]
        self.captions = [caption for _, caption in self.items]
        self.image_size, self.resize_filter = image_size, resize_filter

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, str]:
        name, caption = self.items[i]
        path = self.image_dir / name
        if not path.is_file():
            raise FluidbenchError(f"{path}: image listed in {self.annotations} not found")
        return center_crop_resize(decode(path.read_bytes(), str(path)), self.image_size, self.resize_filter), caption
