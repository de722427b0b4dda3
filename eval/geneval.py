"""GenEval scoring with the official rules (djghosh13/geneval: evaluation/evaluate_images.py, summary_scores.py).

The pipeline per image: a Detector (eval/detectors.py) gives raw detections; `select_objects` keeps, per class,
those scoring above the threshold (0.9 for every class when the prompt's tag is "counting"), highest first, at
most 16, NMS off by default; `evaluate_objects` checks the prompt's `include` / `exclude` clauses exactly as the
official evaluator does, asking a colour classifier (eval/colors.py) only when a clause names a colour.
`score_folder` runs this over a folder in the official layout and writes `results.jsonl` in the official schema
plus `summary.json` (six task scores, overall = their unweighted mean, correct-images and correct-prompts rates).

Ties in score keep the detector's order (a stable sort). The official evaluator orders with
`np.argsort(scores)[::-1]`, which is not specified for ties; real detectors' float scores practically never
tie, but the ShapesT2I oracle gives every object the same score, so a defined order matters there.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence

import numpy as np

from eval.geneval_folder import iter_prompt_folders
from eval.geneval_rules import (COLORS, COUNTING_THRESHOLD, MAX_OBJECTS, NMS_THRESHOLD, POSITION_THRESHOLD,
                                RELATIONS, THRESHOLD, TASKS, Detection, relative_position)
from harness.atomic import write_json, write_text
from harness.errors import FluidbenchError

if TYPE_CHECKING:
    from eval.colors import ColorClassifier
    from eval.detectors import Detector

# colours of the top `count` objects of one class, asked lazily: (class name, objects) -> colour names
ColorLookup = Callable[[str, Sequence[Detection]], list[str]]


@dataclass(frozen=True)
class GenEvalRules:
    """The official evaluator's `--options` (threshold, counting_threshold, max_objects, max_overlap,
    position_threshold), with its published defaults."""

    threshold: float = THRESHOLD
    counting_threshold: float = COUNTING_THRESHOLD
    max_objects: int = MAX_OBJECTS
    nms_threshold: float = NMS_THRESHOLD  # the official `max_overlap`; 1.0 = NMS off
    position_threshold: float = POSITION_THRESHOLD


def box_iou(box_a: Sequence[float], box_b: Sequence[float]) -> float:
    """IoU with the official evaluator's inclusive-pixel convention (+1 on widths and heights)."""
    def area(box):
        return max(box[2] - box[0] + 1, 0) * max(box[3] - box[1] + 1, 0)
    inter = area([max(box_a[0], box_b[0]), max(box_a[1], box_b[1]), min(box_a[2], box_b[2]), min(box_a[3], box_b[3])])
    union = area(box_a) + area(box_b) - inter
    return inter / union if union else 0.0


def select_objects(detections: Sequence[Detection], tag: str,
                   rules: GenEvalRules = GenEvalRules()) -> dict[str, list[Detection]]:
    """Per class, the detections GenEval keeps: score > threshold, highest first (ties: detector order), capped.

    Args:
        detections: one image's raw detections, any classes, any order.
        tag: the prompt's task tag; "counting" raises the threshold for every class.
        rules: thresholds, cap and NMS setting.
    Returns:
        class name -> kept detections, best first; classes with none kept are absent (as in the official code).
    """
    threshold = rules.counting_threshold if tag == "counting" else rules.threshold
    by_class: dict[str, list[Detection]] = {}
    for det in detections:
        by_class.setdefault(det.class_name, []).append(det)
    objects = {}
    for name, dets in by_class.items():
        ranked = sorted((d for d in dets if d.score > threshold), key=lambda d: -d.score)  # stable: ties keep order
        ranked = ranked[:rules.max_objects]  # the cap applies before NMS, as in the official loop
        kept = []
        while ranked:
            best = ranked.pop(0)
            kept.append(best)
            if rules.nms_threshold < 1:
                ranked = [d for d in ranked if box_iou(best.box, d.box) < rules.nms_threshold]
        if kept:
            objects[name] = kept
    return objects


