"""The four variants: one contract suite parametrised over them, then the invariants of orders and heads."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from variants.diffusion import GaussianDiffusion, respaced_timesteps
from variants.heads import CategoricalHead, DiffusionHead
from variants.orders import reveal_schedule
from variants.registry import LADDERS, VARIANTS, build_variant

NAMES = list(VARIANTS)
B, L, T, D, V, C = 4, 16, 5, 24, 32, 4
TINY = dict(seq_len=L, vocab_size=V, token_dim=C, text_dim=D, steps=4, head_steps=4)


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def tiny(name: str, seed: int = 0, **options) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_variant(name, "cpu-xs", **(TINY | options))


def batch(variant, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    if variant.token_kind == "vq":
        tokens = torch.randint(0, V, (B, L), generator=g)
    else:
        tokens = torch.randn(B, L, C, generator=g)
    text = torch.randn(B, T, D, generator=g)
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[0, 2:] = False  # a padded caption
    return tokens, text, mask


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---- the contract, over all four ----------------------------------------------------------------------------

@pytest.mark.parametrize("name", NAMES)
def test_loss_is_a_finite_scalar(name):
    v = tiny(name)
    loss = v.loss(*batch(v), generator=gen())
    assert loss.dim() == 0 and torch.isfinite(loss)
    assert v.token_kind == name[:2] and v.name == name


@pytest.mark.parametrize("name", NAMES)
def test_gradients_reach_every_trainable_parameter(name):
    v = tiny(name, text_dropout=0.5)  # some captions dropped, so the null text is used
    with torch.no_grad():  # zero-initialised adaLN/output layers block gradients at step 0 by design
        for p in v.head.parameters():
            p.add_(0.02 * torch.randn_like(p))
    v.loss(*batch(v), generator=gen(1)).backward()  # seed 1: captions 1 and 2 of 4 dropped
    missing = [n for n, p in v.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("cfg_scale", [None, 1.0])
def test_sample_returns_the_tokenizer_layout(name, cfg_scale):
    v = tiny(name)
    _, text, mask = batch(v)
    tokens = v.sample(text, mask, cfg_scale=cfg_scale, generator=gen())
    if v.token_kind == "vq":
        assert tokens.shape == (B, L) and tokens.dtype == torch.int64
        assert tokens.min() >= 0 and tokens.max() < V
    else:
        assert tokens.shape == (B, L, C) and tokens.dtype == torch.float32 and torch.isfinite(tokens).all()
    stats = v.last_sample_stats
    assert stats["batch_doubled"] == (cfg_scale is None)  # the paper defaults are all guided
    assert stats["forward_passes"] == v.defaults["steps"] == (L if "raster" in name else 4)


@pytest.mark.parametrize("name", NAMES)
def test_same_generator_same_sample(name):
    v = tiny(name)
    _, text, mask = batch(v)
    a, b = (v.sample(text, mask, generator=gen(7)) for _ in range(2))
    c = v.sample(text, mask, generator=gen(8))
    assert torch.equal(a, b) and not torch.equal(a, c)


@pytest.mark.parametrize("name", NAMES)
def test_state_dict_round_trips(name, tmp_path):
    v = tiny(name, seed=0).eval()
    torch.save(v.state_dict(), tmp_path / "model.pt")
    w = build_variant(**v.config)  # the config rebuilds the same architecture (fresh weights)
    w.load_state_dict(torch.load(tmp_path / "model.pt", weights_only=True))
    w.eval()
    data = batch(v)
    assert torch.equal(v.loss(*data, generator=gen()), w.loss(*data, generator=gen()))
    assert torch.equal(v.sample(*data[1:], generator=gen()), w.sample(*data[1:], generator=gen()))


@pytest.mark.parametrize("name", NAMES)
def test_validation_loss_is_deterministic(name):
    v = tiny(name)
    data = batch(v)
    v.eval()
    assert torch.equal(v.loss(*data, generator=gen(1)), v.loss(*data, generator=gen(1)))
    if name != "vq-raster":  # the others draw orders, mask ratios, timesteps or noise from the generator
        assert not torch.equal(v.loss(*data, generator=gen(1)), v.loss(*data, generator=gen(2)))


class _NoHostSync(TorchDispatchMode):
    """Fails on the ops that make the host wait for the device: .item()/bool()/int() and data-dependent shapes."""
    SYNCING = {"_local_scalar_dense", "nonzero", "masked_select", "unique", "_unique2", "equal", "is_nonzero"}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.__name__.split(".")[0] in self.SYNCING:
            raise AssertionError(f"host synchronisation in the training step: {func}")
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("name", NAMES)
def test_training_step_has_no_host_sync(name):
    v = tiny(name, mask_ratio="cosine") if "random" in name else tiny(name)
    if v.token_kind == "kl":  # what an accelerator runs: only on a CPU are weight-0 rows dropped (a sync)
        v.head.skip_zero_weight_rows = False
    data = batch(v)
    with _NoHostSync():
        v.loss(*data, generator=gen()).backward()


@pytest.mark.parametrize("name", NAMES)
def test_bad_inputs_name_the_field(name):
    v = tiny(name)
    tokens, text, mask = batch(v)
    with pytest.raises(ValueError, match="tokens"):
        v.loss(tokens[:, :-1], text, mask)
    with pytest.raises(ValueError, match="text"):
        v.loss(tokens, text[..., :-1], mask)
    with pytest.raises(ValueError, match="text_mask"):
        v.sample(text, mask.float())
    with pytest.raises(ValueError, match="variant option 'nope'"):
        tiny(name, nope=1)


@pytest.mark.parametrize("name", NAMES)
def test_param_groups_and_accounting(name):
    v = tiny(name)
    counts = v.param_counts()
    assert counts["total"] == sum(p.numel() for p in v.parameters())
    assert counts["total"] == sum(counts[k] for k in ("backbone", "aligner", "head", "embeddings"))
    groups = v.param_groups(0.02)
    decayed = {id(p) for p in groups[0]["params"]}
    assert len(decayed) + len(groups[1]["params"]) == len(list(v.parameters()))
    named = dict(v.named_parameters())
    assert id(named["backbone.blocks.0.attn.qkv.weight"]) in decayed
    for n in ("backbone.blocks.0.attn.qkv.bias", "backbone.blocks.0.norm1.weight", "backbone.pos_embed",
              "backbone.null_text", "embed.weight"):
        assert id(named[n]) not in decayed, n
    assert any(id(p) in decayed for p in v.head.parameters()) == (v.token_kind == "vq")  # MAR: no decay in DiffLoss
    # FLOPs: at least 6 x (matmul weights) x tokens for the backbone; sampling passes as scheduled
    assert v.train_flops_per_image() > 6 * counts["backbone"] * L
    cost, plain = v.sampling_cost(), v.sampling_cost(cfg_scale=1.0)
    assert cost["forward_passes"] == plain["forward_passes"] == v.defaults["steps"]
    assert cost["forward_passes_per_image"] == 2 * plain["forward_passes_per_image"]
    assert cost["flops"] > plain["flops"]


# ---- raster order -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("grid_bias", [0.0, 1.0])
@pytest.mark.parametrize("name", ["vq-raster", "kl-raster"])
def test_raster_is_causal(name, grid_bias):
    v = tiny(name, grid_bias=grid_bias).eval()
    tokens, text, mask = batch(v)
    z, _ = v.outputs(tokens, text, mask)
    t = 6
    changed = tokens.clone()
    changed[:, t + 1] = (changed[:, t + 1] + 1) % V if v.token_kind == "vq" else changed[:, t + 1] + 1.0
    z2, _ = v.outputs(changed, text, mask)
    torch.testing.assert_close(z2[:, : t + 2], z[:, : t + 2], rtol=0, atol=1e-6)  # z_i sees tokens < i only
    assert not torch.allclose(z2[:, t + 2:], z[:, t + 2:])


@pytest.mark.parametrize("name,cfg_scale,grid_bias", [(n, c, 0.0) for n in ("vq-raster", "kl-raster")
                                                       for c in (None, 1.0)]
                         + [("vq-raster", 2.0, 1.0), ("kl-raster", 2.0, 1.0)])
def test_kv_cache_sampling_equals_full_recompute(name, cfg_scale, grid_bias):
    v = tiny(name, grid_bias=grid_bias).eval()
    _, text, mask = batch(v)
    cached = v.sample(text, mask, cfg_scale=cfg_scale, generator=gen(5))
    assert v.last_sample_stats["kv_cache"] and v.last_sample_stats["forward_passes"] == L
    full = v.sample(text, mask, cfg_scale=cfg_scale, generator=gen(5), kv_cache=False)
    if v.token_kind == "vq":
        assert torch.equal(cached, full)
    else:
        torch.testing.assert_close(cached, full, rtol=0, atol=1e-5)


def test_raster_always_takes_seq_len_steps():
    v = tiny("vq-raster")
    v.sample(*batch(v)[1:], steps=4, generator=gen())  # one sampling setting serves all four variants
    assert v.last_sample_stats["steps"] == v.last_sample_stats["forward_passes"] == L
    assert v.sampling_cost(steps=4)["forward_passes"] == L


# ---- random order -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("seq_len,steps", [(16, 1), (16, 4), (16, 16), (64, 8), (64, 64), (256, 64), (7, 5)])
def test_reveal_schedule(seq_len, steps):
    counts = reveal_schedule(seq_len, steps)
    assert len(counts) == steps and sum(counts) == seq_len and min(counts) >= 1
    if steps <= seq_len // 4:  # far from one token per step: exactly MAR's recurrence (models/mar.py)
        masked, mar = seq_len, []
        for k in range(steps - 1):
            masked = max(1, min(masked - 1, math.floor(seq_len * math.cos(math.pi / 2 * (k + 1) / steps))))
            mar.append(masked)
        assert [seq_len - sum(counts[: k + 1]) for k in range(steps)] == mar + [0]
    with pytest.raises(ValueError, match="steps"):
        reveal_schedule(seq_len, seq_len + 1)


@pytest.mark.parametrize("name", ["vq-random", "kl-random"])
@pytest.mark.parametrize("steps", [1, 3, L])
def test_random_order_reveals_every_token_once(name, steps):
    v = tiny(name).eval()
    _, text, mask = batch(v)
    v.sample(text, mask, steps=steps, generator=gen())
    stats = v.last_sample_stats
    assert stats["forward_passes"] == stats["head_calls"] == steps
    assert stats["forward_passes_per_image"] == 2 * steps  # guided by default: doubled batch
    assert stats["revealed_per_step"] == reveal_schedule(L, steps)
    assert torch.equal(stats["reveal_counts"], torch.ones(B, L, dtype=torch.int64))


@pytest.mark.parametrize("steps", [1, 3, L])
def test_confidence_reveal_writes_every_position_once(steps):
    v = tiny("vq-random").eval()
    _, text, mask = batch(v)
    tokens = v.sample(text, mask, steps=steps, reveal="confidence", generator=gen())
    stats = v.last_sample_stats
    assert stats["reveal"] == "confidence" and stats["forward_passes"] == steps
    assert stats["revealed_per_step"] == reveal_schedule(L, steps)
    assert torch.equal(stats["reveal_counts"], torch.ones(B, L, dtype=torch.int64))
    assert tokens.shape == (B, L) and 0 <= tokens.min() and tokens.max() < V
    # the default stays MAR's random order, draw for draw
    assert torch.equal(v.sample(text, mask, steps=3, generator=gen()),
                       v.sample(text, mask, steps=3, reveal="random", generator=gen()))


def test_confidence_reveal_keeps_the_most_probable_masked_codes():
    """With the choice noise annealed away, a step writes the n masked positions whose drawn codes are most
    probable, and never a known one (MaskGIT's rule, recomputed here from the same draws)."""
    v = tiny("vq-random").eval()
    _, text, mask = batch(v)
    ctx, ctx_mask = v.backbone.encode_text(text, mask)
    known = torch.zeros(B, L, dtype=torch.bool)
    known[:, ::3] = True  # the positions a most-probable pick would otherwise often take are known
    tokens = torch.randint(0, V, (B, L), generator=gen(1))
    x = torch.where(known[..., None], v.embed(tokens), v.order.mask_token)
    with torch.no_grad():
        out, idx = v.order._confident(v, x, ctx, ctx_mask, v.backbone.text_kv(ctx), tokens, known, 3, None, 1.0,
                                      0.0, gen(2))
        z = v.backbone(x, ctx, ctx_mask, causal=False)
        codes, logp = v.head.sample_scored(z.flatten(0, 1), temperature=1.0, generator=gen(2))
    expected = logp.view(B, L).masked_fill(known, float("-inf")).topk(3, dim=1).indices
    assert torch.equal(idx.sort(1).values, expected.sort(1).values) and not known.gather(1, idx).any()
    assert torch.equal(out.gather(1, idx), codes.view(B, L).gather(1, idx))
    untouched = torch.ones(B, L, dtype=torch.bool).scatter(1, idx, False)
    assert torch.equal(out[untouched], tokens[untouched])


def test_sample_scored_is_the_drawn_codes_log_probability():
    head = CategoricalHead(8, V)
    z = torch.randn(6, 8)
    codes, logp = head.sample_scored(z, temperature=0.5, generator=gen())
    assert torch.equal(codes, head.sample(z, temperature=0.5, generator=gen()))
    assert torch.allclose(logp, (head.proj(z) / 0.5).log_softmax(-1).gather(1, codes[:, None])[:, 0])


def test_confidence_reveal_needs_codes():
    with pytest.raises(ValueError, match="reveal"):
        tiny("kl-random", reveal="confidence")
    v = tiny("kl-random").eval()
    _, text, mask = batch(v)
    with pytest.raises(ValueError, match="confidence"):
        v.sample(text, mask, reveal="confidence", generator=gen())
    with pytest.raises(ValueError, match="reveal"):
        tiny("vq-random").sample(text, mask, reveal="sideways")


@pytest.mark.parametrize("mask_ratio", ["truncnorm", "cosine"])
def test_masking_ratio(mask_ratio):
    order = tiny("vq-random", mask_ratio=mask_ratio).order
    n = torch.cat([order.masked_counts(8, gen(s), torch.device("cpu")).flatten() for s in range(50)])
    assert n.min() >= 1 and n.max() <= L
    if mask_ratio == "truncnorm":  # MAR: ratio in [0.7, 1.0], one per batch
        assert n.min() >= math.ceil(0.7 * L) and order.masked_counts(8, gen(), "cpu").shape == (1, 1)
    else:  # MaskGIT: cos(pi/2 u) per sample, so small ratios happen too
        assert n.min() < 0.5 * L and order.masked_counts(8, gen(), "cpu").shape == (8, 1)


def test_truncated_gaussian_matches_mar():
    from scipy import stats

    from variants.orders import RandomOrder

    order = RandomOrder(8, 100_000)  # long sequence: count / L ~ the ratio itself
    ratios = torch.cat([order.masked_counts(1, gen(s), "cpu").flatten() for s in range(2000)]).double() / 100_000
    mar = stats.truncnorm((0.7 - 1.0) / 0.25, 0, loc=1.0, scale=0.25)  # MAR's models/mar.py
    assert abs(ratios.mean().item() - mar.mean()) < 0.005 and abs(ratios.std().item() - mar.std()) < 0.005


@pytest.mark.parametrize("mask_ratio", ["truncnorm", "cosine"])
def test_validation_masks_each_sample_at_a_fixed_quantile(mask_ratio):
    from scipy import stats

    from variants.orders import RandomOrder

    order = RandomOrder(8, 100_000, mask_ratio=mask_ratio)  # long sequence: count / L ~ the ratio itself
    a = order.masked_counts(1000, gen(1), "cpu", validation=True)
    assert a.shape == (1000, 1) and torch.equal(a, order.masked_counts(1000, gen(2), "cpu", validation=True))
    step = a.diff(dim=0)  # the grid in order: sample b at the (b + 1/2) / B quantile (cos(pi/2 u) falls in u)
    assert bool((step >= 0).all() if mask_ratio == "truncnorm" else (step <= 0).all())
    ratios = a.double() / 100_000
    if mask_ratio == "truncnorm":
        mar = stats.truncnorm((0.7 - 1.0) / 0.25, 0, loc=1.0, scale=0.25)  # the training distribution
        assert abs(ratios.mean().item() - mar.mean()) < 0.001 and abs(ratios.std().item() - mar.std()) < 0.002
        assert ratios.min() >= 0.7 and ratios.max() <= 1.0
    else:
        assert abs(ratios.mean().item() - 2 / math.pi) < 0.001  # E cos(pi/2 u) for u ~ U[0, 1)


def test_validation_weighs_every_mask_ratio_equally():
    """Under the truncated Gaussian every training batch's ratio counts once; validation's per-sample ratios
    weigh 1 / n_masked per masked position so that each sample (each ratio) counts once too."""
    v = tiny("vq-random").eval()
    tokens, text, mask = batch(v)
    _, weight = v.outputs(tokens, text, mask, gen(4), validation=True)
    masked = weight > 0
    assert masked.sum(1).unique().numel() > 1  # ratios differ per sample
    torch.testing.assert_close(weight.sum(1), torch.full((B,), float(L)))


def _learn_constant_images(name: str, steps: int = 60) -> tuple[torch.nn.Module, tuple]:
    """A tiny random-order variant trained on images whose tokens all repeat one value: its loss falls steeply
    with the share of tokens revealed, so the mask ratio and timesteps drawn move it."""
    v = tiny(name, text_dropout=0.0)
    g = torch.Generator().manual_seed(0)
    n = 32
    if v.token_kind == "vq":
        tokens = torch.randint(0, V, (n, 1), generator=g).expand(n, L).contiguous()
    else:
        tokens = torch.randn(n, 1, C, generator=g).expand(n, L, C).contiguous()
    data = (tokens, torch.randn(n, T, D, generator=g), torch.ones(n, T, dtype=torch.bool))
    opt = torch.optim.AdamW(v.param_groups(0.0), lr=3e-3)
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        v.loss(*data, generator=g).backward()
        opt.step()
    return v.eval(), data


def test_validation_masks_cut_the_seed_to_seed_spread():
    """The mask ratio drawn is what moves a random-order loss most; the diffusion head's timesteps: below."""
    v, data = _learn_constant_images("vq-random")
    with torch.no_grad():
        spread = {mode: torch.stack([v.loss(*data, generator=gen(s), validation=mode) for s in range(16)]).std()
                  for mode in (False, True)}
        again = [v.loss(*data, generator=gen(3), validation=True) for _ in range(2)]
    assert torch.equal(*again)
    assert spread[True] < 0.5 * spread[False], spread


def test_stratified_timesteps_cover_the_schedule_and_cut_the_spread():
    head, data, z = _briefly_trained_head()
    with torch.no_grad():
        spread = {mode: torch.stack([head.loss(z, data, generator=gen(s), validation=mode) for s in range(16)]).std()
                  for mode in (False, True)}
    assert spread[True] < 0.5 * spread[False], spread
    seen = []
    original = head.diffusion.training_loss
    head.diffusion.training_loss = lambda net, x0, g, t=None: seen.append(t) or original(net, x0, g, t=t)
    with torch.no_grad():
        head.loss(z, data, generator=gen(0), validation=True)
    counts = torch.bincount(seen[0] // 250, minlength=4)  # 4 x 256 rows over 1000 steps: 256 per quarter
    assert seen[0].shape == (4 * 256,) and counts.tolist() == [256] * 4


def test_random_order_loss_only_on_masked_positions():
    v = tiny("vq-random").eval()
    tokens, text, mask = batch(v)
    _, weight = v.outputs(tokens, text, mask, gen(4))
    assert weight.sum(1).unique().numel() == 1  # truncnorm: one count per batch
    assert math.ceil(0.7 * L) <= weight[0].sum() <= L


# ---- heads and diffusion ------------------------------------------------------------------------------------

@pytest.mark.parametrize("head", [CategoricalHead(8, V), DiffusionHead(8, C, blocks=1)])
def test_guidance_scale_one_equals_the_conditional_branch(head):
    with torch.no_grad():
        for p in head.parameters():
            p.add_(0.1 * torch.randn_like(p))
        z_cond, z_null = torch.randn(6, 8), torch.randn(6, 8)
        plain = head.sample(z_cond, temperature=1.0, generator=gen(2), steps=5)
        guided = head.sample(torch.cat([z_cond, z_null]), temperature=1.0, cfg_scale=1.0, generator=gen(2), steps=5)
        other = head.sample(torch.cat([z_cond, z_null]), temperature=1.0, cfg_scale=4.0, generator=gen(2), steps=5)
    torch.testing.assert_close(guided, plain, rtol=1e-5, atol=1e-5)  # random weights: latents reach ~1e4
    assert not torch.allclose(other.float(), plain.float())


def test_diffusion_loss_computes_only_rows_of_nonzero_weight():
    head = DiffusionHead(8, C, blocks=1, batch_mul=3)
    with torch.no_grad():  # off the zero init, so gradients reach z
        for p in head.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=gen(1)))
    z, target = torch.randn(10, 8, requires_grad=True), torch.randn(10, C)
    weight = torch.tensor([1.0, 0, 0, 1, 1, 0, 1, 0, 0, 1])
    rows = []
    head.net.input_proj.register_forward_hook(lambda m, i, o: rows.append(i[0].shape[0]))
    loss = head.loss(z, target, weight, gen(3))
    loss.backward()
    assert rows == [3 * 5]  # batch_mul copies of the 5 weighted rows only
    assert torch.equal(z.grad[weight == 0], torch.zeros(5, 8)) and z.grad[weight > 0].abs().sum() > 0
    keep = weight > 0  # the same loss as the weighted rows alone, with the same draws
    assert torch.equal(loss, head.loss(z[keep], target[keep], None, gen(3)))
    head.skip_zero_weight_rows = False  # every row runs (the accelerator path): the same mean, other draws
    full = head.loss(z, target, weight, gen(3))
    assert rows[-1] == 3 * 10 and torch.isfinite(full) and not torch.equal(full, loss)


