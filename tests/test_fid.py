"""FID: the Frechet distance, running statistics, torch-fidelity's Inception from a weights file, the reference
cache, and Shapes-FID with a tiny extractor trained once per session."""
from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import torch

from eval import fid
from eval.fid import FeatureStats, ReferenceProtocol, frechet_distance
from harness.errors import FluidbenchError


def test_frechet_closed_form_for_diagonal_gaussians():
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.normal(size=16), rng.normal(size=16)
    v1, v2 = rng.uniform(0.1, 3, size=16), rng.uniform(0.1, 3, size=16)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum(v1 + v2 - 2 * np.sqrt(v1 * v2))
    assert frechet_distance(mu1, np.diag(v1), mu2, np.diag(v2)) == pytest.approx(expected, rel=1e-10)
    # Rotating both Gaussians by one orthogonal matrix leaves the distance unchanged (full covariances).
    q, _ = np.linalg.qr(rng.normal(size=(16, 16)))
    rotated = frechet_distance(q @ mu1, q @ np.diag(v1) @ q.T, q @ mu2, q @ np.diag(v2) @ q.T)
    assert rotated == pytest.approx(expected, rel=1e-8)
    assert frechet_distance(mu1, np.diag(v1), mu1, np.diag(v1)) == pytest.approx(0, abs=1e-9)


def test_running_stats_match_numpy_and_torch_fidelity():
    from torch_fidelity.metric_fid import fid_features_to_statistics, fid_statistics_to_metric

    g = torch.Generator().manual_seed(0)
    a = torch.randn(700, 32, generator=g) @ torch.randn(32, 32, generator=g) + 3.0
    b = torch.randn(500, 32, generator=g) * 1.5 + 2.5
    # Uneven batches, two shards merged: the sums do not care how the images were split.
    first, second = FeatureStats(32), FeatureStats(32)
    for chunk in torch.split(a[:300], 64):
        first.update(chunk)
    second.update(a[300:])
    stats_a = first.merge(second)
    stats_b = FeatureStats(32)
    stats_b.update(b)
    assert stats_a.n == 700
    np.testing.assert_allclose(stats_a.mean, a.double().mean(0).numpy(), rtol=1e-12)
    np.testing.assert_allclose(stats_a.cov, np.cov(a.double().numpy(), rowvar=False), rtol=1e-9, atol=1e-9)

    ref = fid_statistics_to_metric(fid_features_to_statistics(a.double()), fid_features_to_statistics(b.double()),
                                   verbose=False)["frechet_inception_distance"]
    ours = fid.fid_between(stats_a, stats_b)
    assert ours > 1.0
    assert ours == pytest.approx(ref, rel=1e-6)


def test_stats_file_roundtrip(tmp_path):
    stats = FeatureStats(4)
    stats.update(torch.arange(24.0).view(6, 4) ** 0.5)
    stats.save(tmp_path / "s.npz")
    back = FeatureStats.load(tmp_path / "s.npz")
    assert back.n == 6 and np.array_equal(back.outer, stats.outer)
    assert np.array_equal(np.load(tmp_path / "s.npz")["sigma"], stats.cov)  # pytorch-fid's keys for other tools
    with pytest.raises(FluidbenchError, match="at least 2"):
        FeatureStats(4).cov


# --- torch-fidelity's Inception through the weights-path code path ---------------------------------------------

@pytest.fixture(scope="module")
def inception_file(tmp_path_factory):
    """A random-init torch-fidelity InceptionV3 saved as the published file is: a plain torch.save'd state dict."""
    import torch_fidelity.feature_extractor_inceptionv3 as tfi

    mp = pytest.MonkeyPatch()
    mp.setattr(tfi, "load_state_dict_from_url", lambda *a, **k: {})  # never download
    mp.setattr(tfi.FeatureExtractorInceptionV3, "load_state_dict", lambda self, sd, strict=True: None)
    net = tfi.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    mp.undo()
    g = torch.Generator().manual_seed(0)
    for m in net.modules():
        if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)):
            torch.nn.init.kaiming_normal_(m.weight, generator=g)
    path = tmp_path_factory.mktemp("inception") / fid.INCEPTION_WEIGHTS_FILE
    torch.save(net.state_dict(), path)
    return path


