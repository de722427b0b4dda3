"""ShapesT2I: captions true under GenEval's rules, held-out pairs, the prompt file's schema, determinism."""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from eval.geneval_folder import iter_prompt_folders, load_prompts
from eval.geneval_rules import COLORS, TASKS, relative_position
from eval.shapes_oracle import detect
from harness.cli import main
from harness.data import open_dataset
from harness.data.shapes import (CLASSES, DEFAULT_TRAIN, DEFAULT_VAL, HELD_OUT, NUMBERS, PALETTE, PLURALS,
                                 ShapesDataset, generate_split, render_prompt, sample_prompt, shape_mask,
                                 uses_held_out, write_shapes)
from harness.errors import FluidbenchError

OFFICIAL = Path(__file__).resolve().parents[1] / "eval" / "geneval_data" / "evaluation_metadata.jsonl"


def article(noun: str) -> str:
    return ("an " if noun[0] in "aeiou" else "a ") + noun


def true_captions(tag: str, objects: list[dict]) -> set[str]:
    """Every caption of `tag` that is true of exactly these objects, written independently of the generator."""
    names = [o["class"] for o in objects]
    if tag == "single_object" and len(objects) == 1:
        return {f"a photo of {article(names[0])}"}
    if tag == "colors" and len(objects) == 1:
        return {f"a photo of {article(objects[0]['color'] + ' ' + names[0])}"}
    if tag == "counting" and 2 <= len(objects) <= 4 and len(set(names)) == 1:
        return {f"a photo of {NUMBERS[len(objects)]} {PLURALS[names[0]]}"}
    if tag == "two_object" and len(objects) == 2 and names[0] != names[1]:
        return {f"a photo of {article(names[0])} and {article(names[1])}"}
    if tag == "color_attr" and len(objects) == 2 and names[0] != names[1]:
        a, b = objects
        return {f"a photo of {article(a['color'] + ' ' + a['class'])} and {article(b['color'] + ' ' + b['class'])}"}
    if tag == "position" and len(objects) == 2 and names[0] != names[1]:
        target, positioned = objects  # GenEval: clause 0 is the target, clause 1 is "A <relation> B"
        return {f"a photo of {article(positioned['class'])} {relation} {article(target['class'])}"
                for relation in relative_position(positioned["box"], target["box"])}
    return set()


def test_every_caption_is_true_of_its_scene():
    images, records = generate_split(1200, np.random.default_rng(3))
    assert images.shape == (1200, 32, 32, 3) and images.dtype == np.uint8
    for record in records:
        assert record["caption"] in true_captions(record["tag"], record["objects"]), record
    tags = Counter(r["tag"] for r in records)
    assert set(tags) == set(TASKS) and min(tags.values()) > 120  # tasks drawn uniformly
    relations = Counter(r["caption"].split(" ")[5] for r in records if r["tag"] == "position")
    assert set(relations) == {"left", "right", "above", "below"}


def test_scene_pixels_match_the_recorded_objects():
    """Each object's box is the tight box of its colour's pixels; nothing else is drawn; objects stay apart."""
    images, records = generate_split(300, np.random.default_rng(4))
    for image, record in zip(images, records):
        drawn = np.zeros(image.shape[:2], bool)
        for obj in record["objects"]:
            x0, y0, x1, y1 = obj["box"]
            assert 1 <= x0 < x1 <= 31 and 1 <= y0 < y1 <= 31  # inside the 1-px margin
            crop = image[y0:y1, x0:x1]
            mine = (crop == PALETTE[obj["color"]]).all(-1)
            assert mine[0].any() and mine[-1].any() and mine[:, 0].any() and mine[:, -1].any()
            drawn[y0:y1, x0:x1] |= mine
        background = (image == (128, 128, 128)).all(-1)
        assert (background | drawn).all()
        boxes = [o["box"] for o in record["objects"]]
        for i, a in enumerate(boxes):  # at least 2 empty pixels between any two boxes, along x or y
            for b in boxes[i + 1:]:
                assert max(b[0] - a[2], a[0] - b[2], b[1] - a[3], a[1] - b[3]) >= 2