def test_diffusion_schedule_matches_iddpm():
    from diffusers import DDPMScheduler  # same cosine betas, without temperature

    d = GaussianDiffusion(1000)
    ref = DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2").betas.double()
    torch.testing.assert_close(d.betas, ref, rtol=1e-5, atol=1e-7)
    kept = respaced_timesteps(1000, 100)
    assert len(kept) == 100 and kept[0] == 0 and kept[-1] == 999
    # temperature 0 with eps = 0 is deterministic: x shrinks along the posterior means only
    x = d.sample(lambda x, t: torch.zeros_like(x), torch.ones(3, 2), 10, 0.0, gen())
    assert torch.isfinite(x).all() and torch.equal(x[0], x[1])


def _briefly_trained_head() -> tuple[DiffusionHead, torch.Tensor, torch.Tensor]:
    """A diffusion head after 60 steps on unit-variance targets: eps is still wrong at t ~ T."""
    torch.manual_seed(0)
    head, data, z = DiffusionHead(32, 16, blocks=2), torch.randn(256, 16), torch.randn(256, 32)
    opt = torch.optim.AdamW(head.parameters(), lr=1e-3)
    g = gen(0)
    for _ in range(60):
        loss = head.loss(z, data, generator=g)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return head, data, z


@pytest.mark.parametrize("cfg_scale", [None, 3.0])
def test_x0_clip_keeps_a_briefly_trained_head_in_distribution(cfg_scale):
    head, data, z = _briefly_trained_head()
    rows = z if cfg_scale is None else torch.cat([z, torch.randn_like(z)])
    with torch.no_grad():
        free = head.sample(rows, temperature=1.0, cfg_scale=cfg_scale, generator=gen(1), steps=20)
        clipped = head.sample(rows, temperature=1.0, cfg_scale=cfg_scale, generator=gen(1), steps=20, x0_clip=3.0)
    assert free.std() > 10 * data.std()  # MAR's unclipped path diverges on such a head (the pitfall is real)
    assert clipped.abs().max() <= 3.0 + 1e-4  # the last step returns the clamped x0's posterior mean
    assert abs(clipped.std() / data.std() - 1) < 0.25  # and the latents look like the data's


