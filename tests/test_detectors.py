"""GenEval detectors and colour classifiers: tiny random models saved in the published formats load through the
real loading paths (transformers Mask2Former folder, open_clip folder and file); mmdet-style resizing and
post-processing; the masked crop over #999999; the `eval geneval-score` command end to end."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from eval.colors import (BACKGROUND, TEMPLATES, ClipColors, DetectionColors, crop_object, load_clip_colors)
from eval.detectors import (COCO_ALIASES, HFMask2FormerDetector, instance_postprocess, load_detector,
                            geneval_object_names, mmdet_resized_shape)
from eval.geneval_folder import write_prompt_folder
from eval.geneval_rules import COLORS, Detection
from harness.errors import FluidbenchError

# COCO's 80 thing names as detectron2 / Hugging Face spell them (three differ from GenEval's object_names.txt)
HF_SPELLING = {v: k for k, v in COCO_ALIASES.items() if k in ("mouse", "remote", "keyboard")}
TINY_CLIP = {"embed_dim": 16, "quick_gelu": True,
             "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8},
             "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 16, "heads": 2, "layers": 1}}


def tiny_mask2former_config(id2label=None):
    from transformers import Mask2FormerConfig, SwinConfig
    backbone = SwinConfig(image_size=224, patch_size=4, embed_dim=16, depths=[1, 1, 1, 1], num_heads=[1, 1, 2, 2],
                          window_size=7, out_features=["stage1", "stage2", "stage3", "stage4"])
    labels = id2label or {i: HF_SPELLING.get(n, n) for i, n in enumerate(geneval_object_names())}
    return Mask2FormerConfig(backbone_config=backbone, feature_size=32, mask_feature_size=32, hidden_dim=32,
                             encoder_feedforward_dim=64, dim_feedforward=64, encoder_layers=1, decoder_layers=2,
                             num_attention_heads=2, num_queries=6, use_pretrained_backbone=False,
                             id2label=labels, label2id={v: k for k, v in labels.items()})


@pytest.fixture(scope="module")
def mask2former_dir(tmp_path_factory):
    """A random tiny Mask2Former saved as facebook/mask2former-swin-small-coco-instance is laid out."""
    from transformers import Mask2FormerForUniversalSegmentation, Mask2FormerImageProcessor
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("mask2former")
    Mask2FormerForUniversalSegmentation(tiny_mask2former_config()).save_pretrained(path)
    Mask2FormerImageProcessor(size={"shortest_edge": 384}).save_pretrained(path)  # the hub's resize: ignored
    return path


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    """A random tiny CLIP in open_clip's Hugging Face layout (open_clip_config.json + safetensors)."""
    from open_clip.model import CLIP
    from safetensors.torch import save_file
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("clip")
    (path / "open_clip_config.json").write_text(json.dumps({"model_cfg": TINY_CLIP, "preprocess_cfg": {}}))
    save_file(CLIP(**TINY_CLIP).state_dict(), str(path / "open_clip_model.safetensors"))
    return path


# ---- Mask2Former ----

def test_mmdet_resize_rule():
    assert mmdet_resized_shape(512, 512) == (800, 800)
    assert mmdet_resized_shape(480, 640) == (800, 1067)  # short side 800
    assert mmdet_resized_shape(100, 1000) == (133, 1333)  # long side capped at 1333


def test_instance_postprocess_by_hand():
    # two queries, two classes + "no object"; log-probabilities so softmax gives these probabilities exactly
    probs = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.6, 0.3]])
    logit = math.log(0.8 / 0.2)  # sigmoid = 0.8
    masks = torch.full((2, 4, 5), -5.0)
    masks[0, 1:3, 0:2] = logit  # query 0: rows 1-2, cols 0-1
    masks[1, 0, 4] = 0.0  # query 1: sigmoid 0.5 but not > 0: an empty mask
    labels, scores, binary, boxes = instance_postprocess(probs.log(), masks, max_per_image=2)
    order = scores.argsort(descending=True)
    assert labels[order].tolist() == [0, 1]
    assert scores[order].tolist() == pytest.approx([0.7 * 0.8, 0.0], abs=1e-5)
    assert boxes[order[0]].tolist() == [0, 1, 2, 3]  # tight box, end-exclusive (mmdet's mask2bbox)
    assert boxes[order[1]].tolist() == [0, 0, 0, 0]
    assert binary[order[0]].sum() == 4
    # without the cap every (query, class) pair comes back, a query under several classes
    labels, scores, _, _ = instance_postprocess(probs.log(), masks, max_per_image=100)
    assert len(labels) == 4


