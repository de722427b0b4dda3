"""Run evaluation bookkeeping: samples do not depend on what was generated before them, a GenEval resumed part
way through makes the images the uninterrupted one made, and samples of another checkpoint are never reused.

A small stand-in run (its variant draws pixels from the generator it is given) keeps these fast; the real
variants go through the same code in the micro sweep (tests/test_sweep.py)."""
from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from eval import run_eval
from eval.sampling import SamplingSettings, generate
from harness.errors import FluidbenchError


class _Variant(nn.Module):
    defaults = {"cfg_scale": 1.0, "temperature": 1.0, "steps": 1, "head_steps": None}

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(()))

    def sampling_cost(self, **_):
        return {"forward_passes": 1, "forward_passes_per_image": 1}

    def sample(self, text, text_mask, *, generator, **_):
        # pixels in [-1, 1] of a 16x16 image; the caption's embedding shifts them so captions differ
        noise = torch.rand(text.shape[0], 3, 16, 16, generator=generator) * 2 - 1
        return (noise + text[:, :1, :1, None]).clamp(-1, 1)


def _run(step: int = 1) -> SimpleNamespace:
    encode = lambda captions: (torch.tensor([[[len(c) / 100.0]] for c in captions]),  # noqa: E731
                               torch.ones(len(captions), 1, dtype=torch.bool))
    return SimpleNamespace(variant=_Variant(), tokenizer=SimpleNamespace(decode=lambda x: x, image_size=16),
                           text_encoder=SimpleNamespace(encode=encode), step=step, checkpoint="ckpt",
                           config=SimpleNamespace(model=SimpleNamespace(variant="stand-in"),
                                                  data=SimpleNamespace(kind="shapes", path="")))


def test_skipped_captions_leave_the_others_unchanged():
    captions = [f"a photo of {i} circles" for i in range(10)]
    settings = SamplingSettings(batch_size=4, seed=3)
    full = dict(generate(_run(), captions, settings, progress=False))
    part = dict(generate(_run(), captions, settings, progress=False, skip={0, 1, 2, 3, 5, 9}))
    assert sorted(part) == [4, 6, 7, 8]
    for i, image in part.items():
        assert (image == full[i]).all()
    # without the batch layout kept, image 4 would be drawn as the first of a new batch: it is not
    other = dict(generate(_run(), captions[4:5], settings, progress=False))
    assert not (other[0] == full[4]).all()


@pytest.fixture
def prompts(tmp_path: Path) -> Path:
    path = tmp_path / "prompts.jsonl"
    rows = [{"tag": "single_object", "include": [{"class": "circle", "count": 1}], "prompt": f"a photo of a circle {i}"}
            for i in range(7)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _pngs(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.glob("*/samples/*.png"))}


def test_geneval_resumes_with_the_same_images_and_redoes_another_checkpoint(tmp_path, prompts, monkeypatch):
    run_dir = tmp_path / "run"
    current = {"run": _run(step=1)}
    monkeypatch.setattr(run_eval, "_open", lambda run_dir, device: (current["run"], "cpu"))
    settings = SamplingSettings(batch_size=4, seed=0)
    first = run_eval.eval_geneval(run_dir, prompts=prompts, per_prompt=2, detector="shapes-oracle",
                                  settings=settings, progress=False)
    folder = run_dir / "eval" / "geneval"
    images = _pngs(folder)
    assert len(images) == 14 and first["sampling_stats"]["images"] == 14

    # killed part way: prompts 1, 5 and 6 never written (batches of 4 images = 2 prompts: 0-1, 2-3, 4-5, 6)
    for index in (1, 5, 6):
        for f in sorted((folder / f"{index:05d}").rglob("*"), reverse=True):
            f.rmdir() if f.is_dir() else f.unlink()
    again = run_eval.eval_geneval(run_dir, prompts=prompts, per_prompt=2, detector="shapes-oracle",
                                  settings=settings, progress=False)
    assert _pngs(folder) == images
    assert again["overall"] == first["overall"]
    # only the batches with a prompt missing ran (4 + 4 + 2 images); the cost covers every image made here
    assert again["sampling_stats"]["images"] == 14 + 10
    assert again["sampling_stats"]["sequential_passes"] == first["sampling_stats"]["sequential_passes"]
    # nothing left to make: the score again, with the recorded cost
    third = run_eval.eval_geneval(run_dir, prompts=prompts, per_prompt=2, detector="shapes-oracle",
                                  settings=settings, progress=False)
    assert third["sampling_stats"]["images"] == 24 and third["sampling_stats"]["seconds_per_image"] > 0

    # a later checkpoint: every sample made again, none mixed in from step 1
    current["run"] = _run(step=2)
    later = run_eval.eval_geneval(run_dir, prompts=prompts, per_prompt=2, detector="shapes-oracle",
                                  settings=settings, progress=False)
    assert later["sampling_stats"]["images"] == 14 and later["step"] == 2
    assert json.loads((folder / "samples.json").read_text())["key"]["step"] == 2