def test_x0_clip_reaches_the_head_through_the_variant():
    v = tiny("kl-random")
    with torch.no_grad():
        for p in v.head.parameters():
            p.add_(0.5 * torch.randn_like(p))  # a head far from trained: unclipped latents leave any bound
    text, mask = batch(v)[1:]
    free = v.sample(text, mask, generator=gen(3))
    clipped = v.sample(text, mask, generator=gen(3), x0_clip=1.5)
    assert free.abs().max() > 1.5 and clipped.abs().max() <= 1.5 + 1e-4
    assert v.last_sample_stats["x0_clip"] == 1.5
    default = tiny("kl-random", x0_clip=1.5)
    default.load_state_dict(v.state_dict())
    torch.testing.assert_close(default.sample(text, mask, generator=gen(3)), clipped)  # the variant's default
    with pytest.raises(ValueError, match="x0_clip"):
        v.sample(text, mask, x0_clip=0.0)


# ---- overfitting one batch of ShapesT2I -----------------------------------------------------------------------

@pytest.fixture(scope="module")
def shapes_tokens():
    """8 ShapesT2I images through freshly initialised small VQ and KL tokenizers, and one caption code each."""
    from harness.data.shapes import generate_split
    from variants.tokenizer_train import TokenizerTrainConfig, build_tokenizer

    images, _ = generate_split(8, np.random.default_rng(0))
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1
    out = {}
    for kind in ("vq", "kl"):
        tok = build_tokenizer(TokenizerTrainConfig(kind=kind, widths=(8, 16, 16), norm_groups=4, latent_channels=4,
                                                   codebook_size=64))
        out[kind] = (tok.encode(x), tok.vocab_size, tok.token_dim)
    g = gen(0)
    out["text"] = (torch.randn(8, 6, D, generator=g), torch.ones(8, 6, dtype=torch.bool))  # stand-in captions
    return out


