"""GenEval's fixed vocabulary and its position rule (djghosh13/geneval, evaluation/evaluate_images.py).

Shared by the ShapesT2I generator (captions must be true under these rules) and the GenEval scorer.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

# GenEval's colour classes, in its order (the index is the classifier's output).
COLORS: tuple[str, ...] = ("red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white")
RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")
TASKS: tuple[str, ...] = ("single_object", "two_object", "counting", "colors", "position", "color_attr")

THRESHOLD = 0.3  # keep detections scoring above this ...
COUNTING_THRESHOLD = 0.9  # ... or above this for every class when the prompt's tag is "counting"
MAX_OBJECTS = 16  # per class, highest scores first
NMS_THRESHOLD = 1.0  # 1.0 = NMS off (GenEval's default)
POSITION_THRESHOLD = 0.1  # centre offset shrunk by this fraction of the summed box sizes, per axis


def relative_position(box_a: Sequence[float], box_b: Sequence[float],
                      position_threshold: float = POSITION_THRESHOLD) -> set[str]:
    """Relations of box A to box B (boxes x0, y0, x1, y1; y grows downwards), as GenEval computes them."""
    boxes = np.asarray([box_a[:4], box_b[:4]], dtype=np.float64).reshape(2, 2, 2)
    center_a, center_b = boxes.mean(axis=-2)
    dim_a, dim_b = np.abs(np.diff(boxes, axis=-2))[..., 0, :]
    offset = center_a - center_b
    revised = np.maximum(np.abs(offset) - position_threshold * (dim_a + dim_b), 0) * np.sign(offset)
    if np.all(np.abs(revised) < 1e-3):
        return set()
    dx, dy = revised / np.linalg.norm(offset)
    relations = set()
    if dx < -0.5:
        relations.add("left of")
    if dx > 0.5:
        relations.add("right of")
    if dy < -0.5:
        relations.add("above")
    if dy > 0.5:
        relations.add("below")
    return relations


@dataclass
class Detection:
    """One detected object, GenEval-style: class name, score, box (x0, y0, x1, y1) and optional mask / colour."""

    class_name: str
    score: float
    box: tuple[float, float, float, float]
    mask: np.ndarray | None = None  # bool (H, W)
    color: str | None = None  # set by detectors that know colours (the ShapesT2I oracle); else a classifier's job