def test_reference_data_of_another_data_set_needs_its_path_and_split(tmp_path, monkeypatch):
    monkeypatch.setattr(run_eval, "_open", lambda run_dir, device: (_run(), "cpu"))
    with pytest.raises(FluidbenchError, match="data_kind, data_path and split go together"):
        run_eval.eval_fid(tmp_path / "run", n=4, data_kind="coco", split="train2014", progress=False)


def test_latent_moments_add_up_over_batches_and_interrupted_evaluations():
    from eval.sampling import LatentStats

    g = torch.Generator().manual_seed(0)
    x = torch.randn(10, 16, 4, generator=g) * 3 + 0.5
    whole, parts = LatentStats(), [LatentStats(), LatentStats()]
    whole.add(x)
    parts[0].add(x[:3])
    parts[1].add(x[3:])
    for stats in (whole, parts[0].merged(parts[1])):
        s = stats.summary()
        assert s["values"] == x.numel()
        assert s["std"] == pytest.approx(x.double().std(unbiased=False).item(), rel=1e-9)
        assert s["mean_abs"] == pytest.approx(x.double().abs().mean().item(), rel=1e-9)
        assert s["max_abs"] == pytest.approx(x.abs().max().item())
    assert LatentStats().summary() == {}


def test_code_counts_add_up_and_paint_is_counted_against_the_datas_background():
    from eval.sampling import CodeStats, paint_comparison

    data = CodeStats()
    data.add(torch.tensor([[7, 7, 7, 2], [7, 7, 3, 3]]))  # background code 7; 1 and 2 other tokens
    assert data.images == 2 and data.counts[7] == 5 and data.other_than(7) == 1.5
    whole, parts = CodeStats(), [CodeStats(), CodeStats()]
    sampled = torch.tensor([[7, 1, 1, 1], [7, 7, 7, 7], [9, 9, 9, 9]])  # a code the data never had (9)
    whole.add(sampled)
    parts[0].add(sampled[:1])
    parts[1].add(sampled[1:])
    assert parts[0].merged(parts[1]) == whole and len(whole.counts) == 10
    paint = paint_comparison(whole, data)
    assert paint["background_code"] == 7
    assert paint["sampled_per_image"] == pytest.approx(7 / 3) and paint["data_per_image"] == 1.5
    assert paint["ratio"] == pytest.approx((7 / 3) / 1.5)
    # ties of the commonest code: the smallest; no images yet: nothing to compare
    tied = CodeStats()
    tied.add(torch.tensor([[4, 4, 2, 2]]))
    assert paint_comparison(whole, tied)["background_code"] == 2
    assert paint_comparison(CodeStats(), data) == {}
    from harness.data import profile

    assert profile("shapes").plain_background and not profile("coco").plain_background  # where eval fid counts it


