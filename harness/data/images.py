"""Decoding real photographs: RGB, centre crop to a square, resize with a named filter, uint8 (3, H, W)."""
from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image

from harness.errors import FluidbenchError

FILTERS = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR, "lanczos": Image.LANCZOS, "box": Image.BOX,
           "nearest": Image.NEAREST}


def decode(data: bytes, where: str) -> Image.Image:
    """Decode image bytes to RGB; `where` names the file (or shard and key) in the error message."""
    try:
        image = Image.open(io.BytesIO(data))
        image.load()
    except Exception as e:  # PIL raises many types for corrupt data
        raise FluidbenchError(f"{where}: cannot decode image ({e})") from None
    return image.convert("RGB")


def center_crop_resize(image: Image.Image, size: int, resize_filter: str = "bicubic") -> torch.Tensor:
    """The central square of `image`, resized to size x size: uint8 tensor (3, size, size)."""
    if resize_filter not in FILTERS:
        raise FluidbenchError(f"resize filter '{resize_filter}': expected one of {', '.join(FILTERS)}")
    width, height = image.size
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    image = image.crop((left, top, left + side, top + side))
    if side != size:
        image = image.resize((size, size), FILTERS[resize_filter])
    return torch.from_numpy(np.asarray(image, dtype=np.uint8).transpose(2, 0, 1).copy())
