"""ShapesT2I: procedural text-to-image scenes whose captions are true under GenEval's rules.

A scene is 1-4 flat-coloured shapes on a plain grey background. Each caption comes from a GenEval template
(single object, two objects, counting, colours, position, colour attribution); a scene is rendered *from* its
GenEval metadata line, so the objects are exactly those the caption names, and a position caption is kept only
when GenEval's own rule holds on the tight boxes of the rendered masks. A fixed set of colour-shape pairs
never appears in training or validation images; the GenEval prompt file uses some of them, so the synthetic
benchmark also measures compositional generalisation. Layout on disk: docs/design.md.
"""
from __future__ import annotations

import functools
import json
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from eval.geneval_rules import COLORS, RELATIONS, TASKS, relative_position
from harness.atomic import atomic_path, write_json, write_text
from harness.errors import FluidbenchError

VERSION = 1
CLASSES: tuple[str, ...] = ("circle", "square", "triangle", "diamond", "cross")
PLURALS = {c: c + ("es" if c.endswith("s") else "s") for c in CLASSES}
NUMBERS = {2: "two", 3: "three", 4: "four"}
# One RGB value per GenEval colour name, far from each other and from the background under pixel noise.
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30), "orange": (255, 140, 0), "yellow": (250, 225, 25), "green": (30, 160, 50),
    "blue": (30, 70, 225), "purple": (125, 35, 165), "pink": (255, 125, 195), "brown": (120, 65, 20),
    "black": (10, 10, 10), "white": (250, 250, 250),
}
BACKGROUND = (128, 128, 128)  # mid grey: none of the ten colours
# Never in training or validation images; the GenEval prompt file names each of them.
HELD_OUT: tuple[tuple[str, str], ...] = (
    ("circle", "green"), ("square", "pink"), ("triangle", "blue"), ("diamond", "yellow"), ("cross", "red"))

DEFAULT_TRAIN, DEFAULT_VAL, DEFAULT_SIZE, DEFAULT_PROMPTS_PER_TASK = 20000, 1000, 32, 32
# Object side in whole pixels at 32x32 (scaled with the image), by the number of objects in the scene: 8-14 px
# keeps the classes apart at 32x32 and lets four objects fit with their gaps.
SIDE_RANGE = {1: (9, 14), 2: (9, 14), 3: (8, 12), 4: (8, 11)}
GAP = 2  # empty pixels (at 32x32) between the boxes of any two objects, so same-coloured objects stay apart
MARGIN = 1  # empty pixels between any object and the image border
# `align` A > 0 (pixels at 32x32, a divisor of 32): every box's corners and side sit on a grid of A pixels, so an
# object covers whole tokens of a tokenizer with A-pixel patches (4 for the 8x8-token tokenizers of the embedded
# sweep). Sides are whole cells in [SIDE_RANGE's low // A, high // A] (8-12 px at A = 4), boxes at least one cell
# apart, none on the border's pixel margin (MARGIN rounds to no cell). An easier set: each class and side has one
# pattern per token instead of A x A sub-token offsets, and a 4-object scene still fits with its gaps.
ALIGNS = (0, 1, 2, 4, 8)


def shape_mask(class_name: str, box: Sequence, window: Sequence[int]) -> np.ndarray:
    """Pixels of `window` whose centres lie in the shape drawn in `box`; both (x0, y0, x1, y1) integer pixels.

    Boxes and windows are end-exclusive: pixel (i, j) covers [j, j+1) x [i, i+1). Returns bool (H, W); box
    coordinates may also be integer arrays (E, 1, 1), giving E masks (E, H, W) at once. Shapes sit on whole
    pixels and every test is in integers (coordinates doubled), so each class and side has exactly one
    pattern: no rounding decides a pixel, and the oracle detector can redraw any object exactly.
    """
    w, h = box[2] - box[0], box[3] - box[1]
    # Offsets of pixel centres from the box centre, doubled: -w+1 .. w-1 across the box.
    dx = np.abs(2 * np.arange(window[0], window[2])[None, :] + 1 - (box[0] + box[2]))  # (1, W)
    dy = 2 * np.arange(window[1], window[3])[:, None] + 1 - (box[1] + box[3])  # (H, 1), negative at the top
    ady = np.abs(dy)
    if class_name == "circle":
        return dx * dx * h * h + dy * dy * w * w <= w * w * h * h
    if class_name == "square":
        return (dx <= w) & (ady <= h)
    if class_name == "diamond":
        return dx * h + ady * w <= w * h
    if class_name == "triangle":  # apex up, base along the bottom of the box
        return (ady <= h) & (2 * dx * h <= (dy + h) * w)
    if class_name == "cross":  # arms a third of the side thick
        return ((3 * dx <= w) & (ady <= h)) | ((3 * ady <= h) & (dx <= w))
    raise FluidbenchError(f"unknown ShapesT2I class '{class_name}' (expected one of {', '.join(CLASSES)})")