def test_data_latents_of_a_normalised_kl_tokenizer_have_unit_std():
    from eval.sampling import LatentStats, data_latent_stats, latent_comparison
    from variants.tokenizer_train import TokenizerTrainConfig, _estimate_normalisation, build_tokenizer

    cfg = TokenizerTrainConfig(kind="kl", widths=(8, 16, 16), norm_groups=4, latent_channels=4)
    tokenizer = build_tokenizer(cfg).eval()
    with torch.no_grad():  # posteriors as wide as the means' spread in two channels: mostly-noise channels, as
        tokenizer.model.quant_conv.bias[4:6] += 6.0  # a trained tokenizer had; training sees mean + std * eps
    images = torch.randint(0, 256, (64, 3, 32, 32), generator=torch.Generator().manual_seed(1), dtype=torch.uint8)
    _estimate_normalisation(tokenizer, images, torch.Generator().manual_seed(2))
    mean, std = tokenizer.encode_moments(images.float() / 127.5 - 1)
    assert (std.pow(2).mean((0, 1)).sqrt()[:2] > 0.5).all()  # the two noisy channels
    draws = mean + std * torch.randn(mean.shape, generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(draws.std(dim=(0, 1)), torch.ones(4), atol=0.05, rtol=0)  # every channel
    data = data_latent_stats(tokenizer, images.split(16), seed=0)
    assert data.summary()["std"] == pytest.approx(1.0, abs=0.02)
    assert data_latent_stats(tokenizer, images.split(16), seed=0) == data  # seeded posterior draws
    sampled = LatentStats()
    sampled.add(torch.randn(100, 64, 4, generator=torch.Generator().manual_seed(3)) * 500)  # a diverged sampler
    assert latent_comparison(sampled, data)["std_ratio"] == pytest.approx(500, rel=0.05)


def test_geneval_records_the_moments_of_every_latent_it_made(tmp_path, prompts, monkeypatch):
    run_dir = tmp_path / "run"
    monkeypatch.setattr(run_eval, "_open", lambda run_dir, device: (_run(), "cpu"))
    settings = SamplingSettings(batch_size=4, seed=0)
    first = run_eval.eval_geneval(run_dir, prompts=prompts, per_prompt=2, detector="shapes-oracle",
                                  settings=settings, progress=False)
    per_image = 3 * 16 * 16  # the stand-in's "latents" are its pixels
    assert first["sampling_stats"]["latents"]["values"] == 14 * per_image
    assert 0 < first["sampling_stats"]["latents"]["max_abs"] <= 1.0
    folder = run_dir / "eval" / "geneval"
    for f in sorted((folder / "00006").rglob("*"), reverse=True):  # the last batch lost: made again
        f.rmdir() if f.is_dir() else f.unlink()
    again = run_eval.eval_geneval(run_dir, prompts=prompts, per_prompt=2, detector="shapes-oracle",
                                  settings=settings, progress=False)
    assert again["sampling_stats"]["latents"]["values"] == (14 + 2) * per_image


# --- FID with the metric panel, and the named COCO protocols -----------------------------------------------------

def _fid_run() -> SimpleNamespace:
    """The stand-in run with a tokenizer whose "latents" are its pixels, for FID's latent-moments check."""
    run = _run()
    run.tokenizer.device = "cpu"
    run.tokenizer.encode_moments = lambda x: (x.flatten(2).transpose(1, 2), torch.zeros(x.shape[0], 1, 3))
    return run


def _tiny_shapes_extractor(folder: Path) -> Path:
    """A random-init Shapes extractor saved in eval/shapes_features.py's format (model.pt + manifest.json)."""
    import hashlib
    import io

    from eval.shapes_features import VERSION, FeatureNetConfig, ShapesFeatureNet, _init

    cfg = FeatureNetConfig(classes=["circle", "square"], colors=["red", "blue"], palette=[[255, 0, 0], [0, 0, 255]],
                           image_size=16, width=4, feature_dim=8)
    net = ShapesFeatureNet(cfg)
    _init(net, torch.Generator().manual_seed(0))
    buffer = io.BytesIO()
    torch.save({"version": VERSION, "config": cfg.__dict__, "state_dict": net.state_dict()}, buffer)
    folder.mkdir(parents=True)
    (folder / "model.pt").write_bytes(buffer.getvalue())
    (folder / "manifest.json").write_text(json.dumps({"sha256": hashlib.sha256(buffer.getvalue()).hexdigest()}))
    return folder


def _coco(root: Path, split: str, n: int) -> Path:
    """A fake COCO-2014 split of n random JPEGs with two captions each."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(len(split))
    (root / f"{split}2014").mkdir(parents=True)
    (root / "annotations").mkdir(exist_ok=True)
    images, annotations = [], []
    for i in range(n):
        name = f"COCO_{split}2014_{i:012d}.jpg"
        Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(root / f"{split}2014" / name)
        images.append({"id": i, "file_name": name})
        annotations += [{"id": 10 * i + k, "image_id": i, "caption": f"{split} image {i} caption {k}"} for k in range(2)]
    (root / "annotations" / f"captions_{split}2014.json").write_text(json.dumps({"images": images,
                                                                                  "annotations": annotations}))
    return root


def test_fid_panel_under_both_coco_protocols(tmp_path, monkeypatch):
    from eval import fid

    monkeypatch.setattr(run_eval, "_open", lambda run_dir, device: (_fid_run(), "cpu"))
    coco = _coco(_coco(tmp_path / "coco", "val", 12), "train", 10)
    features = _tiny_shapes_extractor(tmp_path / "features")
    common = dict(data_path=str(coco), extractor="shapes", weights=str(features), cache_dir=tmp_path / "cache",
                  n=6, n_boot=5, settings=SamplingSettings(batch_size=4), progress=False)
    imagen = run_eval.eval_fid(tmp_path / "run", protocol="imagen", **common)
    assert imagen["protocol"]["name"] == "imagen" and imagen["protocol"]["captions_split"] == "val2014"
    assert imagen["reference_protocol"]["n"] is None and imagen["n_reference"] == 12  # the whole val split
    assert imagen["n_images"] == 6 and "floor" not in imagen  # a floor only when asked for, outside ShapesT2I
    for metric in ("fid", "kid", "precision", "recall", "density", "coverage", "fid_standardised"):
        assert np.isfinite(imagen[metric]) and imagen[f"{metric}_se"] >= 0, metric
    assert imagen["fid_se"] > 0
    # the panel's FID is eval.fid's on the same samples and reference statistics
    samples = np.load(tmp_path / "run" / "eval" / "fid" / "samples.npy")
    ext = fid.load_extractor("shapes", features)
    again = fid.fid_from_images([torch.from_numpy(samples).permute(0, 3, 1, 2)], imagen["reference"], ext,
                                progress=None)
    assert imagen["fid"] == pytest.approx(again["fid"], rel=1e-9)

    fluid = run_eval.eval_fid(tmp_path / "run", protocol="fluid", floor=True, **common)
    assert fluid["protocol"]["name"] == "fluid" and fluid["protocol"]["captions_split"] == "train2014"
    assert fluid["reference_protocol"]["n"] == 6 and fluid["n_reference"] == 6  # the captions' own images
    assert fluid["floor"]["split"] == "val2014" and np.isfinite(fluid["floor"]["fid"])
    assert fluid["fid"] != imagen["fid"]

    with pytest.raises(FluidbenchError, match="--protocol parti: unknown"):
        run_eval.eval_fid(tmp_path / "run", protocol="parti", **common)
    with pytest.raises(FluidbenchError, match="--protocol imagen: needs --data-path"):
        run_eval.eval_fid(tmp_path / "run", protocol="imagen", **{**common, "data_path": None})


def test_captions_are_read_without_decoding_images(tmp_path):
    from harness.data import open_dataset

    coco = _coco(tmp_path / "coco", "val", 5)
    dataset = open_dataset("coco", coco, "val2014", image_size=16, n=3, seed=1)
    for jpeg in (coco / "val2014").glob("*.jpg"):
        jpeg.unlink()  # reading a caption through the image would now fail
    captions = run_eval._captions(dataset, 3)
    assert captions == dataset.captions and all(c.startswith("val image") for c in captions)
    with pytest.raises(FluidbenchError, match="not found"):
        dataset[0]


def test_fid_ref_defaults_build_what_eval_fid_protocols_read(tmp_path, monkeypatch, capsys):
    """`fid-ref` without --split builds the default (fluid) protocol's reference, `--protocol imagen` the whole
    val2014 set; `eval fid --protocol` then finds both in the cache and does not build them again."""
    from harness.cli import main

    monkeypatch.setattr(run_eval, "_open", lambda run_dir, device: (_fid_run(), "cpu"))
    coco = _coco(_coco(tmp_path / "coco", "val", 8), "train", 7)
    features = _tiny_shapes_extractor(tmp_path / "features")
    paths = {}
    for name, extra in (("fluid", ["--n", "5"]), ("imagen", ["--protocol", "imagen"])):
        argv = ["eval", "fid-ref", "--data", "coco", "--path", str(coco), "--resolution", "16", "--extractor",
                "shapes", "--features", str(features), "--cache", str(tmp_path / "cache"), "--device", "cpu", *extra]
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code in (0, None)
        paths[name] = capsys.readouterr().out.split()[0]
    assert "coco-train2014-n5-16px-shapes-v1-" in paths["fluid"]
    assert "coco-val2014-nall-16px-shapes-v1-" in paths["imagen"]
    built = {p: p.stat().st_mtime_ns for p in (tmp_path / "cache").iterdir()}
    common = dict(data_path=str(coco), extractor="shapes", weights=str(features), cache_dir=tmp_path / "cache",
                  n=5, n_boot=0, metrics=["fid", "kid", "precision", "recall"],
                  settings=SamplingSettings(batch_size=4), progress=False)
    with pytest.raises(FluidbenchError, match="density and coverage need more than 5"):
        run_eval.eval_fid(tmp_path / "run", protocol="fluid", **{**common, "metrics": None})
    for name in ("fluid", "imagen"):
        result = run_eval.eval_fid(tmp_path / "run", protocol=name, **common)
        assert result["reference"] == paths[name] and result["n_reference"] == (5 if name == "fluid" else 8)
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "cache").iterdir()} == built  # read, never rewritten


def test_cmmd_and_fd_dinov2_are_registered_metrics_with_their_own_result_files(tmp_path, monkeypatch):
    """CMMD through the registry: eval_fid on CLIP embeddings (a tiny random open_clip model from a file), written
    to RUN/eval/cmmd.json, its table columns filled; the FID entry's command line writes switches as one word."""
    import open_clip

    from eval.metrics import METRICS
    from eval.settings import CMMDSettings, FIDSettings
    from harness.jobs import _flags

    cfg = {"embed_dim": 16, "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16,
                                           "patch_size": 8},
           "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}
    (tmp_path / "tiny-cmmd-clip.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(tmp_path / "tiny-cmmd-clip.json")
    with torch.random.fork_rng():
        torch.manual_seed(0)
        torch.save(open_clip.create_model("tiny-cmmd-clip").state_dict(), tmp_path / "clip.bin")
    monkeypatch.setattr(run_eval, "_open", lambda run_dir, device: (_fid_run(), "cpu"))
    coco = _coco(tmp_path / "coco", "val", 8)
    settings = CMMDSettings(protocol="imagen", data_path=str(coco), n=6, extractor="clip-tiny-cmmd-clip",
                            weights=str(tmp_path / "clip.bin"), cache_dir=str(tmp_path / "cache"), n_boot=5)
    metric = METRICS["cmmd"]
    result = metric.run(tmp_path / "run", settings, SamplingSettings(batch_size=4), progress=False)
    assert json.loads((tmp_path / "run" / "eval" / "cmmd.json").read_text())["cmmd"] == result["cmmd"]
    assert not (tmp_path / "run" / "eval" / "fid.json").exists()  # FID's file is FID's alone
    row = metric.row(result)
    assert set(row) == {"cmmd", "cmmd_se"} and row["cmmd"] > 0 and row["cmmd_se"] > 0
    assert tuple(result["panel"]["metrics"]) == ("cmmd",)
    assert METRICS["fd_dinov2"].settings().extractor == "dinov2-vit-l-14"
    assert METRICS["fd_dinov2"].row({"fid": 3.0, "fid_se": 0.1}) == {"fd_dinov2": 3.0, "fd_dinov2_se": 0.1}
    assert _flags(FIDSettings, {"floor": False, "n_boot": 10}) == ["--no-floor", "--n-boot", "10"]
    assert _flags(FIDSettings, {"floor": True}) == ["--floor"]