def evaluate_objects(metadata: dict, objects: dict[str, list[Detection]], colors_of: ColorLookup,
                     rules: GenEvalRules = GenEvalRules()) -> tuple[bool, str]:
    """Check one image's kept objects against a prompt's clauses, exactly as the official `evaluate`.

    Args:
        metadata: the prompt's GenEval metadata (`include` clauses ANDed, `exclude` clauses ORed).
        objects: `select_objects` output.
        colors_of: colour names for (class name, the top `count` objects of that class); called only for
            clauses with a `color` whose count is met.
        rules: supplies the position margin.
    Returns:
        (correct, reason) with the official reason strings joined by newlines ("" when correct).
    """
    correct = True
    reasons = []
    groups: list[list[Detection] | None] = []  # per include clause: its objects, or None when it failed
    for clause in metadata.get("include", []):
        name, count = clause["class"], clause["count"]
        found = objects.get(name, [])[:count]
        matched = True
        if len(found) < count:
            correct = matched = False
            reasons.append(f"expected {name}>={count}, found {len(found)}")
        else:
            if "color" in clause:
                colors = colors_of(name, found)
                want = clause["color"]
                if colors.count(want) < count:
                    correct = matched = False
                    reasons.append(f"expected {want} {name}>={count}, found {colors.count(want)} {want}; and "
                                   + ", ".join(f"{colors.count(c)} {c}" for c in COLORS if c in colors))
            if "position" in clause and matched:
                relation, target = clause["position"]
                if groups[target] is None:
                    correct = matched = False
                    reasons.append(f"no target for {name} to be {relation}")
                else:
                    for obj in found:
                        for target_obj in groups[target]:
                            held = relative_position(obj.box, target_obj.box, rules.position_threshold)
                            if relation not in held:
                                correct = matched = False
                                # RELATIONS order, where the official code joins an unordered set
                                held_text = " and ".join(r for r in RELATIONS if r in held)
                                reasons.append(f"expected {name} {relation} target, found {held_text} target")
                                break
                        if not matched:
                            break
        groups.append(found if matched else None)
    for clause in metadata.get("exclude", []):
        name, count = clause["class"], clause["count"]
        if len(objects.get(name, [])) >= count:
            correct = False
            reasons.append(f"expected {name}<{count}, found {len(objects[name])}")
    return correct, "\n".join(reasons)


def score_image(image: np.ndarray, detections: Sequence[Detection], metadata: dict, filename: str,
                color_classifier: ColorClassifier | None = None,
                rules: GenEvalRules = GenEvalRules()) -> dict:
    """One row of `results.jsonl` in the official schema.

    Args:
        image: uint8 (H, W, 3), the image the detections came from (the colour classifier crops it).
        detections: the detector's raw detections for it.
        metadata: the prompt's GenEval metadata.
        filename: the image path, as recorded in the row.
        color_classifier: classifies the colours of detections; None means none is available (an error if a
            colour clause needs one).
        rules: GenEval's thresholds and margins.
    Returns:
        {filename, tag, prompt, correct, reason, metadata (JSON text), details (JSON text: class -> boxes
        [x0, y0, x1, y1, score] of the kept objects)}.
    """
    objects = select_objects(detections, metadata["tag"], rules)

    def colors_of(name: str, found: Sequence[Detection]) -> list[str]:
        if color_classifier is None:
            raise FluidbenchError(f"{filename}: the prompt names a colour but no colour classifier was given "
                                  "(the detector reports no colours: pass a CLIP colour classifier, --clip-path)")
        return color_classifier.classify(image, list(found), name)

    correct, reason = evaluate_objects(metadata, objects, colors_of, rules)
    details = {name: [[float(v) for v in det.box] + [float(det.score)] for det in dets]
               for name, dets in objects.items()}
    return {"filename": filename, "tag": metadata["tag"], "prompt": metadata["prompt"], "correct": correct,
            "reason": reason, "metadata": json.dumps(metadata), "details": json.dumps(details)}


def summarize(results: Sequence[dict]) -> dict:
    """The official summary of result rows: per-task image accuracy, overall = unweighted mean over tasks.

    Returns:
        {"overall", one key per task tag present, "correct_images" (fraction of images), "correct_prompts"
        (fraction of prompts with at least one correct image), "images", "prompts", "tasks" (the tags averaged
        into overall, in TASKS order then first appearance), "counts" ({tag: [correct, images]})}.
    """
    if not results:
        raise FluidbenchError("no results to summarise (the image folder held no scorable images)")
    by_task: dict[str, list[bool]] = {}
    by_prompt: dict[str, bool] = {}
    for row in results:
        by_task.setdefault(row["tag"], []).append(bool(row["correct"]))
        by_prompt[row["metadata"]] = by_prompt.get(row["metadata"], False) or bool(row["correct"])
    tags = [t for t in TASKS if t in by_task] + [t for t in by_task if t not in TASKS]
    scores = {tag: float(np.mean(by_task[tag])) for tag in tags}
    return {"overall": float(np.mean(list(scores.values()))), **scores,
            "correct_images": float(np.mean([bool(r["correct"]) for r in results])),
            "correct_prompts": float(np.mean(list(by_prompt.values()))),
            "images": len(results), "prompts": len(by_prompt), "tasks": tags,
            "counts": {tag: [int(sum(by_task[tag])), len(by_task[tag])] for tag in tags}}


