"""Every feature extractor by name: eval.fid's (`inception`, `shapes`), CLIP image embeddings (`clip` or
`clip-<open_clip model>`, eval/cmmd.py) and DINOv2 (`dinov2-vit-{s,b,l,g}-14`, eval/dinov2.py)."""
from __future__ import annotations

from pathlib import Path

import torch

from eval.fid import FeatureExtractor, load_extractor


def load_any_extractor(name: str, weights: str | Path | None = None,
                       device: str | torch.device = "cpu") -> FeatureExtractor:
    """The extractor called `name` with its weights (a local file first, then the library's cache)."""
    if name == "clip" or name.startswith("clip-"):
        from eval.cmmd import CMMD_MODEL, ClipImageFeatures

        return ClipImageFeatures(name.removeprefix("clip-") if name != "clip" else CMMD_MODEL, weights, device)
    if name.startswith("dinov2"):
        from eval.dinov2 import DinoV2Features

        return DinoV2Features(name, weights, device)
    return load_extractor(name, weights, device)