def test_inception_loads_from_weights_path(inception_file):
    import torch_fidelity.feature_extractor_inceptionv3 as tfi

    assert fid.INCEPTION_URL == tfi.URL_INCEPTION_V3  # our error messages name the library's own file
    net = fid.load_extractor("inception", inception_file)
    assert (net.name, net.dim) == ("inception-v3-compat", 2048)
    assert net.checksum == hashlib.sha256(inception_file.read_bytes()).hexdigest()
    images = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    features = net(images)
    assert features.shape == (2, 2048) and torch.isfinite(features).all()
    assert not torch.allclose(features[0], features[1])


def test_inception_default_location_and_missing_weights(inception_file, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))

    def offline(url, dst, progress=True):
        raise OSError("[Errno -2] Name or service not known")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(FluidbenchError, match="weights-inception-2015-12-05-6726825d.pth") as e:
        fid.inception_weights_path(None)
    assert "\n" not in str(e.value) and "--inception-weights" in str(e.value)
    with pytest.raises(FluidbenchError, match="file not found"):
        fid.inception_weights_path(tmp_path / "nope.pth")
    # Where torch-fidelity itself would have downloaded it: found there without any download.
    cached = tmp_path / "torch" / "hub" / "checkpoints" / fid.INCEPTION_WEIGHTS_FILE
    cached.parent.mkdir(parents=True, exist_ok=True)
    cached.write_bytes(inception_file.read_bytes())
    assert fid.inception_weights_path(None) == cached
    bad = tmp_path / "bad.pth"
    torch.save({"fc.weight": torch.zeros(3)}, bad)
    with pytest.raises(FluidbenchError, match="not a torch-fidelity InceptionV3"):
        fid.load_extractor("inception", bad)


def test_cli_coco_protocol_with_inception(inception_file, tmp_path, capsys):
    """COCO-30K's path at toy size: a seeded sample, centre crop + resize, the protocol in the cache name."""
    from PIL import Image

    from harness.cli import main

    rng = np.random.default_rng(0)
    (tmp_path / "coco" / "train2014").mkdir(parents=True)
    (tmp_path / "coco" / "annotations").mkdir()
    images, annotations = [], []
    for i, (h, w) in enumerate([(48, 80), (90, 60), (64, 64), (50, 70)]):
        name = f"COCO_train2014_{i:012d}.jpg"
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(tmp_path / "coco" / "train2014" / name)
        images.append({"id": i, "file_name": name, "height": h, "width": w})
        annotations += [{"id": 10 * i + k, "image_id": i, "caption": f"caption {k} of image {i}"} for k in range(2)]
    (tmp_path / "coco" / "annotations" / "captions_train2014.json").write_text(
        json.dumps({"images": images, "annotations": annotations}))
    argv = ["eval", "fid-ref", "--data", "coco", "--path", str(tmp_path / "coco"), "--split", "train2014",
            "--n", "3", "--seed", "0", "--resolution", "64", "--inception-weights", str(inception_file),
            "--cache", str(tmp_path / "cache"), "--device", "cpu"]
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code in (0, None)
    path = capsys.readouterr().out.split()[0]
    assert "coco-train2014-n3-64px-inception-v3-compat-" in path
    key = json.loads(open(path.replace(".npz", ".json")).read())["protocol"]
    assert (key["crop"], key["resize_filter"], key["seed"], key["n"]) == ("center", "bicubic", 0, 3)
    assert fid.FeatureStats.load(path).n == 3