def test_hf_mask2former_loads_and_detects(mask2former_dir):
    detector = load_detector("hf-mask2former", mask2former_dir)
    assert isinstance(detector, HFMask2FormerDetector) and not detector.comparable and not detector.colors
    # detectron2 spellings (mouse, remote, keyboard) map onto GenEval's names: all 80 are reachable
    assert detector.class_names == tuple(geneval_object_names())
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (40, 56, 3), dtype=np.uint8), rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)]
    results = detector.detect(images)
    assert len(results) == 2
    for image, dets in zip(images, results):
        assert 0 < len(dets) <= 100
        for d in dets:
            assert d.class_name in detector.class_names and 0.0 <= d.score <= 1.0
            assert d.mask.shape == image.shape[:2] and d.mask.dtype == bool
            if d.mask.any():
                ys, xs = np.nonzero(d.mask)
                assert d.box == (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
    # as GenEval (one image per call): an image's detections do not depend on its batch neighbours
    twice = detector.detect([images[1], images[1]])
    mixed = sorted(results[1], key=lambda d: (d.class_name, d.box))
    for dets in twice:
        same = sorted(dets, key=lambda d: (d.class_name, d.box))
        assert [(d.class_name, d.box) for d in same] == [(d.class_name, d.box) for d in mixed]
        assert [d.score for d in same] == pytest.approx([d.score for d in mixed], abs=1e-4)


def test_hf_mask2former_inputs_follow_mmdet(mask2former_dir):
    detector = load_detector("hf-mask2former", mask2former_dir)
    image = np.full((48, 64, 3), 200, np.uint8)
    batch, pixel_mask, shapes = detector._inputs([image])
    assert shapes == [(800, 1067)] and batch.shape == (1, 3, 800, 1088)  # padded to a multiple of 32
    expected = (200 - 123.675) / 58.395  # ImageNet mean/std in 0-255 units, as mmdet's img_norm_cfg
    assert batch[0, 0, 0, 0].item() == pytest.approx(expected, rel=1e-5)
    assert batch[0, :, :, 1067:].abs().max() == 0 and pixel_mask.sum() == 800 * 1067


def test_hf_mask2former_errors(tmp_path):
    from transformers import Mask2FormerForUniversalSegmentation
    with pytest.raises(FluidbenchError, match="config.json"):
        load_detector("hf-mask2former", tmp_path)
    unnamed = Mask2FormerForUniversalSegmentation(tiny_mask2former_config({i: f"LABEL_{i}" for i in range(80)}))
    with pytest.raises(FluidbenchError, match="object names"):
        HFMask2FormerDetector(unnamed, (0.5,) * 3, (0.5,) * 3)


def test_mmdet_and_unknown_detectors_fail_clearly(tmp_path):
    with pytest.raises(FluidbenchError, match="detector-path"):
        load_detector("mmdet")
    with pytest.raises(FluidbenchError, match="expected one of"):
        load_detector("yolo")
    try:
        import mmdet  # noqa: F401
    except ImportError:
        with pytest.raises(FluidbenchError, match="pip install"):
            load_detector("mmdet", tmp_path)


# ---- colours ----

def test_crop_is_the_mask_over_grey_cut_to_the_box():
    image = np.zeros((10, 12, 3), np.uint8)
    image[..., 0] = 200
    mask = np.zeros((10, 12), bool)
    mask[2:8, 2:5] = True
    crop = np.asarray(crop_object(image, Detection("car", 0.9, (2.0, 2.0, 8.0, 8.0), mask)))
    assert crop.shape == (6, 6, 3)
    assert (crop[:, :3] == (200, 0, 0)).all() and (crop[:, 3:] == BACKGROUND).all()
    # no mask: the plain crop
    plain = np.asarray(crop_object(image, Detection("car", 0.9, (2.0, 2.0, 8.0, 8.0))))
    assert (plain == (200, 0, 0)).all()


def test_templates_are_genevals():
    assert [t.format(c="red", object="car") for t in TEMPLATES] == [
        "a photo of a red car", "a photo of a red-colored car", "a photo of a red object"]


def test_detection_colors():
    dets = [Detection("circle", 1.0, (0, 0, 1, 1), color="green"), Detection("circle", 1.0, (0, 0, 1, 1), color="red")]
    assert DetectionColors().classify(np.zeros((2, 2, 3), np.uint8), dets, "circle") == ["green", "red"]
    with pytest.raises(FluidbenchError):
        DetectionColors().classify(np.zeros((2, 2, 3), np.uint8), [Detection("circle", 1.0, (0, 0, 1, 1))], "circle")


def colour_scene():
    image = np.zeros((32, 48, 3), np.uint8)
    image[4:20, 4:20] = (220, 30, 30)
    image[8:28, 26:44] = (30, 70, 225)
    masks = [np.zeros((32, 48), bool) for _ in range(2)]
    masks[0][4:20, 4:20] = True
    masks[1][8:28, 26:44] = True
    return image, [Detection("car", 0.9, (4, 4, 20, 20), masks[0]), Detection("car", 0.8, (26, 8, 44, 28), masks[1])]


def test_tiny_clip_folder_loads_and_classifies(clip_dir):
    colors = load_clip_colors(clip_dir)
    assert isinstance(colors, ClipColors)
    image, dets = colour_scene()
    names = colors.classify(image, dets, "car")
    assert len(names) == 2 and all(n in COLORS for n in names)
    assert colors.classify(image, dets, "car") == names  # deterministic
    text = colors.text_embeddings("car")
    assert text.shape == (16, len(COLORS))
    assert torch.allclose(text.norm(dim=0), torch.ones(len(COLORS)), atol=1e-5)


def test_tiny_clip_file_loads_for_a_named_architecture(clip_dir, tmp_path):
    import open_clip
    (tmp_path / "fluidbench-tiny-clip.json").write_text(json.dumps(TINY_CLIP))
    open_clip.add_model_config(tmp_path / "fluidbench-tiny-clip.json")
    from_file = load_clip_colors(clip_dir / "open_clip_model.safetensors", arch="fluidbench-tiny-clip")
    from_dir = load_clip_colors(clip_dir)
    image, dets = colour_scene()
    assert from_file.classify(image, dets, "car") == from_dir.classify(image, dets, "car")
    # OpenAI's ViT-L-14.pt is a TorchScript archive (torch.load refuses it with weights_only=True); its attention
    # mask is a plain attribute there, not a buffer, so the archive holds exactly the weights
    model = from_dir.model
    model.attn_mask = model._buffers.pop("attn_mask")
    with torch.no_grad():
        traced = torch.jit.trace(model, (torch.zeros(1, 3, 32, 32), torch.zeros(1, 77, dtype=torch.long)),
                                 strict=False, check_trace=False)
    (tmp_path / "openai").mkdir()
    traced.save(str(tmp_path / "openai" / "ViT-L-14.pt"))
    # loading TorchScript runs the archive's code: refused unless asked for
    with pytest.raises(FluidbenchError, match="TorchScript archive"):
        load_clip_colors(tmp_path / "openai", arch="fluidbench-tiny-clip")
    from_archive = load_clip_colors(tmp_path / "openai", arch="fluidbench-tiny-clip", torchscript=True)
    archive_weights = from_archive.model.state_dict()
    assert all(torch.equal(v, archive_weights[k]) for k, v in from_file.model.state_dict().items())
    with pytest.raises(FluidbenchError, match="not found"):
        load_clip_colors(tmp_path / "missing.pt")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FluidbenchError, match="no CLIP weights"):
        load_clip_colors(empty)


