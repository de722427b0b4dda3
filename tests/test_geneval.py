"""GenEval scorer: hand-written golden cases of the official rules, the summary, the folder scorer, and the
ShapesT2I upper bound (true scenes score 1.0 with the oracle; shuffled prompts score clearly lower)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from eval.geneval import GenEvalRules, evaluate_objects, score_folder, select_objects, summarize
from eval.geneval_folder import load_prompts, write_prompt_folder
from eval.geneval_rules import RELATIONS, TASKS, Detection
from harness.errors import FluidbenchError

OFFICIAL = Path(__file__).resolve().parents[1] / "eval" / "geneval_data" / "evaluation_metadata.jsonl"


def det(name, score=0.99, box=(0, 0, 10, 10), color=None):
    return Detection(name, score, tuple(float(v) for v in box), color=color)


def at(name, cx, cy, side=10, score=0.99, color=None):
    """A detection whose box is centred on (cx, cy)."""
    h = side / 2
    return det(name, score, (cx - h, cy - h, cx + h, cy + h), color)


def own_colors(name, found):
    return [d.color for d in found]


def check(metadata, detections, rules=GenEvalRules(), colors_of=own_colors):
    return evaluate_objects(metadata, select_objects(detections, metadata["tag"], rules), colors_of, rules)


SINGLE = {"tag": "single_object", "include": [{"class": "cat", "count": 1}], "prompt": "a photo of a cat"}
TWO_CATS = {"tag": "counting", "include": [{"class": "cat", "count": 2}], "exclude": [{"class": "cat", "count": 3}],
            "prompt": "a photo of two cats"}
RED_CAR = {"tag": "colors", "include": [{"class": "car", "count": 1, "color": "red"}], "prompt": "a photo of a red car"}


def position(relation):
    return {"tag": "position", "include": [{"class": "cat", "count": 1},
                                           {"class": "dog", "count": 1, "position": [relation, 0]}],
            "prompt": f"a photo of a dog {relation} a cat"}


# ---- thresholds ----

def test_threshold_is_strictly_above_0_3():
    assert check(SINGLE, [det("cat", 0.3)]) == (False, "expected cat>=1, found 0")
    assert check(SINGLE, [det("cat", 0.3001)]) == (True, "")


def test_counting_tag_uses_0_9_for_every_class():
    # 0.85 counts for any other tag but not under "counting"
    assert check(TWO_CATS, [det("cat", 0.95), det("cat", 0.85)]) == (False, "expected cat>=2, found 1")
    assert check(TWO_CATS, [det("cat", 0.95), det("cat", 0.91)]) == (True, "")
    # the third cat at 0.85 is below the counting threshold, so the exclude clause does not see it
    assert check(TWO_CATS, [det("cat", 0.95), det("cat", 0.91), det("cat", 0.85)]) == (True, "")
    # the same detections under another tag: 0.85 counts
    kept = select_objects([det("dog", 0.95), det("dog", 0.85)], "two_object")
    assert len(kept["dog"]) == 2
    assert "dog" not in select_objects([det("dog", 0.85)], "counting")


def test_at_most_16_per_class_highest_first():
    dets = [det("dog", 0.31 + 0.01 * i) for i in range(20)]  # ascending scores
    kept = select_objects(dets, "single_object")["dog"]
    assert len(kept) == 16
    assert [d.score for d in kept] == sorted((d.score for d in dets), reverse=True)[:16]
    # an exclude clause counts the capped list: 20 detections are seen as 16
    many = {"tag": "counting", "include": [], "exclude": [{"class": "dog", "count": 17}], "prompt": "-"}
    assert check(many, [det("dog", 0.95) for _ in range(20)]) == (True, "")
    many["exclude"][0]["count"] = 16
    assert check(many, [det("dog", 0.95) for _ in range(20)]) == (False, "expected dog<16, found 16")


def test_exclude_fails_at_count():
    three = [det("cat", 0.95) for _ in range(3)]
    assert check(TWO_CATS, three) == (False, "expected cat<3, found 3")
    # four cats: the include clause is met, the exclude clause fails
    correct, reason = check(TWO_CATS, three + [det("cat", 0.95)])
    assert not correct and reason == "expected cat<3, found 4"


def test_other_classes_do_not_matter():
    assert check(SINGLE, [det("cat", 0.5), det("dog", 0.99), det("car", 0.99)]) == (True, "")


# ---- top-count selection and colours ----

def test_colour_is_judged_on_the_top_count_objects_only():
    blue_first = [det("car", 0.9, color="blue"), det("car", 0.8, color="red")]
    assert check(RED_CAR, blue_first) == (False, "expected red car>=1, found 0 red; and 1 blue")
    red_first = [det("car", 0.8, color="blue"), det("car", 0.9, color="red")]
    assert check(RED_CAR, red_first) == (True, "")


def test_colour_needs_all_count_objects():
    two_red = {"tag": "colors", "include": [{"class": "car", "count": 2, "color": "red"}], "prompt": "-"}
    mixed = [det("car", 0.9, color="red"), det("car", 0.8, color="green"), det("car", 0.7, color="red")]
    assert check(two_red, mixed) == (False, "expected red car>=2, found 1 red; and 1 red, 1 green")
    assert check(two_red, [det("car", 0.9, color="red"), det("car", 0.7, color="red")]) == (True, "")


def test_colour_attribution_failure_names_both_clauses():
    attr = {"tag": "color_attr", "include": [{"class": "car", "count": 1, "color": "red"},
                                             {"class": "bus", "count": 1, "color": "green"}], "prompt": "-"}
    swapped = [det("car", color="green"), det("bus", color="red")]
    correct, reason = check(attr, swapped)
    assert not correct
    assert reason.split("\n") == ["expected red car>=1, found 0 red; and 1 green",
                                  "expected green bus>=1, found 0 green; and 1 red"]
    assert check(attr, [det("car", color="red"), det("bus", color="green")]) == (True, "")


def test_colours_are_asked_lazily_for_the_top_objects():
    calls = []

    def colors_of(name, found):
        calls.append((name, len(found)))
        return own_colors(name, found)

    check(RED_CAR, [det("car", 0.2, color="red")], colors_of=colors_of)  # count not met: never asked
    assert calls == []
    check(RED_CAR, [det("car", 0.9, color="red"), det("car", 0.8, color="red")], colors_of=colors_of)
    assert calls == [("car", 1)]


# ---- ties ----

def test_ties_keep_detector_order():
    # Documented choice: equal scores keep the detector's order (stable sort), so the first car is "top"
    assert check(RED_CAR, [det("car", 0.8, color="blue"), det("car", 0.8, color="red")])[0] is False
    assert check(RED_CAR, [det("car", 0.8, color="red"), det("car", 0.8, color="blue")])[0] is True
    kept = select_objects([det("cat", 0.5, box=(i, 0, i + 1, 1)) for i in range(5)], "single_object")["cat"]
    assert [d.box[0] for d in kept] == [0, 1, 2, 3, 4]


# ---- position ----

OFFSETS = {"left of": (-30, 0), "right of": (30, 0), "above": (0, -30), "below": (0, 30)}


@pytest.mark.parametrize("relation", RELATIONS)
def test_every_relation(relation):
    dx, dy = OFFSETS[relation]
    assert check(position(relation), [at("cat", 50, 50), at("dog", 50 + dx, 50 + dy)]) == (True, "")
    # the opposite placement fails with the relation that does hold
    correct, reason = check(position(relation), [at("cat", 50, 50), at("dog", 50 - dx, 50 - dy)])
    opposite = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}[relation]
    assert not correct and reason == f"expected dog {relation} target, found {opposite} target"


def test_position_margin_of_0_1_box_sizes():
    # two 10-px boxes: the offset shrinks by 0.1 * (10 + 10) = 2 px per axis before normalising
    # offset 3 px: (3 - 2) / 3 = 0.33 < 0.5, no relation (without the margin it would be 1.0: "right of")
    assert check(position("right of"), [at("cat", 50, 50), at("dog", 53, 50)]) == (
        False, "expected dog right of target, found  target")
    # offset (5, 1): x -> (5 - 2) / 5.10 = 0.59 > 0.5 while y -> 0: right of
    assert check(position("right of"), [at("cat", 50, 50), at("dog", 55, 51)]) == (True, "")
    # offset (4, 3): x -> 2 / 5 = 0.4, y -> 1 / 5 = 0.2: nothing, though 4 / 5 = 0.8 without the margin
    assert check(position("right of"), [at("cat", 50, 50), at("dog", 54, 53)])[0] is False
    # a diagonal can satisfy two relations at once
    assert check(position("below"), [at("cat", 50, 50, side=2), at("dog", 60, 60, side=2)]) == (True, "")
    # all inside the margin: the empty relation set
    assert check(position("left of"), [at("cat", 50, 50), at("dog", 51, 51)])[0] is False


def test_position_margin_follows_the_rules_setting():
    boxes = [at("cat", 50, 50), at("dog", 53, 50)]
    assert check(position("right of"), boxes, GenEvalRules(position_threshold=0.0)) == (True, "")


def test_position_checks_every_object_against_every_target():
    two_dogs = {"tag": "position", "include": [{"class": "cat", "count": 2},
                                               {"class": "dog", "count": 2, "position": ["right of", 0]}],
                "prompt": "-"}
    cats = [at("cat", 20, 20), at("cat", 20, 80)]
    assert check(two_dogs, cats + [at("dog", 80, 20), at("dog", 80, 80)]) == (True, "")
    # the dog at (50, 80) is not right of the cat at (20, 20) once the margin is taken off: fails
    assert check(two_dogs, cats + [at("dog", 80, 20), at("dog", 50, 80)])[0] is False
    # only the top-2 cats are targets: a third, lower-scored cat right of the dogs does not matter
    assert check(two_dogs, cats + [at("dog", 80, 20), at("dog", 80, 80), at("cat", 95, 50, score=0.5)]) == (True, "")
    # a higher-scored third cat displaces one target and puts it right of a dog
    correct, _ = check(two_dogs, cats + [at("dog", 80, 20), at("dog", 60, 80), at("cat", 95, 50, score=0.999)])
    assert not correct


def test_failed_target_group_fails_the_position_clause():
    correct, reason = check(position("right of"), [at("dog", 80, 50)])
    assert not correct
    assert reason.split("\n") == ["expected cat>=1, found 0", "no target for dog to be right of"]
    # a target that fails on colour is a failed group too
    coloured = position("right of")
    coloured["include"][0]["color"] = "red"
    correct, reason = check(coloured, [at("cat", 20, 50, color="blue"), at("dog", 80, 50)])
    assert reason.split("\n")[-1] == "no target for dog to be right of"
    coloured_ok = [at("cat", 20, 50, color="red"), at("dog", 80, 50)]
    assert check(coloured, coloured_ok) == (True, "")


def test_nms_is_off_by_default_and_a_setting():
    overlapping = [det("cat", 0.9, (0, 0, 10, 10)), det("cat", 0.8, (1, 1, 11, 11)), det("cat", 0.7, (50, 50, 60, 60))]
    assert len(select_objects(overlapping, "single_object")["cat"]) == 3
    kept = select_objects(overlapping, "single_object", GenEvalRules(nms_threshold=0.5))["cat"]
    assert [d.score for d in kept] == [0.9, 0.7]


# ---- the official prompt file, with synthetic detections ----

def perfect_scene(meta):
    """Detections that satisfy a metadata line: clause k on row k; a positioned clause beside its target."""
    dets = []
    for k, clause in enumerate(meta["include"]):
        cx, cy = 100, 100 + 300 * k
        if "position" in clause:
            relation, target = clause["position"]
            dx, dy = OFFSETS[relation]
            cx, cy = 100 + 5 * dx, 100 + 300 * target + 5 * dy
        dets += [at(clause["class"], cx + 12 * i, cy, side=4, color=clause.get("color"))
                 for i in range(clause["count"])]
    return dets


def test_official_prompts_true_and_broken_scenes():
    prompts = load_prompts(OFFICIAL)
    assert len(prompts) == 553 and {p["tag"] for p in prompts} == set(TASKS)
    for meta in prompts:
        scene = perfect_scene(meta)
        assert check(meta, scene) == (True, ""), meta["prompt"]
        # drop the last object: an include clause is short
        assert check(meta, scene[:-1])[0] is False, meta["prompt"]


# ---- summary ----

def row(tag, correct, prompt):
    return {"tag": tag, "correct": correct, "metadata": json.dumps({"prompt": prompt, "tag": tag})}


def test_summary_is_the_unweighted_mean_of_task_accuracies():
    rows = ([row("single_object", True, "a")] * 4 + [row("counting", True, "b"), row("counting", False, "b")]
            + [row("counting", False, "c")] * 2)
    s = summarize(rows)
    assert s["single_object"] == 1.0 and s["counting"] == 0.25
    assert s["overall"] == pytest.approx(0.625)  # not the image mean 5/8
    assert s["correct_images"] == pytest.approx(5 / 8)
    assert s["correct_prompts"] == pytest.approx(2 / 3)  # a, b (one of its images) but not c
    assert s["tasks"] == ["single_object", "counting"] and s["counts"]["counting"] == [1, 4]
    with pytest.raises(FluidbenchError):
        summarize([])


# ---- the folder scorer ----

class PixelCodeDetector:
    """A test Detector: image i's pixel (0, 0) red channel indexes a fixed list of detections."""

    name = "pixel-code"
    comparable = False
    colors = True
    class_names = ("cat", "dog")

    def __init__(self, scenes):
        self.scenes = scenes

    def detect(self, images):
        return [list(self.scenes[int(image[0, 0, 0])]) for image in images]