def needs_colors(prompts: Sequence[dict]) -> bool:
    """Whether any prompt has a colour clause (so a detector without colours needs a CLIP classifier)."""
    return any("color" in clause for meta in prompts for clause in meta.get("include", []))


def load_image(path: str | Path) -> np.ndarray:
    """An image file as uint8 (H, W, 3) RGB (EXIF orientation applied, as the official evaluator does)."""
    from PIL import Image, ImageOps, UnidentifiedImageError
    try:
        with Image.open(path) as im:
            return np.asarray(ImageOps.exif_transpose(im).convert("RGB"))
    except (UnidentifiedImageError, OSError, SyntaxError) as e:  # PIL's errors for foreign or damaged files
        raise FluidbenchError(f"{path}: not a readable PNG image ({' '.join(str(e).split())[:200]})") from None


def score_folder(images_dir: str | Path, detector: Detector, color_classifier: ColorClassifier | None = None,
                 rules: GenEvalRules = GenEvalRules(), batch_size: int = 8, progress: bool = True,
                 per_prompt: int | None = None) -> dict:
    """Score a folder in the official layout; write DIR/results.jsonl and DIR/summary.json; return the summary.

    Args:
        images_dir: `<index:05d>/metadata.jsonl` + `<index:05d>/samples/<n>.png` folders (eval/geneval_folder.py).
        detector: any Detector; `detector.comparable` is recorded (False: not comparable to published GenEval).
        color_classifier: for colour clauses; None uses the detections' own colours when the detector reports
            them (the ShapesT2I oracle), else colour clauses raise.
        rules: GenEval's thresholds, cap, NMS and position margin.
        batch_size: images per `detector.detect` call.
        progress: show a progress bar.
        per_prompt: images every prompt folder must hold (None: any count, gaps are still errors).
    Returns:
        `summarize(...)` plus `detector`, `comparable_to_published`, `color_classifier` and `rules`.
    """
    from tqdm import tqdm

    from eval.colors import DetectionColors
    images_dir = Path(images_dir)
    items = [(path, meta) for _, meta, paths in iter_prompt_folders(images_dir, strict=True, per_prompt=per_prompt)
             for path in paths]
    if not items:
        raise FluidbenchError(f"{images_dir}: no images found (expected <index:05d>/metadata.jsonl and "
                              "<index:05d>/samples/<n>.png)")
    for path, meta in items:
        for key in ("tag", "prompt", "include"):
            if key not in meta:
                raise FluidbenchError(f"{path.parent.parent / 'metadata.jsonl'}: missing key '{key}' "
                                      "(GenEval metadata schema)")
        if meta["tag"] not in TASKS:  # else it would become a seventh task, averaged into overall
            raise FluidbenchError(f"{path.parent.parent / 'metadata.jsonl'}: tag {meta['tag']!r} is not a GenEval "
                                  f"task ({', '.join(TASKS)})")
    if color_classifier is None and detector.colors:
        color_classifier = DetectionColors()
    rows = []
    with tqdm(total=len(items), desc=f"GenEval ({detector.name})", unit="img", disable=not progress) as bar:
        for start in range(0, len(items), batch_size):
            batch = items[start:start + batch_size]
            images = [load_image(path) for path, _ in batch]
            for image, dets, (path, meta) in zip(images, detector.detect(images), batch):
                rows.append(score_image(image, dets, meta, str(path), color_classifier, rules))
            bar.update(len(batch))
    summary = summarize(rows)
    summary.update(detector=detector.name, comparable_to_published=bool(detector.comparable),
                   color_classifier=getattr(color_classifier, "name", None), rules=asdict(rules))
    write_text(images_dir / "results.jsonl", "".join(json.dumps(row) + "\n" for row in rows))
    write_json(images_dir / "summary.json", summary)
    return summary
