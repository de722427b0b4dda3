"""Oracle detector for ShapesT2I: GenEval-style detections read back from the pixels of a scene.

Foreground = pixels far from the background grey; objects = its 8-connected components (ShapesT2I keeps
objects >= 2 px apart, so same-coloured objects stay separate); class = the shape that, redrawn in boxes
around the component's, overlaps it best; colour = the palette colour nearest the component's median pixel.
Boxes are tight boxes of the masks, end-exclusive (mmdet's mask2bbox, as GenEval's detector), so on a clean
render they equal the boxes the generator recorded. Tolerant of noise and blur: objects are found at a
threshold half-way between the background and the palette colour nearest to it, then cut half-way to their
own colour; holes are filled and specks dropped.
"""
from __future__ import annotations

import numpy as np
from scipy import ndimage

from eval.geneval_rules import Detection
from harness.data.shapes import BACKGROUND, CLASSES, PALETTE, shape_mask, tight_box
from harness.errors import FluidbenchError

_BACKGROUND = np.asarray(BACKGROUND, np.float32)
_COLOR_NAMES = list(PALETTE)
_COLOR_VALUES = np.asarray([PALETTE[c] for c in _COLOR_NAMES], np.float32)  # (10, 3)
# Half-way from the background to the nearest palette colour: pixel noise of std 0.05 (12.75 levels) crosses
# it about once in 10^4 background pixels, and a blurred edge is cut where it is half object, half background.
FOREGROUND_DISTANCE = 0.5 * float(np.linalg.norm(_COLOR_VALUES - _BACKGROUND, axis=1).min())
MIN_AREA = 12  # pixels at 32x32 (scaled with the image area); the smallest rendered shape covers 30
# Score = how well the best class drawing fits the component: 1.0 from IoU FIT_IOU up (every clean render fits
# its class exactly, IoU 1), falling linearly to 0 at IoU 0.5. GenEval's counting threshold of 0.9 then asks
# for IoU >= 0.77.
FIT_IOU = 0.8
# Candidate boxes around a component's tight box: side -1, 0, +1 pixel, start shifted -1, 0, +1 in x and y.
_SIDE_OFFSETS, _SHIFT_X, _SHIFT_Y = (
    a.reshape(-1, 1, 1) for a in np.meshgrid(*[np.arange(-1, 2)] * 3, indexing="ij"))


def _fit(component: np.ndarray, box: tuple[int, int, int, int]) -> np.ndarray:
    """Best IoU of each class, drawn in candidate boxes near `box`, with a component mask of `box` (CLASSES order).

    ShapesT2I draws on whole pixels, so a clean object is redrawn exactly by one candidate: side max(w, h)
    (an even-sided triangle has an empty apex row) starting at the tight box. Sides one pixel either way and
    starts one pixel off absorb noise and blur.
    """
    x0, y0, x1, y1 = box
    window = (x0 - 2, y0 - 2, x1 + 2, y1 + 2)
    target = np.pad(component, 2)
    side = max(x1 - x0, y1 - y0)
    exact = ((x0 + x1 - side) // 2, (y0 + y1 - side) // 2)
    exact = (*exact, exact[0] + side, exact[1] + side)
    fits = [_iou(shape_mask(cls, exact, window), target) for cls in CLASSES]
    if max(fits) == 1.0:  # a clean render: its class redraws it exactly, no search needed
        return np.asarray(fits)
    sides = _SIDE_OFFSETS + side
    left, top = (x0 + x1 - sides) // 2 + _SHIFT_X, (y0 + y1 - sides) // 2 + _SHIFT_Y  # (27, 1, 1) candidates
    candidates = (left, top, left + sides, top + sides)
    return np.asarray([_iou(shape_mask(cls, candidates, window), target).max() for cls in CLASSES])


def _iou(drawn: np.ndarray, target: np.ndarray) -> np.ndarray:
    """IoU of masks (..., H, W) with a target (H, W)."""
    return (drawn & target).sum(axis=(-2, -1)) / (drawn | target).sum(axis=(-2, -1))


def detect(image: np.ndarray) -> list[Detection]:
    """Detect the shapes in one RGB image, uint8 (H, W, 3), as GenEval detections with masks and colours.

    Each Detection has class_name, score in [0, 1] (1.0 on clean renders), box (x0, y0, x1, y1) in pixels,
    end-exclusive, mask bool (H, W) and color (a GenEval colour name). Ordered top to bottom, left to right.
    """
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3:
        raise FluidbenchError(f"oracle detector: expected an RGB image (H, W, 3), got shape {image.shape}")
    pixels = image.astype(np.float32)
    height, width = image.shape[:2]
    distance = np.linalg.norm(pixels - _BACKGROUND, axis=-1)  # (H, W)
    labels, _ = ndimage.label(distance > FOREGROUND_DISTANCE, structure=np.ones((3, 3), bool))
    min_area = MIN_AREA * height * width / 32 ** 2
    detections = []
    for k, (rows, cols) in enumerate(ndimage.find_objects(labels), 1):
        component = labels[rows, cols] == k
        if component.sum() < min_area:
            continue
        median = np.median(pixels[rows, cols][component], axis=0)
        color = _COLOR_NAMES[int(np.linalg.norm(_COLOR_VALUES - median, axis=1).argmin())]
        # Cut a blurred edge half-way between this object's own colour and the background (a clean render is
        # two-valued, so its mask does not change): strong colours would otherwise bleed outwards.
        contrast = float(np.linalg.norm(median - _BACKGROUND))
        component = ndimage.binary_fill_holes(component & (distance[rows, cols] > max(FOREGROUND_DISTANCE,
                                                                                     contrast / 2)))
        if component.sum() < min_area:
            continue
        box = tight_box(component, cols.start, rows.start)
        local = component[box[1] - rows.start:box[3] - rows.start, box[0] - cols.start:box[2] - cols.start]
        fits = _fit(local, box)
        best = int(np.argmax(fits))
        mask = np.zeros((height, width), bool)
        mask[box[1]:box[3], box[0]:box[2]] = local
        score = float(np.clip((fits[best] - 0.5) / (FIT_IOU - 0.5), 0.0, 1.0))
        detections.append(Detection(CLASSES[best], score, tuple(float(v) for v in box), mask, color))
    return detections