def code_image(k):
    image = np.zeros((16, 16, 3), np.uint8)
    image[0, 0, 0] = k
    return image


def test_score_folder_writes_the_official_schema(tmp_path):
    scenes = [[at("cat", 8, 8, color="red")], [at("dog", 8, 8, color="red")]]
    red_cat = {"tag": "colors", "include": [{"class": "cat", "count": 1, "color": "red"}], "prompt": "a red cat"}
    write_prompt_folder(tmp_path, 0, SINGLE, [code_image(0), code_image(1)])
    write_prompt_folder(tmp_path, 1, red_cat, [code_image(1), code_image(0), code_image(0)])
    summary = score_folder(tmp_path, PixelCodeDetector(scenes), batch_size=2, progress=False)
    rows = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert len(rows) == 5
    assert list(rows[0]) == ["filename", "tag", "prompt", "correct", "reason", "metadata", "details"]
    assert [r["correct"] for r in rows] == [True, False, False, True, True]
    assert rows[0]["filename"].endswith("00000/samples/0.png") and json.loads(rows[0]["metadata"]) == SINGLE
    assert json.loads(rows[0]["details"]) == {"cat": [[3.0, 3.0, 13.0, 13.0, 0.99]]}
    on_disk = json.loads((tmp_path / "summary.json").read_text())
    assert on_disk == summary
    assert summary["single_object"] == 0.5 and summary["colors"] == pytest.approx(2 / 3)
    assert summary["overall"] == pytest.approx((0.5 + 2 / 3) / 2)
    assert summary["correct_prompts"] == 1.0 and summary["detector"] == "pixel-code"
    assert summary["comparable_to_published"] is False and summary["rules"]["threshold"] == 0.3