def test_held_out_pairs_never_drawn_but_prompted(tmp_path):
    _, records = generate_split(3000, np.random.default_rng(5))
    pairs = Counter((o["class"], o["color"]) for r in records for o in r["objects"])
    assert not set(pairs) & set(HELD_OUT)
    assert len(pairs) == len(CLASSES) * len(COLORS) - len(HELD_OUT)  # every other pair does occur
    write_shapes(tmp_path, n_train=10, n_val=10, progress=False)
    prompts = load_prompts(tmp_path / "geneval_metadata.jsonl")
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert [tuple(p) for p in manifest["held_out"]] == list(HELD_OUT)
    held = [i for i, p in enumerate(prompts) if uses_held_out(p)]
    assert held == manifest["held_out_prompts"]
    assert {prompts[i]["tag"] for i in held} == {"colors", "color_attr"}
    named = {(c["class"], c.get("color")) for i in held for c in prompts[i]["include"]}
    assert set(HELD_OUT) <= named


def test_prompt_file_has_geneval_schema(tmp_path):
    write_shapes(tmp_path, n_train=10, n_val=10, progress=False)
    ours = load_prompts(tmp_path / "geneval_metadata.jsonl")
    official = [json.loads(line) for line in OFFICIAL.read_text().splitlines()]

    def shape(meta: dict) -> tuple:  # the keys each part of a line carries
        return (meta["tag"], tuple(sorted(meta)), tuple(tuple(sorted(c)) for c in meta["include"]),
                tuple(tuple(sorted(c)) for c in meta.get("exclude", [])))

    assert {shape(m) for m in ours} <= {shape(m) for m in official}
    assert Counter(m["tag"] for m in ours) == {tag: 32 for tag in TASKS}
    for meta in ours:
        assert all(c["class"] in CLASSES and c.get("color", "red") in COLORS for c in meta["include"])
        if meta["tag"] == "counting":
            (include,), (exclude,) = meta["include"], meta["exclude"]
            assert exclude == {"class": include["class"], "count": include["count"] + 1}
        if meta["tag"] == "position":
            assert meta["include"][1]["position"][1] == 0
        # the prompt's words match its clauses, as in GenEval's own file
        objects = [{"class": c["class"], "color": c.get("color")} for c in meta["include"] for _ in range(c["count"])]
        if meta["tag"] != "position":
            assert meta["prompt"] in true_captions(meta["tag"], objects)


def test_render_prompt_makes_any_prompt_true():
    rng = np.random.default_rng(6)
    for tag in TASKS:
        for _ in range(60):
            meta = sample_prompt(tag, rng)
            image, objects = render_prompt(meta, rng, size=64)
            assert image.shape == (64, 64, 3)
            assert meta["prompt"] in true_captions(tag, objects)
    # colours a prompt names are drawn even when held out of training
    meta = {"tag": "colors", "prompt": "a photo of a green circle",
            "include": [{"class": "circle", "count": 1, "color": "green"}]}
    assert render_prompt(meta, rng)[1][0]["color"] == "green"


@pytest.mark.parametrize("clause, message", [
    ({"class": "dog", "count": 1}, "not a ShapesT2I class"),
    ({"class": "circle", "count": 9}, "count 9"),
    ({"class": "circle", "count": 1, "color": "teal"}, "unknown colour 'teal'"),
])
def test_render_prompt_rejects_what_it_cannot_draw(clause, message):
    with pytest.raises(FluidbenchError, match=message):
        render_prompt({"tag": "x", "prompt": "p", "include": [clause]}, np.random.default_rng(0))


def test_shapes_are_whole_pixel_patterns():
    """Each class fills its box (an even-sided triangle leaves its apex row empty); classes differ."""
    for side in range(8, 29):
        masks = {cls: shape_mask(cls, (3, 5, 3 + side, 5 + side), (0, 0, 40, 40)) for cls in CLASSES}
        for cls, mask in masks.items():
            rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
            top = 6 if cls == "triangle" and side % 2 == 0 else 5
            assert (cols[0], cols[-1] + 1, rows[0], rows[-1] + 1) == (3, 3 + side, top, 5 + side), (cls, side)
        assert len({m.tobytes() for m in masks.values()}) == len(CLASSES)