# ---- the command ----

def test_geneval_score_command(mask2former_dir, clip_dir, tmp_path, capsys):
    from harness.cli import main
    rng = np.random.default_rng(0)
    red_car = {"tag": "colors", "include": [{"class": "car", "count": 1, "color": "red"}],
               "prompt": "a photo of a red car"}
    bench = {"tag": "single_object", "include": [{"class": "bench", "count": 1}], "prompt": "a photo of a bench"}
    for i, meta in enumerate((red_car, bench)):
        write_prompt_folder(tmp_path, i, meta, [rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)])
    with pytest.raises(SystemExit) as done:
        main(["eval", "geneval-score", "--images", str(tmp_path), "--detector", "hf-mask2former",
              "--detector-path", str(mask2former_dir), "--clip-path", str(clip_dir), "--device", "cpu"])
    assert done.value.code == 0
    out = capsys.readouterr().out
    assert "GenEval overall=" in out and "not comparable" in out
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["detector"] == "hf-mask2former" and summary["comparable_to_published"] is False
    assert summary["images"] == 2 and set(summary["tasks"]) == {"colors", "single_object"}
    assert summary["color_classifier"].startswith("clip:")
    rows = (tmp_path / "results.jsonl").read_text().splitlines()
    assert len(rows) == 2 and all(json.loads(r)["tag"] in ("colors", "single_object") for r in rows)


def test_geneval_score_command_errors(tmp_path, capsys):
    from harness.cli import main
    for argv in (["--images", str(tmp_path / "missing"), "--detector", "shapes-oracle"],
                 ["--images", str(tmp_path), "--detector", "yolo"]):
        with pytest.raises(SystemExit) as done:
            main(["eval", "geneval-score", *argv])
        assert done.value.code == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and len(err.strip().splitlines()) == 1