def tight_box(mask: np.ndarray, x0: int = 0, y0: int = 0) -> tuple[int, int, int, int]:
    """Tight box of a bool mask as (x0, y0, x1, y1), end-exclusive like mmdet's mask2bbox; offset by (x0, y0)."""
    cols, rows = mask.any(axis=0), mask.any(axis=1)
    return (x0 + int(cols.argmax()), y0 + int(rows.argmax()),
            x0 + len(cols) - int(cols[::-1].argmax()), y0 + len(rows) - int(rows[::-1].argmax()))


def _pick(rng: np.random.Generator, items: Sequence):
    return items[int(rng.integers(len(items)))]


@functools.lru_cache(maxsize=8)
def _free_colors_cached(held: frozenset) -> dict[str, list[str]]:
    return {cls: [c for c in COLORS if (cls, c) not in held] for cls in CLASSES}


def _free_colors(held_out: Sequence[tuple[str, str]]) -> dict[str, list[str]]:
    """Per class, the colours it may take when a caption does not name one."""
    return _free_colors_cached(frozenset(map(tuple, held_out)))


def _cells(region: tuple[int, int, int, int], k: int, rng: np.random.Generator, min_side: int, sep: int,
           axis: int | None = None) -> list[tuple[int, int, int, int]]:
    """Split a region into k cells by random guillotine cuts, `sep` pixels apart, each >= `min_side` across.

    Cuts run across the longer side (or along `axis`); the low cell (left or top) comes first.
    """
    if k == 1:
        return [region]
    x0, y0, x1, y1 = region
    if axis is None:
        axis = int(x1 - x0 < y1 - y0) if x1 - x0 != y1 - y0 else int(rng.integers(2))
    lo, hi = (x0, x1) if axis == 0 else (y0, y1)
    cut = int(rng.integers(lo + min_side, hi - min_side - sep + 1))
    first, second = (x0, y0, cut, y1), (cut + sep, y0, x1, y1)
    if axis == 1:
        first, second = (x0, y0, x1, cut), (x0, cut + sep, x1, y1)
    k1 = k // 2 if rng.random() < 0.5 else k - k // 2
    return _cells(first, k1, rng, min_side, sep) + _cells(second, k - k1, rng, min_side, sep)