def test_same_arguments_give_identical_bytes(tmp_path):
    write_shapes(tmp_path / "a", seed=1, n_train=400, n_val=50, progress=False)
    write_shapes(tmp_path / "b", seed=1, n_train=400, n_val=50, progress=False)
    write_shapes(tmp_path / "c", seed=2, n_train=400, n_val=50, progress=False)
    write_shapes(tmp_path / "d", seed=1, n_train=100, n_val=50, progress=False)
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    assert [str(f) for f in files] == ["geneval_metadata.jsonl", "manifest.json", "train/captions.jsonl",
                                       "train/images.npy", "val/captions.jsonl", "val/images.npy"]
    for f in files:
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes(), f
    assert (tmp_path / "a/train/images.npy").read_bytes() != (tmp_path / "c/train/images.npy").read_bytes()
    # the val split and the prompts do not depend on the number of training images
    for f in ("val/images.npy", "val/captions.jsonl", "geneval_metadata.jsonl"):
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "d" / f).read_bytes(), f
    assert (DEFAULT_TRAIN, DEFAULT_VAL) == (20000, 1000)


def test_dataset_items_and_open_dataset(tmp_path):
    write_shapes(tmp_path, n_train=30, n_val=12, size=64, progress=False)
    dataset = ShapesDataset(tmp_path, "val")
    assert len(dataset) == 12 and dataset.image_size == 64
    image, caption = dataset[3]
    assert image.dtype.is_floating_point is False and str(image.dtype) == "torch.uint8"
    assert tuple(image.shape) == (3, 64, 64) and caption.startswith("a photo of")
    raw = np.load(tmp_path / "val" / "images.npy")
    assert (image.permute(1, 2, 0).numpy() == raw[3]).all()
    subset = open_dataset("shapes", tmp_path, "train", image_size=64, n=5)
    assert len(subset) == 5 and subset[4][1] == ShapesDataset(tmp_path, "train")[4][1]
    with pytest.raises(FluidbenchError, match="64x64"):
        open_dataset("shapes", tmp_path, "train", image_size=32)
    with pytest.raises(FluidbenchError, match="missing"):
        ShapesDataset(tmp_path, "test")
    with pytest.raises(FluidbenchError, match="not a ShapesT2I folder"):
        ShapesDataset(tmp_path / "train", "train")


def cli(*args: str) -> int:
    """Run the real CLI entry; return its exit code."""
    with pytest.raises(SystemExit) as exit_:
        main(list(args))
    return exit_.value.code


def test_cli_writes_data_and_renders_true_scenes(tmp_path, capsys):
    assert cli("data", "shapes", "--out", str(tmp_path / "data"), "--train", "40", "--val", "10", "--seed", "3",
               "--prompts-per-task", "3") == 0
    line = capsys.readouterr().out.strip()
    assert "40 train + 10 val images (32x32)" in line and "images/s" in line and "\n" not in line
    prompts = tmp_path / "data" / "geneval_metadata.jsonl"
    for out in ("r1", "r2"):
        assert cli("data", "shapes-render", "--prompts", str(prompts), "--out", str(tmp_path / out),
                   "--per-prompt", "2") == 0
    assert "18 prompts x 2 images" in capsys.readouterr().out
    folders = list(iter_prompt_folders(tmp_path / "r1"))
    assert [i for i, _, _ in folders] == list(range(18))
    index, meta, samples = folders[13]
    assert meta == load_prompts(prompts)[13] and [s.name for s in samples] == ["0.png", "1.png"]
    assert (tmp_path / "r1/00013/samples/1.png").read_bytes() == (tmp_path / "r2/00013/samples/1.png").read_bytes()
    for _, meta, samples in folders:  # each image is true of its prompt, as the oracle reads it back
        for sample in samples:
            assert prompt_holds(meta, detect(np.asarray(Image.open(sample).convert("RGB")))), (meta, sample)