def test_score_folder_errors(tmp_path):
    with pytest.raises(FluidbenchError, match="no images"):
        score_folder(tmp_path, PixelCodeDetector([]), progress=False)
    red_cat = {"tag": "colors", "include": [{"class": "cat", "count": 1, "color": "red"}], "prompt": "a red cat"}
    write_prompt_folder(tmp_path, 0, red_cat, [code_image(0)])
    blind = PixelCodeDetector([[at("cat", 8, 8)]])
    blind.colors = False
    with pytest.raises(FluidbenchError, match="colour classifier"):
        score_folder(tmp_path, blind, progress=False)


# ---- ShapesT2I: the synthetic upper bound ----

@pytest.fixture(scope="module")
def shapes_prompts(tmp_path_factory):
    shapes = pytest.importorskip("harness.data.shapes")
    out = tmp_path_factory.mktemp("shapes")
    shapes.write_shapes(out, seed=0, n_train=4, n_val=4, progress=False)
    return load_prompts(out / "geneval_metadata.jsonl")


def render_folder(root, prompts, metas, per_prompt=2, seed=0):
    from harness.data.shapes import render_prompt
    rng = np.random.default_rng(seed)
    for i, (prompt, meta) in enumerate(zip(prompts, metas)):
        write_prompt_folder(root, i, meta, [render_prompt(prompt, rng)[0] for _ in range(per_prompt)])


def test_true_shapes_scenes_score_one_and_shuffled_prompts_score_lower(shapes_prompts, tmp_path):
    from eval.detectors import load_detector
    oracle = load_detector("shapes-oracle")
    assert {p["tag"] for p in shapes_prompts} == set(TASKS)
    render_folder(tmp_path / "true", shapes_prompts, shapes_prompts)
    summary = score_folder(tmp_path / "true", oracle, progress=False)
    assert summary["overall"] == 1.0, [json.loads(line)["reason"] for line in
                                       (tmp_path / "true" / "results.jsonl").read_text().splitlines()
                                       if not json.loads(line)["correct"]]
    assert all(summary[t] == 1.0 for t in TASKS) and summary["correct_images"] == 1.0
    shuffled = [shapes_prompts[i] for i in np.random.default_rng(1).permutation(len(shapes_prompts))]
    render_folder(tmp_path / "shuffled", shapes_prompts, shuffled)  # images of one prompt, scored against another
    low = score_folder(tmp_path / "shuffled", oracle, progress=False)
    assert low["overall"] < 0.3, low  # measured 0.05-0.09 over three shuffles