# --- Shapes-FID -------------------------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def shapes(tmp_path_factory):
    """A small ShapesT2I set and an extractor trained briefly on it (once per test session)."""
    from eval.shapes_features import train_features
    from harness.data.shapes import write_shapes

    root = tmp_path_factory.mktemp("shapes")
    write_shapes(root, seed=0, n_train=1500, n_val=300, prompts_per_task=2, progress=False)
    info = train_features(root, root / "features", steps=200, batch_size=32, width=16, feature_dim=32,
                          progress=False)
    return root, root / "features", info


def _permute_palette(images: np.ndarray) -> np.ndarray:
    """Swap every ShapesT2I colour for the next one in the palette (same shapes, counts and layout)."""
    from harness.data.shapes import PALETTE

    colors = list(PALETTE.values())
    out = images.copy()
    for src, dst in zip(colors, colors[1:] + colors[:1]):
        out[(images == src).all(-1)] = dst
    return out


def _batches(images: np.ndarray, size: int = 100):
    for start in range(0, len(images), size):
        yield torch.from_numpy(images[start:start + size]).permute(0, 3, 1, 2)


def test_shapes_fid_separates_swapped_colours(shapes, tmp_path):
    root, folder, info = shapes
    assert info["name"] == "shapes-v1" and set(info["val_accuracy"]) >= {"scene", "total", "pairs"}
    assert info["val_accuracy"]["total"] > 0.5  # learned something in a few hundred steps (chance ~0.3)
    net = fid.load_extractor("shapes", folder)
    val = np.load(root / "val" / "images.npy")
    protocol = ReferenceProtocol("shapes", "val", None, 0, "none", "none", 32)
    ref = fid.compute_reference_stats(protocol, _batches(val), net, tmp_path, progress=None)

    same = fid.fid_from_images(_batches(val), ref, net, progress=None)["fid"]
    # Mirrored scenes keep every label (classes, colours, counts): the extractor should barely move.
    mirrored = fid.fid_from_images(_batches(np.ascontiguousarray(val[:, :, ::-1])), ref, net, progress=None)["fid"]
    swapped = fid.fid_from_images(_batches(_permute_palette(val)), ref, net, progress=None)["fid"]
    assert abs(same) < 1e-6 * np.trace(ref.stats.cov)
    assert swapped > 4 * mirrored and swapped > 0.1


def test_reference_cache_key_and_reuse(shapes, tmp_path):
    root, folder, _ = shapes
    net = fid.load_extractor("shapes", folder)
    val = np.load(root / "val" / "images.npy")
    protocol = ReferenceProtocol("shapes", "val", 200, 0, "none", "none", 32)
    ref = fid.compute_reference_stats(protocol, _batches(val), net, tmp_path, progress=None)
    assert ref.stats.n == 200 and ref.path.parent == tmp_path
    key = json.loads(ref.path.with_suffix(".json").read_text())["protocol"]
    assert key["weights_sha256"] == net.checksum and key["extractor"] == "shapes-v1" and key["n"] == 200

    def must_not_read():
        raise AssertionError("a cached reference must not read the images again")
        yield

    again = fid.compute_reference_stats(protocol, must_not_read(), net, tmp_path, progress=None)
    assert again.path == ref.path and np.array_equal(again.stats.outer, ref.stats.outer)
    for changed in (ReferenceProtocol("shapes", "val", 200, 1, "none", "none", 32),
                    ReferenceProtocol("shapes", "train", 200, 0, "none", "none", 32),
                    ReferenceProtocol("shapes", "val", 200, 0, "center", "bicubic", 32)):
        assert fid.reference_path(tmp_path, fid.reference_key(changed, net)) != ref.path
    # Canonical names: the CLI and run evaluation land on the same cache entry.
    assert fid.reference_protocol("coco", "val", 30000, 0, 256) == fid.reference_protocol("coco", "val2014", 30000,
                                                                                         0, 256)
    assert fid.reference_protocol("shapes", "val", 200, 0, 32) == protocol
    # Another copy of ShapesT2I (other seed) never shares statistics; the same content elsewhere does
    from harness.data.shapes import write_shapes

    for seed, name in ((0, "a"), (0, "b"), (1, "c")):
        write_shapes(tmp_path / name, seed=seed, n_train=4, n_val=2, progress=False)
    here = [fid.reference_protocol("shapes", "val", 200, 0, 32, path=tmp_path / name) for name in "abc"]
    assert here[0] == here[1] and here[0] != here[2] and here[0].source
    assert fid.reference_path(tmp_path, fid.reference_key(here[2], net)) != \
        fid.reference_path(tmp_path, fid.reference_key(here[0], net))
    assert fid.reference_protocol("coco", "train2014", 30000, 0, 256, path=tmp_path / "a").source == ""
    with pytest.raises(FluidbenchError, match="only 300 images"):
        fid.compute_reference_stats(ReferenceProtocol("shapes", "val", 400, 0, "none", "none", 32),
                                    _batches(val), net, tmp_path, progress=None)
    with pytest.raises(FluidbenchError, match="computed at 32x32"):
        big = torch.zeros(2, 3, 64, 64, dtype=torch.uint8)
        fid.fid_from_images([big], ref, net, progress=None)
    with pytest.raises(FluidbenchError, match="expected uint8"):
        fid.fid_from_images([big.float()], ref, net, progress=None)