def prompt_holds(meta: dict, detections: list) -> bool:
    """Exactly the prompt's objects, with its colours and relations."""
    by_class: dict[str, list] = {}
    for det in detections:
        by_class.setdefault(det.class_name, []).append(det)
    if len(detections) != sum(c["count"] for c in meta["include"]):
        return False
    for clause in meta["include"]:
        found = by_class.get(clause["class"], [])
        if len(found) != clause["count"] or any(d.color != clause.get("color", d.color) for d in found):
            return False
        if "position" in clause:
            relation, target = clause["position"]
            targets = by_class[meta["include"][target]["class"]]
            if any(relation not in relative_position(d.box, t.box) for d in found for t in targets):
                return False
    return True


@pytest.mark.parametrize("size", [32, 64])
def test_aligned_scenes_sit_on_the_token_grid(size):
    """--align 4: every box's corners on the 4-pixel grid (at 32x32), whole cells apart; captions still true."""
    images, records = generate_split(600, np.random.default_rng(7), size=size, align=4)
    unit = 4 * size // 32
    for image, record in zip(images, records):
        assert record["caption"] in true_captions(record["tag"], record["objects"]), record
        for obj in record["objects"]:
            x0, y0, x1, y1 = obj["box"]
            # the recorded box is the tight one: an even-sided triangle's empty apex row moves y0 down one pixel
            top = y0 - (obj["class"] == "triangle")
            assert x0 % unit == 0 and x1 % unit == 0 and y1 % unit == 0 and top % unit == 0, obj
            assert 2 * unit <= x1 - x0 <= 3 * unit, obj
        boxes = [o["box"] for o in record["objects"]]
        for i, a in enumerate(boxes):  # at least one whole cell between any two boxes, along x or y
            for b in boxes[i + 1:]:
                assert max(b[0] - a[2], a[0] - b[2], b[1] - a[3], a[1] - b[3]) >= unit
        assert detect_ok(image, record["objects"])
    # the free layout puts most boxes off that grid
    _, free = generate_split(100, np.random.default_rng(7), size=size)
    assert np.mean([o["box"][0] % unit == 0 for r in free for o in r["objects"]]) < 0.5


def detect_ok(image: np.ndarray, objects: list[dict]) -> bool:
    """The oracle reads back exactly the drawn objects (classes, colours, boxes)."""
    found = sorted((d.class_name, d.color, tuple(int(v) for v in d.box)) for d in detect(image))
    return found == sorted((o["class"], o["color"], tuple(o["box"])) for o in objects)


def test_align_is_recorded_and_rendering_follows_it(tmp_path, capsys):
    assert cli("data", "shapes", "--out", str(tmp_path / "data"), "--train", "20", "--val", "4",
               "--prompts-per-task", "2", "--align", "4") == 0
    manifest = json.loads((tmp_path / "data" / "manifest.json").read_text())
    assert manifest["align"] == 4
    write_shapes(tmp_path / "free", n_train=4, n_val=2, progress=False)
    assert "align" not in json.loads((tmp_path / "free" / "manifest.json").read_text())  # as before the option
    assert cli("data", "shapes-render", "--prompts", str(tmp_path / "data" / "geneval_metadata.jsonl"),
               "--out", str(tmp_path / "r"), "--per-prompt", "3", "--align", "4") == 0
    for _, meta, samples in iter_prompt_folders(tmp_path / "r"):
        for sample in samples:
            detections = detect(np.asarray(Image.open(sample).convert("RGB")))
            assert prompt_holds(meta, detections)
            assert all(int(d.box[0]) % 4 == 0 and int(d.box[2]) % 4 == 0 for d in detections)
    capsys.readouterr()
    assert cli("data", "shapes", "--out", str(tmp_path / "bad"), "--align", "3") == 2
    err = capsys.readouterr().err.strip()
    assert "--align" in err and "got 3" in err and "\n" not in err
    assert not (tmp_path / "bad").exists()
