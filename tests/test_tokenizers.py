"""Tokenizers: the contract at 32 px (ours) and 256 px (published formats, tiny random weights), loading from
every published format through load_tokenizer, and a short training run of each kind."""
from __future__ import annotations

import json
import re

import pytest
import torch

from variants.tokenizer_train import TokenizerTrainConfig, build_tokenizer, reconstruction_metrics, train_tokenizer
from variants.tokenizers import MAR_KL16_SCALE, KLTokenizer, VQTokenizer, load_tokenizer, save_tokenizer

TINY = dict(widths=(8, 16, 16), norm_groups=4, latent_channels=4, codebook_size=64)


def images(b: int, size: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(b, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


@pytest.mark.parametrize("kind", ["vq", "kl"])
def test_round_trip_shapes_at_32(kind):
    tok = build_tokenizer(TokenizerTrainConfig(kind=kind, **TINY))
    assert (tok.kind, tok.image_size, tok.grid, tok.seq_len) == (kind, 32, 8, 64)
    x = images(3, 32)
    tokens = tok.encode(x)
    if kind == "vq":
        assert tokens.shape == (3, 64) and tokens.dtype == torch.int64
        assert tok.vocab_size == 64 and tok.token_dim == 0
        assert 0 <= tokens.min() and tokens.max() < 64
    else:
        assert tokens.shape == (3, 64, 4) and tokens.dtype == torch.float32 and tok.token_dim == 4
        mean, std = tok.encode_moments(x)
        assert torch.equal(mean, tokens) and (std > 0).all()
        # the log-variance starts at -10: samples are not swamped by unit noise (variants/tokenizer_train.py)
        assert std.max() < 0.05
    out = tok.decode(tokens)
    assert out.shape == (3, 3, 32, 32) and out.min() >= -1 and out.max() <= 1
    with torch.no_grad():  # decode(encode(x)) is the autoencoder's own reconstruction (quantised for vq)
        ref = tok.model.decode(tok.model.encode(x).latents).sample if kind == "vq" else \
            tok.model.decode(tok.model.encode(x).latent_dist.mean).sample
    torch.testing.assert_close(out, ref.clamp(-1, 1), atol=1e-4, rtol=0)
    assert not any(p.requires_grad for p in tok.parameters())
    tok.train()
    assert not tok.training  # frozen even when a parent module switches to training mode


def test_contract_errors():
    vq = build_tokenizer(TokenizerTrainConfig(kind="vq", **TINY))
    with pytest.raises(ValueError, match="encode_moments"):
        vq.encode_moments(images(1, 32))
    with pytest.raises(ValueError, match=r"\(B, 3, 32, 32\)"):
        vq.encode(images(1, 16))
    with pytest.raises(ValueError, match=r"\(B, 64\)"):
        vq.decode(torch.zeros(1, 10, dtype=torch.long))


def test_kl_patch_grouping_is_mars_layout():
    cfg = TokenizerTrainConfig(kind="kl", grid=4, patch=2, **TINY)
    tok = build_tokenizer(cfg)
    assert (tok.grid, tok.seq_len, tok.token_dim) == (4, 16, 16)
    z = torch.arange(2 * 4 * 8 * 8, dtype=torch.float32).reshape(2, 4, 8, 8)
    tokens = tok.patchify(z)
    # token (h, w) holds z[:, c, 2h + i, 2w + j] in (c, i, j) order, MAR's patchify
    assert torch.equal(tokens[1, 1 * 4 + 2], z[1, :, 2:4, 4:6].reshape(-1))
    assert torch.equal(tok.unpatchify(tokens), z)


def test_our_folder_round_trip(tmp_path):
    tok = build_tokenizer(TokenizerTrainConfig(kind="kl", **TINY))
    tok.scale.fill_(2.0), tok.shift.fill_(0.5)
    tok._checksum = None
    save_tokenizer(tok, tmp_path / "tok")
    meta = json.loads((tmp_path / "tok" / "tokenizer.json").read_text())
    assert meta["kind"] == "kl" and meta["seq_len"] == 64 and meta["scale"] == [2.0] * 4
    assert (tmp_path / "tok" / "model" / "diffusion_pytorch_model.safetensors").is_file()
    back = load_tokenizer(tmp_path / "tok")
    assert isinstance(back, KLTokenizer) and back.checksum == tok.checksum
    x = images(2, 32)
    torch.testing.assert_close(back.encode(x), tok.encode(x))
    meta["checksum"] = "0" * 64
    (tmp_path / "tok" / "tokenizer.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="checksum"):
        load_tokenizer(tmp_path / "tok")


def test_missing_path_names_expected_files(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"does not exist.*tokenizer\.json.*kl16\.ckpt.*LTH14/mar"):
        load_tokenizer(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_tokenizer(tmp_path / "empty")


def test_sd_vae_folder_at_256(tmp_path):
    """An SD-VAE-shaped AutoencoderKL (f8, 4 channels) saved with save_pretrained: 2x2 grouping -> 256 x 16."""
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    model = AutoencoderKL(down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
                          block_out_channels=[8, 8, 8, 8], norm_num_groups=4, latent_channels=4,
                          scaling_factor=0.18215, shift_factor=0.1).eval()
    model.save_pretrained(tmp_path / "sd-vae")
    tok = load_tokenizer(tmp_path / "sd-vae")
    assert isinstance(tok, KLTokenizer)
    assert (tok.image_size, tok.patch, tok.grid, tok.seq_len, tok.token_dim) == (256, 2, 16, 256, 16)
    x = images(1, 256)
    tokens = tok.encode(x)
    assert tokens.shape == (1, 256, 16)
    with torch.no_grad():
        z = (model.encode(x).latent_dist.mean - 0.1) * 0.18215  # (1, 4, 32, 32)
        torch.testing.assert_close(tokens[0, 0], z[0, :, :2, :2].reshape(-1))  # first token: top-left 2x2
        ref = model.decode(tok.unpatchify(tokens) / 0.18215 + 0.1).sample.clamp(-1, 1)
    torch.testing.assert_close(tok.decode(tokens), ref)


def test_amused_vqmodel_folder_at_256(tmp_path):
    """An aMUSEd-shaped VQModel (f16, 8192 codes) saved with save_pretrained, read in [0, 1]."""
    from diffusers import VQModel

    torch.manual_seed(0)
    model = VQModel(down_block_types=["DownEncoderBlock2D"] * 5, up_block_types=["UpDecoderBlock2D"] * 5,
                    block_out_channels=[8] * 5, norm_num_groups=4, latent_channels=4, num_vq_embeddings=8192,
                    mid_block_add_attention=False, lookup_from_codebook=True).eval()
    model.save_pretrained(tmp_path / "amused" / "vqvae")
    tok = load_tokenizer(tmp_path / "amused")  # a pipeline folder: the vqvae/ subfolder is found
    assert isinstance(tok, VQTokenizer)
    assert (tok.image_size, tok.grid, tok.seq_len, tok.vocab_size, tok.pixel_range) == (256, 16, 256, 8192,
                                                                                        "zero_one")
    x = images(1, 256)
    codes = tok.encode(x)
    assert codes.shape == (1, 256)
    with torch.no_grad():
        h = model.encode((x + 1) / 2).latents
        ref_codes = model.quantize(h)[2][2].reshape(1, 256)
        ref = model.decode(h).sample * 2 - 1  # quantises h itself
    assert torch.equal(codes, ref_codes)
    torch.testing.assert_close(tok.decode(codes), ref.clamp(-1, 1), atol=1e-4, rtol=0)  # straight-through rounding


def _diffusers_to_ldm(sd: dict, levels: int) -> dict:
    """The inverse renaming, written independently of the loader: diffusers names -> MAR's models/vae.py names."""
    attn = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
    out = {}
    for key, value in sd.items():
        k = key
        m = re.match(r"(encoder|decoder)\.(down_blocks|up_blocks)\.(\d+)\.(resnets|attentions|downsamplers|"
                     r"upsamplers)\.(\d+)\.(.*)", k)
        if m:
            part, blocks, i, kind, j, rest = m.groups()
            i = int(i) if blocks == "down_blocks" else levels - 1 - int(i)
            stem = f"{part}.{'down' if blocks == 'down_blocks' else 'up'}.{i}"
            if kind == "resnets":
                k = f"{stem}.block.{j}.{rest.replace('conv_shortcut', 'nin_shortcut')}"
            elif kind == "attentions":
                name, _, param = rest.rpartition(".")
                k = f"{stem}.attn.{j}.{attn[name]}.{param}"
            else:
                k = f"{stem}.{'downsample' if kind == 'downsamplers' else 'upsample'}.{rest}"
        m = re.match(r"(encoder|decoder)\.mid_block\.(resnets|attentions)\.(\d+)\.(.*)", key)
        if m:
            part, kind, j, rest = m.groups()
            if kind == "resnets":
                k = f"{part}.mid.block_{int(j) + 1}.{rest}"
            else:
                name, _, param = rest.rpartition(".")
                k = f"{part}.mid.attn_1.{attn[name]}.{param}"
        k = k.replace("conv_norm_out", "norm_out")
        if ".attn" in k and value.ndim == 2:
            value = value[:, :, None, None]  # LDM's attention projections are 1x1 convs
        out[k] = value
    return out


def test_mar_kl16_ckpt(tmp_path):
    """MAR's KL-16 layout (f16, 16 channels, attention at the lowest encoder level) saved as an LDM .ckpt; read at
    128 px to keep the test fast (256 px gives 256 tokens, as the SD-VAE test checks)."""
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    model = AutoencoderKL(down_block_types=["DownEncoderBlock2D"] * 4 + ["AttnDownEncoderBlock2D"],
                          up_block_types=["UpDecoderBlock2D"] * 5, block_out_channels=[32] * 5,
                          layers_per_block=1, latent_channels=16, norm_num_groups=32).eval()
    with torch.no_grad():  # random biases everywhere, so a misplaced tensor cannot hide behind a zero
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    sd = _diffusers_to_ldm(model.state_dict(), levels=5)
    for key in ("encoder.down.4.attn.0.q.weight", "encoder.down.3.downsample.conv.weight",
                "decoder.up.0.block.1.conv1.weight", "decoder.up.4.upsample.conv.weight",
                "encoder.mid.attn_1.proj_out.weight", "decoder.mid.block_2.norm1.weight", "encoder.norm_out.bias"):
        assert key in sd, key
    sd["loss.logvar"] = torch.zeros(())  # LDM checkpoints carry their training loss; it must be ignored
    torch.save({"model": sd}, tmp_path / "kl16.ckpt")
    assert load_tokenizer(tmp_path / "kl16.ckpt").seq_len == 256  # the paper setting by default
    tok = load_tokenizer(tmp_path / "kl16.ckpt", image_size=128)
    assert (tok.kind, tok.seq_len, tok.token_dim, tok.grid) == ("kl", 64, 16, 8)
    assert torch.allclose(tok.scale, torch.full((16,), MAR_KL16_SCALE))
    for name, value in model.state_dict().items():
        torch.testing.assert_close(tok.model.state_dict()[name], value, msg=name)
    x = images(1, 128)
    tokens = tok.encode(x)
    with torch.no_grad():
        z = model.encode(x).latent_dist.mean * MAR_KL16_SCALE  # (1, 16, 8, 8)
    torch.testing.assert_close(tokens, z.flatten(2).transpose(1, 2))
    ref = model.decode(z / MAR_KL16_SCALE).sample.clamp(-1, 1)
    torch.testing.assert_close(tok.decode(tokens), ref, atol=1e-4, rtol=0)  # z / scale * scale rounding


def _shapes_like(n: int, seed: int = 0) -> torch.Tensor:
    """Flat squares on grey: enough structure for a few training steps to lower the loss."""
    g = torch.Generator().manual_seed(seed)
    out = torch.full((n, 3, 32, 32), 128, dtype=torch.uint8)
    for i in range(n):
        x, y = torch.randint(0, 22, (2,), generator=g).tolist()
        out[i, :, y:y + 10, x:x + 10] = torch.randint(0, 256, (3, 1, 1), generator=g, dtype=torch.uint8)
    return out


def test_vq_training_uses_the_codebook():
    cfg = TokenizerTrainConfig(kind="vq", steps=25, batch_size=8, restart_every=5, kmeans_iters=3, threads=1, **TINY)
    data = _shapes_like(64)
    tok, stats = train_tokenizer(cfg, data)
    assert stats["steps"] == 25 and tok.vocab_size == 64
    metrics, recs = reconstruction_metrics(tok, data)
    # diffusers' defaults collapse to one code; k-means init + restarts keep most of a small codebook alive
    assert metrics["codebook_usage"] > 0.3
    assert recs.shape == data.shape and recs.dtype == torch.uint8


@pytest.mark.parametrize("kind", ["vq", "kl"])
def test_training_is_a_function_of_the_config_and_seed(kind):
    """No clock in the default recipe: the same steps and seed give the same tokenizer, another seed another."""
    cfg = dict(kind=kind, steps=6, batch_size=4, restart_every=3, kmeans_iters=2, threads=1, **TINY)
    assert TokenizerTrainConfig(kind=kind).time_budget_s is None
    data = _shapes_like(32)
    (a, sa), (b, _), (c, _) = (train_tokenizer(TokenizerTrainConfig(**cfg, seed=s), data) for s in (0, 0, 1))
    assert sa["steps"] == 6 and not sa["over_budget"]
    assert a.checksum == b.checksum != c.checksum


def test_default_steps_per_kind():
    from variants.tokenizer_train import default_config

    assert (default_config("vq").steps, default_config("kl").steps) == (1800, 1900)
    assert default_config("vq", steps=7).steps == 7
    with pytest.raises(ValueError, match="steps"):
        TokenizerTrainConfig(kind="kl", steps=0)
    with pytest.raises(ValueError, match="time_budget_s"):
        TokenizerTrainConfig(kind="kl", time_budget_s=0)


def test_time_budget_stops_training_but_not_before_min_steps():
    cfg = TokenizerTrainConfig(kind="kl", steps=1000, min_steps=4, time_budget_s=1e-6, batch_size=2, threads=1, **TINY)
    _, stats = train_tokenizer(cfg, _shapes_like(8))
    assert stats["steps"] == 4 and stats["over_budget"]


def test_kl_training_lowers_loss_and_normalises_latents():
    cfg = TokenizerTrainConfig(kind="kl", steps=40, batch_size=8, lr=3e-3, threads=1, **TINY)
    data = _shapes_like(96)
    before, _ = reconstruction_metrics(build_tokenizer(cfg), data)
    tok, stats = train_tokenizer(cfg, data)
    after, _ = reconstruction_metrics(tok, data)
    assert after["psnr"] > before["psnr"] + 3
    z = tok.encode(data.float() / 127.5 - 1)  # (N, L, C): per-channel zero mean, unit std on the data
    assert z.mean(dim=(0, 1)).abs().max() < 0.05
    torch.testing.assert_close(z.std(dim=(0, 1)), torch.ones(4), atol=0.05, rtol=0)


def _cli(argv: list[str]) -> int:
    from harness.cli import main

    with pytest.raises(SystemExit) as e:
        main(argv)
    return e.value.code


def test_cli_train_and_eval(tmp_path, capsys):
    from harness.data.shapes import write_shapes

    write_shapes(tmp_path / "shapes", n_train=48, n_val=12, progress=False)
    data, out = str(tmp_path / "shapes"), str(tmp_path / "tok")
    assert 0 == _cli(["tokenizer", "train", "--kind", "vq", "--data", data, "--out", out, "--steps", "3",
                      "--codebook-size", "64"])
    metrics = json.loads((tmp_path / "tok" / "metrics.json").read_text())
    assert metrics["steps"] == 3 and metrics["kind"] == "vq" and metrics["seq_len"] == 64
    for key in ("psnr", "codebook_usage", "oracle_exact", "train_s", "train_cpu_s", "wall_s"):
        assert isinstance(metrics[key], float), key
    assert 0 <= metrics["oracle_exact"] <= 1 and 0 < metrics["codebook_usage"] <= 1
    tok = load_tokenizer(tmp_path / "tok")
    assert tok.checksum == metrics["checksum"] and tok.vocab_size == 64

    assert 0 == _cli(["tokenizer", "eval", "--tokenizer", out, "--data", data])
    report = json.loads((tmp_path / "tok" / "recon_eval.json").read_text())
    assert report["images"] == 12 and abs(report["psnr"] - metrics["psnr"]) < 1e-6  # the same val images
    assert '"psnr"' in capsys.readouterr().out

    assert 2 == _cli(["tokenizer", "eval", "--tokenizer", str(tmp_path / "missing"), "--data", data])
    assert "tokenizer.json" in capsys.readouterr().err


@pytest.mark.parametrize("load", [0.0, 50.0])
def test_default_threads_are_the_processs_never_the_machine_load(tmp_path, monkeypatch, load):
    """A sweep's tokenizer job trains with its worker's threads whatever else runs: the thread count decides how
    float sums round, and a load-dependent choice made two sweeps from clean results train other tokenizers."""
    from harness.data.shapes import write_shapes
    from harness.tokenizer_folder import TokenizerTrainOptions, train_tokenizer_folder

    write_shapes(tmp_path / "shapes", n_train=16, n_val=4, progress=False)
    monkeypatch.setattr("os.getloadavg", lambda: (load, load, load))
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        metrics = train_tokenizer_folder("kl", tmp_path / "shapes", tmp_path / "tok",
                                         TokenizerTrainOptions(steps=1, batch_size=2))
    finally:
        torch.set_num_threads(threads)
    assert metrics["threads"] == 2


def test_blank_fraction_trains_on_blank_images_and_measures_a_blank_reconstruction(tmp_path, capsys, monkeypatch):
    """`--blank-fraction F` makes every round(1/F)-th training image the data's background and nothing else (so
    the tokenizer sees "no object"); every tokenizer's metrics carry the PSNR of a blank image's reconstruction;
    a fraction outside [0, 1) is one line naming the flag, before any training."""
    import variants.tokenizer_train as trainer
    from harness.data.shapes import write_shapes

    write_shapes(tmp_path / "shapes", n_train=20, n_val=4, progress=False)
    background = json.loads((tmp_path / "shapes" / "manifest.json").read_text())["background"]
    seen, original = {}, trainer.train_tokenizer

    def spy(cfg, images, log=None):  # what the training loop is given
        seen["images"] = images.clone()
        return original(cfg, images, log=log)

    monkeypatch.setattr(trainer, "train_tokenizer", spy)
    data = str(tmp_path / "shapes")
    assert 0 == _cli(["tokenizer", "train", "--kind", "kl", "--data", data, "--out", str(tmp_path / "tok"),
                      "--steps", "2", "--batch-size", "2", "--blank-fraction", "0.25"])
    blank = torch.tensor(background, dtype=torch.uint8).view(3, 1, 1)
    is_blank = (seen["images"] == blank).flatten(1).all(1)
    assert is_blank.nonzero().flatten().tolist() == [0, 4, 8, 12, 16]  # every 4th from index 0, nothing else
    metrics = json.loads((tmp_path / "tok" / "metrics.json").read_text())
    assert isinstance(metrics["blank_psnr"], float)

    assert 2 == _cli(["tokenizer", "train", "--kind", "kl", "--data", data, "--out", str(tmp_path / "tok2"),
                      "--blank-fraction", "1"])
    assert "--blank-fraction" in capsys.readouterr().err and not (tmp_path / "tok2").exists()

    manifest = json.loads((tmp_path / "shapes" / "manifest.json").read_text())
    del manifest["background"]  # a data folder whose manifest lacks it: one line naming the file, nothing written
    (tmp_path / "shapes" / "manifest.json").write_text(json.dumps(manifest))
    assert 2 == _cli(["tokenizer", "train", "--kind", "kl", "--data", data, "--out", str(tmp_path / "tok3"),
                      "--steps", "1"])
    err = capsys.readouterr().err
    assert "manifest.json" in err and "'background'" in err and not (tmp_path / "tok3").exists()


@pytest.mark.parametrize("kind", ["vq", "kl"])
def test_a_local_tokenizer_token_depends_on_its_own_patch_only(kind, tmp_path):
    """local=True: changing one 4x4 patch changes its token alone (the decoder still sees the whole grid).
    A global tokenizer (the default) changes other tokens too: the test would fail without the patch batching."""
    x = images(2, 32)
    y = x.clone()
    y[:, :, 8:12, 20:24] = -x[:, :, 8:12, 20:24]  # the patch of token (2, 5) = position 21
    changed = {}
    for local in (True, False):
        tok = build_tokenizer(TokenizerTrainConfig(kind=kind, local=local, seed=3, **TINY))
        a, b = tok.encode(x), tok.encode(y)
        diff = (a != b) if kind == "vq" else (a - b).abs().amax(-1) > 1e-6
        changed[local] = set(diff.nonzero()[:, 1].tolist())
        if local:
            assert tok.decode(a).shape == (2, 3, 32, 32)
            save_tokenizer(tok, tmp_path / kind)
            back = load_tokenizer(tmp_path / kind)
            assert back.local and back.checksum == tok.checksum and "local" in tok.settings()
            assert torch.equal(back.encode(x), a)
    assert changed[True] <= {21} and len(changed[False] - {21}) > 0
    with pytest.raises(ValueError, match="patch must be 1"):
        TokenizerTrainConfig(kind="kl", grid=4, patch=2, local=True, **TINY)


def test_codebook_seeding_does_not_crowd_the_dominant_cluster():
    """k-means++ (D^2) seeding: with 90% of the vectors on one point (ShapesT2I's background), a codebook of 16
    puts one or two codes there and the rest on the other clusters; uniform seeding put ~14 there."""
    from variants.tokenizer_train import _kmeans, _restart_dead_codes

    g = torch.Generator().manual_seed(0)
    others = torch.randn(15, 4, generator=g) * 5 + 20
    vectors = torch.cat([torch.zeros(900, 4) + 0.01 * torch.randn(900, 4, generator=g),
                         others.repeat_interleave(7, 0) + 0.01 * torch.randn(105, 4, generator=g)])
    centres = _kmeans(vectors, 16, 3, g)
    assert int((centres.norm(dim=1) < 1).sum()) <= 2
    assert torch.cdist(others, centres).amin(1).max() < 1  # every other cluster has a code

    model = build_tokenizer(TokenizerTrainConfig(kind="vq", **{**TINY, "codebook_size": 16})).model
    with torch.no_grad():
        model.quantize.embedding.weight.zero_()
    usage = torch.zeros(16, dtype=torch.long)
    usage[0] = 900  # one live code on the dominant cluster; 15 dead ones to re-seed from the batch
    h = vectors.reshape(1, 5, 201, 4).permute(0, 3, 1, 2)  # (B, D, h, w) as the training loop passes it
    _restart_dead_codes(model, h, usage, g)
    reseeded = model.quantize.embedding.weight[1:]
    assert int((reseeded.norm(dim=1) < 1).sum()) == 0  # none lands on the cluster the live code already covers