@pytest.mark.parametrize("name", NAMES)
def test_overfits_one_batch_of_shapes(name, shapes_tokens):
    tokens, vocab, dim = shapes_tokens[name[:2]]
    text, mask = shapes_tokens["text"]
    torch.manual_seed(0)
    v = build_variant(name, "cpu-xs", seq_len=tokens.shape[1], vocab_size=vocab, token_dim=dim, text_dim=D,
                      text_dropout=0.0)
    opt = torch.optim.AdamW(v.param_groups(0.0), lr=3e-3, betas=(0.9, 0.95))

    def val_loss() -> float:
        v.eval()
        with torch.no_grad():
            loss = v.loss(tokens, text, mask, generator=gen(123)).item()
        v.train()
        return loss

    before = val_loss()
    g = gen(1)
    for _ in range(STEPS):
        opt.zero_grad(set_to_none=True)
        v.loss(tokens, text, mask, generator=g).backward()
        opt.step()
    after = val_loss()
    assert after <= 0.5 * before, (before, after)


STEPS = 40  # measured: loss ratios 0.26 (vq-raster), 0.40 (vq-random), 0.14 (kl-raster), 0.14 (kl-random)


# ---- ladders and the CLI --------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def variants_json():
    from typer.testing import CliRunner

    from harness.cli import app

    result = CliRunner().invoke(app, ["variants", "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_paper_ladder_counts_fit_their_names(variants_json):
    assert variants_json["variants"] == NAMES
    paper = variants_json["ladders"]["paper"]
    assert [(r["name"], r["blocks"], r["width"], r["heads"]) for r in paper] == [
        ("166M", 12, 768, 12), ("369M", 16, 1024, 16), ("665M", 20, 1280, 16), ("1.1B", 24, 1536, 16),
        ("3.1B", 32, 2304, 24), ("10.5B", 34, 4096, 64)]
    for rung in paper:
        nominal = float(rung["name"][:-1]) * (1e9 if rung["name"].endswith("B") else 1e6)
        for name in ("kl-raster", "kl-random"):
            assert abs(rung["params"][name] / nominal - 1) < 0.10, (rung["name"], name, rung["params"][name])
        assert set(rung) == {"name", "blocks", "width", "heads", "params"} and set(rung["params"]) == set(NAMES)


def test_cpu_ladder_spans_ten_x(variants_json):
    cpu = variants_json["ladders"]["cpu"]
    assert len(cpu) >= 3 and [r["name"] for r in cpu] == [r.name for r in LADDERS["cpu"]]
    for name in NAMES:
        counts = [r["params"][name] for r in cpu]
        assert counts == sorted(counts) and counts[-1] >= 10 * counts[0]
    assert torch.nn.init.uniform_ is _UNIFORM  # empty_weights() undid its patch


_UNIFORM = torch.nn.init.uniform_


def test_ladder_counts_match_a_real_build():
    """The meta-device counts (initialisers skipped) equal those of a real, allocated model."""
    from variants.registry import LADDER_SHAPES, ladder_table

    shapes = {k: v for k, v in LADDER_SHAPES["cpu"].items() if k != "text_len"}
    real = build_variant("kl-random", "cpu-xs", **shapes)
    counted = next(r for r in ladder_table("cpu") if r["name"] == "cpu-xs")
    assert counted["params"]["kl-random"] == sum(p.numel() for p in real.parameters())


# ---- the grid bias (model.options.grid_bias) ------------------------------------------------------------------

def test_grid_bias_is_minus_slope_times_the_distance_on_the_grid():
    from variants.backbone import grid_bias
    b = grid_bias(16, 3, 2.0)  # a 4 x 4 grid
    assert b.shape == (3, 16, 16)
    torch.testing.assert_close(b, b.transpose(1, 2))
    assert b.diagonal(dim1=1, dim2=2).abs().max() == 0
    assert b[0, 0, 1] == -2.0 and b[0, 0, 4] == -2.0  # right and below: distance 1
    torch.testing.assert_close(b[0, 0, 5], torch.tensor(-2.0 * 2 ** 0.5))  # diagonal
    torch.testing.assert_close(b[0, 0, 15], torch.tensor(-2.0 * 18 ** 0.5))
    torch.testing.assert_close(b[1], b[0] / 2)
    torch.testing.assert_close(b[2], b[0] / 4)
    with pytest.raises(ValueError, match="square token grid"):
        tiny("vq-random", seq_len=12, grid_bias=1.0)
    for bad in (-1.0, "1"):
        with pytest.raises(ValueError, match="grid_bias must be a number >= 0"):
            tiny("vq-random", grid_bias=bad)


@pytest.mark.parametrize("name", NAMES)
def test_grid_bias_changes_the_outputs_but_not_the_state_dict(name):
    plain, biased = tiny(name), tiny(name, grid_bias=1.0)
    assert plain.state_dict().keys() == biased.state_dict().keys()  # fixed: checkpoints carry no bias
    biased.load_state_dict(plain.state_dict())
    tokens, text, mask = batch(plain)
    z, _ = plain.outputs(tokens, text, mask, generator=gen(1))
    zb, _ = biased.outputs(tokens, text, mask, generator=gen(1))
    assert (z - zb).abs().max() > 1e-3
