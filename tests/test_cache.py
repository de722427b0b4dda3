"""The token/text cache: built once, reused without calling the encoders, rebuilt when a setting changes."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from harness.cache import CachedSplit, cache_folder, cache_key, data_fingerprint, is_valid
from harness.data.shapes import ShapesDataset, write_shapes
from variants.text import load_text_encoder
from variants.tokenizer_train import TokenizerTrainConfig, build_tokenizer

TINY = dict(widths=(8, 16, 16), norm_groups=4, latent_channels=4, codebook_size=64)


class Counting:
    """Forwards everything to the wrapped encoder and counts the encode calls."""

    def __init__(self, inner):
        self.inner, self.calls = inner, 0

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def _count(self, fn):
        def wrapped(*args, **kwargs):
            self.calls += 1
            return fn(*args, **kwargs)
        return wrapped

    @property
    def encode(self):
        return self._count(self.inner.encode)

    @property
    def encode_moments(self):
        return self._count(self.inner.encode_moments)


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes")
    write_shapes(root, seed=0, n_train=40, n_val=10, progress=False)
    return root


@pytest.fixture(scope="module")
def minilm():
    return load_text_encoder("minilm", max_length=16)


@pytest.mark.parametrize("kind", ["vq", "kl"])
def test_cache_is_reused_and_matches_the_encoders(tmp_path, shapes, minilm, kind):
    data = ShapesDataset(shapes, "train")
    tok, text = Counting(build_tokenizer(TokenizerTrainConfig(kind=kind, **TINY))), Counting(minilm)
    fp = data_fingerprint(shapes)
    split = CachedSplit.ensure(tmp_path, fp, "train", data, tok, text, progress=False)
    assert tok.calls > 0 and text.calls > 0
    built = (tok.calls, text.calls)
    again = CachedSplit.ensure(tmp_path, fp, "train", data, tok, text, progress=False)
    assert (tok.calls, text.calls) == built  # served from disk: no encoder ran
    assert again.folder == split.folder and len(again) == 40

    batch = again.batch(torch.tensor([3, 0, 7]))
    images = torch.stack([data[i][0] for i in (3, 0, 7)]).float() / 127.5 - 1
    ref_text, ref_mask = minilm.encode([data[i][1] for i in (3, 0, 7)])
    assert torch.equal(batch["text_mask"], ref_mask)
    torch.testing.assert_close(batch["text"], ref_text, atol=0.02, rtol=0.01)  # stored as float16
    if kind == "vq":
        assert batch["tokens"].dtype == torch.int64 and torch.equal(batch["tokens"], tok.inner.encode(images))
    else:
        mean, std = tok.inner.encode_moments(images)
        torch.testing.assert_close(batch["tokens"], mean, atol=1e-2, rtol=1e-2)  # no generator: the mean
        g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
        s1, s2 = again.batch([3, 0, 7], g1)["tokens"], again.batch([3, 0, 7], g2)["tokens"]
        assert torch.equal(s1, s2) and not torch.equal(s1, batch["tokens"])
        noise = (s1 - batch["tokens"]) / std.clamp(min=1e-4)
        assert 0.5 < noise.std() < 1.5  # mean + std * eps, eps ~ N(0, 1)
        item = CachedSplit(again.folder, generator=torch.Generator().manual_seed(5))[3]
        assert item["tokens"].shape == (64, 4) and item["text"].shape == (16, 384)


def test_cache_is_rebuilt_when_a_setting_changes(tmp_path, shapes, minilm):
    data = ShapesDataset(shapes, "val")
    fp = data_fingerprint(shapes)
    tok = Counting(build_tokenizer(TokenizerTrainConfig(kind="vq", **TINY)))
    text = Counting(minilm)
    first = CachedSplit.ensure(tmp_path, fp, "val", data, tok, text, progress=False)
    calls = (tok.calls, text.calls)

    # a different text max_length: a new key, so the encoders run again
    short = Counting(load_text_encoder("minilm", max_length=8))
    second = CachedSplit.ensure(tmp_path, fp, "val", data, tok, short, progress=False)
    assert short.calls > 0 and tok.calls > calls[0] and second.folder != first.folder
    assert second.batch([0])["text"].shape == (1, 8, 384)

    # different tokenizer weights (another seed): rebuilt
    other = Counting(build_tokenizer(TokenizerTrainConfig(kind="vq", seed=1, **TINY)))
    CachedSplit.ensure(tmp_path, fp, "val", data, other, text, progress=False)
    assert other.calls > 0

    # a stale manifest in the expected folder (e.g. edited, or from an older format) is never reused
    key = cache_key(fp, "val", len(data), tok, text)
    manifest = json.loads((first.folder / "manifest.json").read_text())
    manifest["key"]["text"]["max_length"] = 99
    (first.folder / "manifest.json").write_text(json.dumps(manifest))
    assert not is_valid(cache_folder(tmp_path, key), key)
    before = tok.calls
    CachedSplit.ensure(tmp_path, fp, "val", data, tok, text, progress=False)
    assert tok.calls > before and is_valid(first.folder, key)

    # a truncated array is detected too
    np.save(first.folder / "tokens.npy", np.zeros((3, 64), np.int32))
    assert not is_valid(first.folder, key)


def test_open_from_run_config(tmp_path, shapes, minilm):
    from harness.config import RunConfig

    tok = build_tokenizer(TokenizerTrainConfig(kind="kl", **TINY))
    cfg = RunConfig.from_overrides({"data.path": str(shapes), "data.cache_dir": str(tmp_path / "c")})
    split = CachedSplit.open(cfg, "val", tok, minilm, progress=False)
    assert len(split) == 10 and split.kind == "kl" and split.token_dim == 4 and split.text_dim == 384
    assert split.folder.parent == tmp_path / "c" and split.folder.name.startswith("val-kl-")


def test_validation_from_another_data_set(tmp_path, shapes, minilm):
    """data.val_kind / val_path / val_n: validate on a sample of another data set (Fluid: COCO-2014 train)."""
    from harness.config import RunConfig

    other = tmp_path / "other"
    write_shapes(other, seed=1, n_train=12, n_val=2, progress=False)
    tok = build_tokenizer(TokenizerTrainConfig(kind="kl", **TINY))
    cfg = RunConfig.from_overrides({"data.path": str(shapes), "data.cache_dir": str(tmp_path / "c"),
                                    "data.val_path": str(other), "data.val_split": "train", "data.val_n": 7})
    split = CachedSplit.open(cfg, "val", tok, minilm, progress=False)
    expected = CachedSplit.ensure(tmp_path / "d", {"any": 1}, "train", ShapesDataset(other, "train", n=7), tok,
                                  minilm, progress=False)
    assert len(split) == 7
    for name in ("mean", "text", "text_mask"):
        assert np.array_equal(split.arrays[name], expected.arrays[name])
    assert len(CachedSplit.open(cfg, "train", tok, minilm, progress=False)) == 40  # training data unchanged
    # the whole split is another cache, never the 7-image one
    cfg.data.val_n = 0
    full = CachedSplit.open(cfg, "val", tok, minilm, progress=False)
    assert len(full) == 12 and full.folder != split.folder


def test_iterable_data_set_is_counted_then_cached(tmp_path, shapes, minilm):
    """Tar shards have no length: the cache counts them, then encodes them in order."""
    data = ShapesDataset(shapes, "val")

    class Shards(torch.utils.data.IterableDataset):
        def __iter__(self):
            return (data[i] for i in range(len(data)))

    tok = build_tokenizer(TokenizerTrainConfig(kind="vq", **TINY))
    split = CachedSplit.ensure(tmp_path, {"path": "shards-{000..001}.tar"}, "val", Shards(), tok, minilm,
                               progress=False)
    assert len(split) == 10 and split.manifest["key"]["n"] is None
    image, _ = data[9]
    assert torch.equal(split.batch([9])["tokens"][0], tok.encode(image[None].float() / 127.5 - 1)[0])