def _place(n: int, rng: np.random.Generator, image_size: int, pair: tuple[int, int, str] | None = None,
           align: int = 0) -> list[tuple[int, int, int, int]]:
    """Square pixel boxes for n objects, one per random cell, so any two are GAP pixels apart along x or y.

    With a `pair` (a, b, relation) of two objects, object a gets the cell on the relation's side of object b.
    With `align` A > 0 the layout is drawn on a grid of A-pixel cells (at 32x32) and scaled back to pixels.
    """
    scale = image_size // 32
    side_lo, side_hi = SIDE_RANGE[n]
    if align:  # whole cells of `align` pixels (at 32x32)
        unit, lo, hi, margin, sep = align * scale, max(1, side_lo // align), side_hi // align, MARGIN // align, \
            -(-GAP // align)
    else:  # pixels
        unit, lo, hi, margin, sep = 1, side_lo * scale, side_hi * scale, MARGIN * scale, GAP * scale
    extent = image_size // unit
    region = (margin, margin, extent - margin, extent - margin)
    if pair is None:
        cells = _cells(region, n, rng, lo, sep)
        cells = [cells[i] for i in rng.permutation(n)]
    else:
        a, b, relation = pair
        low, high = _cells(region, 2, rng, lo, sep, axis=int(relation in ("above", "below")))
        cells = [low, high]
        cells[a], cells[b] = (low, high) if relation in ("left of", "above") else (high, low)
    boxes = []
    for x0, y0, x1, y1 in cells:
        side = int(rng.integers(lo, min(hi, x1 - x0, y1 - y0) + 1))
        x, y = int(rng.integers(x0, x1 - side + 1)), int(rng.integers(y0, y1 - side + 1))
        boxes.append((x * unit, y * unit, (x + side) * unit, (y + side) * unit))
    return boxes


def render_objects(classes: Sequence[str], colors: Sequence[str], boxes: Sequence[Sequence[int]], size: int
                   ) -> tuple[np.ndarray, list[dict]]:
    """Draw shapes in pixel boxes on the background: image uint8 (size, size, 3) and objects {class, color, box}.

    Each object's `box` is the tight box of its pixels, which is its drawing box or (for triangles of even
    side, whose apex row is empty) one row shorter.
    """
    image = np.empty((size, size, 3), np.uint8)
    image[:] = BACKGROUND
    objects = []
    for cls, color, box in zip(classes, colors, boxes):
        mask = shape_mask(cls, box, box)
        image[box[1]:box[3], box[0]:box[2]][mask] = PALETTE[color]
        objects.append({"class": cls, "color": color, "box": list(tight_box(mask, box[0], box[1]))})
    return image, objects


def _parse(metadata: dict) -> tuple[list[tuple[str, str | None, int]], list[tuple[int, str, int]]]:
    """GenEval include clauses -> objects (class, colour or None, clause) and position constraints."""
    objects, constraints = [], []
    for k, clause in enumerate(metadata.get("include", [])):
        cls, color, count = clause.get("class"), clause.get("color"), int(clause.get("count", 1))
        if cls not in CLASSES:
            raise FluidbenchError(f"prompt '{metadata.get('prompt')}': class '{cls}' is not a ShapesT2I class "
                                  f"({', '.join(CLASSES)})")
        if color is not None and color not in PALETTE:
            raise FluidbenchError(f"prompt '{metadata.get('prompt')}': unknown colour '{color}'")
        if not 1 <= count <= max(SIDE_RANGE):
            raise FluidbenchError(f"prompt '{metadata.get('prompt')}': count {count} for '{cls}' "
                                  f"(ShapesT2I renders 1-{max(SIDE_RANGE)} objects per class)")
        objects += [(cls, color, k)] * count
        if clause.get("position"):
            relation, target = clause["position"]
            constraints.append((k, relation, int(target)))
    if not 1 <= len(objects) <= max(SIDE_RANGE):
        raise FluidbenchError(f"prompt '{metadata.get('prompt')}': {len(objects)} objects "
                              f"(ShapesT2I scenes hold 1-{max(SIDE_RANGE)})")
    return objects, constraints


def render_prompt(metadata: dict, rng: np.random.Generator, size: int = DEFAULT_SIZE,
                  held_out: Sequence[tuple[str, str]] = HELD_OUT, align: int = 0) -> tuple[np.ndarray, list[dict]]:
    """Render a scene that is true for a GenEval metadata line over the ShapesT2I classes.

    Returns the image, uint8 (size, size, 3), and its objects as dicts {class, color, box}, one per object in
    the order of the include clauses; `box` is the tight box of the object's pixels (x0, y0, x1, y1,
    end-exclusive). Colours a clause does not name are drawn avoiding the `held_out` pairs; `align` > 0 puts
    every box on a grid of that many pixels (at 32x32, see ALIGNS).
    """
    if size < 32 or size % 32:
        raise FluidbenchError(f"image size: expected 32 or 64 (a multiple of 32), got {size}")
    check_align(align)
    specs, constraints = _parse(metadata)
    free = _free_colors(held_out)
    colors = [color if color is not None else _pick(rng, free[cls]) for cls, color, _ in specs]
    # Each object of a positioned clause must stand in the relation to every object of its target clause.
    pairs = [(a, b, relation) for k, relation, t in constraints
             for a in range(len(specs)) if specs[a][2] == k for b in range(len(specs)) if specs[b][2] == t]
    guide = pairs[0] if len(specs) == 2 and len(pairs) == 1 else None  # GenEval's "A <relation> B"
    for _ in range(200):
        boxes = _place(len(specs), rng, size, guide, align)
        image, objects = render_objects([cls for cls, _, _ in specs], colors, boxes, size)
        if all(relation in relative_position(objects[a]["box"], objects[b]["box"]) for a, b, relation in pairs):
            return image, objects
    raise FluidbenchError(f"prompt '{metadata.get('prompt')}': no layout found that makes it true")


def check_align(align: int, name: str = "align") -> None:
    if align not in ALIGNS:
        raise FluidbenchError(f"{name}: expected one of {', '.join(map(str, ALIGNS))} (pixels at 32x32; "
                              f"0 = free placement), got {align}")


def manifest_align(manifest: dict) -> int:
    """The `align` a ShapesT2I folder was made with, at 32x32 (0: free placement), from its manifest."""
    return int(manifest.get("align", 0)) // (int(manifest.get("image_size", DEFAULT_SIZE)) // 32)


def _article(noun: str) -> str:
    return f"an {noun}" if noun[0] in "aeiou" else f"a {noun}"


def make_prompt(tag: str, objects: list[tuple[str, str | None]], count: int = 1, relation: str | None = None
                ) -> dict:
    """A GenEval metadata line (tag, include, exclude?, prompt) for a task, in GenEval's own wording."""
    def name(cls: str, color: str | None) -> str:
        return _article(f"{color} {cls}" if color else cls)

    if tag == "counting":
        cls = objects[0][0]
        return {"tag": tag, "include": [{"class": cls, "count": count}],
                "exclude": [{"class": cls, "count": count + 1}],
                "prompt": f"a photo of {NUMBERS[count]} {PLURALS[cls]}"}
    include = [{"class": cls, "count": 1, **({"color": color} if color else {})} for cls, color in objects]
    if tag == "position":  # "A <relation> B": B is clause 0, A is clause 1 and refers to it
        (a, _), (b, _) = objects
        include = [{"class": b, "count": 1}, {"class": a, "count": 1, "position": [relation, 0]}]
        return {"tag": tag, "include": include, "prompt": f"a photo of {_article(a)} {relation} {_article(b)}"}
    return {"tag": tag, "include": include, "prompt": "a photo of " + " and ".join(name(*o) for o in objects)}


def sample_prompt(tag: str, rng: np.random.Generator, held_out: Sequence[tuple[str, str]] = HELD_OUT) -> dict:
    """A random training caption (as GenEval metadata) for one task, never naming a held-out pair."""
    free = _free_colors(held_out)
    if tag == "single_object":
        return make_prompt(tag, [(_pick(rng, CLASSES), None)])
    if tag == "counting":
        return make_prompt(tag, [(_pick(rng, CLASSES), None)], count=int(rng.integers(2, 5)))
    if tag == "colors":
        cls = _pick(rng, CLASSES)
        return make_prompt(tag, [(cls, _pick(rng, free[cls]))])
    a, b = (CLASSES[i] for i in rng.permutation(len(CLASSES))[:2])
    if tag == "two_object":
        return make_prompt(tag, [(a, None), (b, None)])
    if tag == "position":
        return make_prompt(tag, [(a, None), (b, None)], relation=_pick(rng, RELATIONS))
    if tag == "color_attr":
        ca = _pick(rng, free[a])
        cb = _pick(rng, [c for c in free[b] if c != ca])
        return make_prompt(tag, [(a, ca), (b, cb)])
    raise FluidbenchError(f"unknown GenEval task '{tag}' (expected one of {', '.join(TASKS)})")


def _cycle(rng: np.random.Generator, candidates: list, n: int) -> list:
    """n items covering the candidates evenly: seeded permutations, concatenated."""
    out: list = []
    while len(out) < n:
        out += [candidates[i] for i in rng.permutation(len(candidates))]
    return out[:n]


def geneval_prompts(rng: np.random.Generator, per_task: int = DEFAULT_PROMPTS_PER_TASK,
                    held_out: Sequence[tuple[str, str]] = HELD_OUT) -> list[dict]:
    """The synthetic GenEval prompt set: `per_task` prompts per task, grouped by task in GenEval's order.

    Tasks with fewer distinct prompts than `per_task` (single objects: one per class) repeat them evenly.
    About a third of the colour and colour-attribution prompts name a held-out pair.
    """
    held = [tuple(p) for p in held_out]
    pairs = [(cls, c) for cls in CLASSES for c in COLORS]
    seen = [p for p in pairs if p not in held]
    ordered = [(a, b) for a in CLASSES for b in CLASSES if a != b]
    n_held = per_task // 3 if held else 0
    attr_seen = [(p, q) for p in seen for q in seen if p[0] != q[0] and p[1] != q[1]]
    attr_held = [(p, q) for p in pairs for q in pairs if p[0] != q[0] and p[1] != q[1] and (p in held or q in held)]
    prompts = []
    prompts += [make_prompt("single_object", [(c, None)]) for c in _cycle(rng, list(CLASSES), per_task)]
    prompts += [make_prompt("two_object", [(a, None), (b, None)]) for a, b in _cycle(rng, ordered, per_task)]
    counts = [(c, k) for c in CLASSES for k in NUMBERS]
    prompts += [make_prompt("counting", [(c, None)], count=k) for c, k in _cycle(rng, counts, per_task)]
    colors = _cycle(rng, held, n_held) + _cycle(rng, seen, per_task - n_held)
    prompts += [make_prompt("colors", [p]) for p in colors]
    positions = _cycle(rng, [(a, b, r) for a, b in ordered for r in RELATIONS], per_task)
    prompts += [make_prompt("position", [(a, None), (b, None)], relation=r) for a, b, r in positions]
    attrs = _cycle(rng, attr_held, n_held) + _cycle(rng, attr_seen, per_task - n_held)
    prompts += [make_prompt("color_attr", [p, q]) for p, q in attrs]
    return prompts


def uses_held_out(metadata: dict, held_out: Sequence[tuple[str, str]] = HELD_OUT) -> bool:
    """Whether a prompt names a held-out colour-shape pair."""
    held = set(map(tuple, held_out))
    return any((c.get("class"), c.get("color")) in held for c in metadata.get("include", []))


def generate_split(n: int, rng: np.random.Generator, size: int = DEFAULT_SIZE,
                   held_out: Sequence[tuple[str, str]] = HELD_OUT,
                   progress: Callable[[int], None] | None = None, align: int = 0) -> tuple[np.ndarray, list[dict]]:
    """n scenes, tasks uniform: images uint8 (n, size, size, 3) and caption records {caption, tag, objects}."""
    images = np.empty((n, size, size, 3), np.uint8)
    records = []
    for i in range(n):
        metadata = sample_prompt(_pick(rng, TASKS), rng, held_out)
        images[i], objects = render_prompt(metadata, rng, size, held_out, align)
        records.append({"caption": metadata["prompt"], "tag": metadata["tag"], "objects": objects})
        if progress is not None and (i + 1) % 500 == 0:
            progress(500)
    if progress is not None and n % 500:
        progress(n % 500)
    return images, records


def _write_npy(path: Path, array: np.ndarray) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as f:  # a file object: np.save would append ".npy" to a name
        np.save(f, array)


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    write_text(path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))


def write_shapes(out: str | Path, seed: int = 0, n_train: int = DEFAULT_TRAIN, n_val: int = DEFAULT_VAL,
                 size: int = DEFAULT_SIZE, prompts_per_task: int = DEFAULT_PROMPTS_PER_TASK,
                 progress: bool = True, align: int = 0) -> dict:
    """Write the ShapesT2I data set to `out`; the same arguments give byte-identical files. Returns a summary."""
    if size < 32 or size % 32:
        raise FluidbenchError(f"--size: expected 32 or 64 (a multiple of 32), got {size}")
    check_align(align, "--align")
    if n_train < 1 or n_val < 1:
        raise FluidbenchError(f"--train/--val: expected at least one image each, got {n_train} and {n_val}")
    if prompts_per_task < 1:
        raise FluidbenchError(f"prompts per task: expected at least 1, got {prompts_per_task}")
    from tqdm import tqdm

    out = Path(out)
    # Independent streams: the val images and the prompts do not change with the number of train images.
    streams = {name: np.random.default_rng([seed, k]) for k, name in enumerate(("train", "val", "prompts"))}
    start, start_cpu = time.perf_counter(), time.process_time()
    with tqdm(total=n_train + n_val, desc="ShapesT2I", unit="img", disable=not progress, leave=False) as bar:
        splits = {name: generate_split(n, streams[name], size, progress=bar.update, align=align)
                  for name, n in (("train", n_train), ("val", n_val))}
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - start_cpu
    for name, (images, records) in splits.items():
        _write_npy(out / name / "images.npy", images)
        _write_jsonl(out / name / "captions.jsonl", records)
    prompts = geneval_prompts(streams["prompts"], prompts_per_task)
    _write_jsonl(out / "geneval_metadata.jsonl", prompts)
    scale = size // 32
    write_json(out / "manifest.json", {
        "version": VERSION, "seed": seed, "image_size": size, "splits": {"train": n_train, "val": n_val},
        "classes": list(CLASSES), "colors": {c: list(PALETTE[c]) for c in COLORS}, "background": list(BACKGROUND),
        "held_out": [list(p) for p in HELD_OUT], "tasks": list(TASKS), "prompts_per_task": prompts_per_task,
        "held_out_prompts": [i for i, p in enumerate(prompts) if uses_held_out(p)],
        "object_side": {str(k): [lo * scale, hi * scale] for k, (lo, hi) in SIDE_RANGE.items()},
        "gap": GAP * scale, "margin": MARGIN * scale, "box_format": "x0 y0 x1 y1, pixels, end-exclusive",
        **({"align": align * scale} if align else {}),  # absent: free placement (as before the option)
    })
    n = n_train + n_val
    # Rendering is single-threaded: images per CPU second is the speed on one core, even on a busy machine.
    return {"out": str(out), "train": n_train, "val": n_val, "size": size, "prompts": len(prompts),
            "seconds": seconds, "cpu_seconds": cpu_seconds, "images_per_cpu_s": n / max(cpu_seconds, 1e-9)}


class ShapesDataset:
    """A ShapesT2I split on disk, map-style: item i is (uint8 tensor (3, H, W), caption)."""

    def __init__(self, root: str | Path, split: str = "train", n: int | None = None):
        root = Path(root)
        if not (root / "manifest.json").is_file():
            raise FluidbenchError(f"{root}: not a ShapesT2I folder (no manifest.json; create one with "
                                  f"`fluidbench data shapes --out {root}`)")
        images_path, captions_path = root / split / "images.npy", root / split / "captions.jsonl"
        for path in (images_path, captions_path):
            if not path.is_file():
                raise FluidbenchError(f"{path}: missing (ShapesT2I split '{split}'; splits are train and val)")
        try:
            self.manifest = json.loads((root / "manifest.json").read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise FluidbenchError(f"{root / 'manifest.json'}: not valid JSON ({getattr(e, 'msg', e)})") from None
        try:
            self.images = np.load(images_path, mmap_mode="r")  # (N, H, W, 3) uint8, read lazily
        except (ValueError, OSError) as e:  # numpy: ValueError for a bad header, OSError for a short file
            raise FluidbenchError(f"{images_path}: not a readable .npy array ({e})") from None
        if self.images.dtype != np.uint8:  # float images would train silently on values 256x off
            raise FluidbenchError(f"{images_path}: dtype {self.images.dtype}, expected uint8 pixels")
        self.records = []
        for lineno, line in enumerate(captions_path.read_text().splitlines(), 1):
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise FluidbenchError(f"{captions_path}:{lineno}: not valid JSON ({e.msg})") from None
            if not isinstance(record, dict) or not isinstance(record.get("caption"), str):
                raise FluidbenchError(f"{captions_path}:{lineno}: expected an object with a 'caption' string")
            self.records.append(record)
        if self.images.ndim != 4 or self.images.shape[-1] != 3 or self.images.shape[1] != self.images.shape[2] \
                or len(self.images) != len(self.records):
            raise FluidbenchError(f"{images_path}: shape {self.images.shape} does not match {len(self.records)} "
                                  f"captions in {captions_path} (expected (N, S, S, 3))")
        if n is not None:
            if not 0 < n <= len(self.records):
                raise FluidbenchError(f"n: asked for {n} images but {root}/{split} holds {len(self.records)}")
            self.images, self.records = self.images[:n], self.records[:n]
        self.captions = [r["caption"] for r in self.records]
        self.image_size = int(self.images.shape[1])

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int):
        import torch

        return torch.from_numpy(np.ascontiguousarray(self.images[i].transpose(2, 0, 1))), self.captions[i]