def test_shapes_extractor_is_deterministic_and_checked(shapes, tmp_path):
    from eval.shapes_features import train_features

    root, folder, _ = shapes
    a = train_features(root, tmp_path / "a", steps=3, batch_size=8, width=8, feature_dim=16, progress=False)
    b = train_features(root, tmp_path / "b", steps=3, batch_size=8, width=8, feature_dim=16, progress=False)
    assert a["sha256"] == b["sha256"]
    c = train_features(root, tmp_path / "c", steps=3, batch_size=8, width=8, feature_dim=16, seed=1, progress=False)
    assert c["sha256"] != a["sha256"]
    (tmp_path / "a" / "model.pt").write_bytes((tmp_path / "c" / "model.pt").read_bytes())
    with pytest.raises(FluidbenchError, match="differs from its manifest"):
        fid.load_extractor("shapes", tmp_path / "a")
    with pytest.raises(FluidbenchError, match="train-features"):
        fid.load_extractor("shapes", tmp_path / "missing")


def _cli(argv: list[str]) -> None:
    from harness.cli import main

    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code in (0, None), f"fluidbench {' '.join(argv)} exited {e.value.code}"


def test_cli_fid_ref_and_fid_images(shapes, tmp_path, capsys):
    from PIL import Image

    root, folder, _ = shapes
    cache = tmp_path / "cache"
    _cli(["eval", "fid-ref", "--data", "shapes", "--path", str(root), "--split", "val",
          "--features", str(folder), "--cache", str(cache), "--device", "cpu"])
    stats_path = capsys.readouterr().out.split()[0]
    assert stats_path.endswith(".npz") and "shapes-val-nall-32px-shapes-v1" in stats_path
    # The val images themselves, written as GenEval-style PNG folders: FID ~ 0.
    val = np.load(root / "val" / "images.npy")
    for i, image in enumerate(val):
        (tmp_path / "imgs" / f"{i // 4:05d}" / "samples").mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(tmp_path / "imgs" / f"{i // 4:05d}" / "samples" / f"{i % 4}.png")
    _cli(["eval", "fid-images", "--images", str(tmp_path / "imgs"), "--ref", stats_path,
          "--features", str(folder), "--device", "cpu", "--out", str(tmp_path / "fid.json")])
    result = json.loads((tmp_path / "fid.json").read_text())
    assert result["n_images"] == 300 and abs(result["fid"]) < 1e-6
    assert result["reference_protocol"]["dataset"] == "shapes"


def test_cli_errors_are_one_line(tmp_path, capsys):
    from harness.cli import main

    with pytest.raises(SystemExit) as e:
        main(["eval", "fid-images", "--images", str(tmp_path), "--ref", str(tmp_path / "x.npz")])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "x.npz" in err and "\n" not in err
