"""The ShapesT2I oracle detector: exact on clean scenes, >= 95% exact per scene under pixel noise of std 0.05."""
from __future__ import annotations

import numpy as np
import pytest

from eval.geneval_rules import COUNTING_THRESHOLD, Detection, relative_position
from eval.shapes_oracle import _fit, detect
from harness.data.shapes import CLASSES, generate_split, shape_mask, tight_box
from harness.errors import FluidbenchError


def scene_errors(detections: list[Detection], objects: list[dict]) -> str:
    """'' when the detections recover the scene: count, and per object class and colour; every pair's relation."""
    if len(detections) != len(objects):
        return f"{len(detections)} detections for {len(objects)} objects"
    matched = []
    for obj in objects:  # each object's detection: the one whose box centre is nearest its box centre
        centre = np.add(obj["box"][:2], obj["box"][2:]) / 2
        matched.append(min(detections, key=lambda d: np.linalg.norm(np.add(d.box[:2], d.box[2:]) / 2 - centre)))
    if len({id(d) for d in matched}) != len(objects):
        return "two objects matched one detection"
    for obj, det in zip(objects, matched):
        if (det.class_name, det.color) != (obj["class"], obj["color"]):
            return f"{obj['color']} {obj['class']} read as {det.color} {det.class_name}"
    for i, (a, det_a) in enumerate(zip(objects, matched)):
        for b, det_b in zip(objects[i + 1:], matched[i + 1:]):
            if relative_position(a["box"], b["box"]) != relative_position(det_a.box, det_b.box):
                return f"relation of {a['class']} to {b['class']} changed"
    return ""


def test_every_class_and_side_is_redrawn_exactly():
    """On each whole-pixel pattern its own class fits with IoU 1 and every other class clearly worse."""
    for side in list(range(8, 15)) + list(range(16, 29)):
        for cls in CLASSES:
            mask = shape_mask(cls, (0, 0, side, side), (0, 0, side, side))
            box = tight_box(mask)
            fits = _fit(mask[box[1]:box[3], box[0]:box[2]], box)
            assert CLASSES[int(np.argmax(fits))] == cls and fits.max() == 1.0, (cls, side, fits)
            assert np.sort(fits)[-2] < 0.9, (cls, side, fits)


def test_exact_on_clean_scenes():
    images, records = generate_split(1000, np.random.default_rng(11))
    for image, record in zip(images, records):
        detections = detect(image)
        assert scene_errors(detections, record["objects"]) == "", record
        # boxes are the generator's, scores pass even GenEval's counting threshold, masks are the object pixels
        assert sorted(d.box for d in detections) == sorted(tuple(map(float, o["box"])) for o in record["objects"])
        assert all(d.score == 1.0 > COUNTING_THRESHOLD for d in detections)
        for det in detections:
            assert tight_box(det.mask) == tuple(int(v) for v in det.box)
            assert (image[det.mask] == image[det.mask][0]).all()


def test_exact_on_clean_scenes_at_64():
    images, records = generate_split(200, np.random.default_rng(12), size=64)
    assert all(scene_errors(detect(i), r["objects"]) == "" for i, r in zip(images, records))


def add_noise(image: np.ndarray, std: float, rng: np.random.Generator) -> np.ndarray:
    """Gaussian pixel noise on the image in [0, 1], then clipped and quantised back to uint8."""
    noisy = np.clip(image / 255.0 + rng.normal(0.0, std, image.shape), 0.0, 1.0)
    return np.round(noisy * 255).astype(np.uint8)


def test_mostly_exact_under_pixel_noise():
    images, records = generate_split(1000, np.random.default_rng(13))
    rng = np.random.default_rng(14)
    errors = [scene_errors(detect(add_noise(i, 0.05, rng)), r["objects"]) for i, r in zip(images, records)]
    exact = sum(e == "" for e in errors) / len(errors)
    assert exact >= 0.95, [e for e in errors if e][:10]


def test_blank_and_bad_images():
    assert detect(np.full((32, 32, 3), 128, np.uint8)) == []
    speck = np.full((32, 32, 3), 128, np.uint8)
    speck[10:12, 10:12] = 0  # far below the smallest shape: dropped
    assert detect(speck) == []
    with pytest.raises(FluidbenchError, match=r"\(H, W, 3\)"):
        detect(np.zeros((32, 32), np.uint8))
