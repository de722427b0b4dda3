"""The diffusion head's fast paths and solvers: the same numbers as the straightforward code (to float rounding),
DDIM and DPM-Solver++ step for step against diffusers' schedulers, and fewer steps on a model with known eps."""
from __future__ import annotations

import math

import pytest
import torch

from variants import rng
from variants.diffusion import SOLVERS, GaussianDiffusion, Solver
from variants.heads import DiffusionHead
from variants.registry import build_variant
from variants.variant import trim_text


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def perturbed_head(seed: int = 0, width: int = 32, token_dim: int = 8) -> DiffusionHead:
    """A head whose zero-initialised adaLN and output are not zero any more (as after training)."""
    torch.manual_seed(seed)
    head = DiffusionHead(width, token_dim, blocks=2)
    with torch.no_grad():
        for p in head.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return head


# ---- the fast paths equal the straightforward code ------------------------------------------------------------

def reference_ddpm(head: DiffusionHead, z: torch.Tensor, cfg_scale: float | None, steps: int, temperature: float,
                   generator: torch.Generator, x0_clip: float | None) -> torch.Tensor:
    """The head's DDPM sampler as written before the fast path: per step embed t, every block its own adaLN
    projection of SiLU(t + c), IDDPM's posterior from float32 tables."""
    net, d = head.net, head.diffusion
    c = net.cond_embed(z)
    n = z.shape[0] // 2 if cfg_scale is not None else z.shape[0]
    kept = d.timesteps(steps)
    ab = d.alphas_cumprod[kept]
    ab_prev = torch.cat([torch.ones(1, dtype=torch.float64), ab[:-1]])
    betas = 1 - ab / ab_prev
    var = betas * (1 - ab_prev) / (1 - ab)
    x = rng.normal((n, head.token_dim), generator, z.device)
    for i in reversed(range(len(kept))):
        t_emb = net.time_embed(torch.tensor([kept[i]]))
        rows = x if cfg_scale is None else torch.cat([x, x])
        y = t_emb + c
        h = net.input_proj(rows)
        for block in net.blocks:
            shift, scale, gate = block.ada(y).chunk(3, dim=-1)
            h = h + gate * block.mlp(block.norm(h) * (1 + scale) + shift)
        shift, scale = net.final_ada(y).chunk(2, dim=-1)
        eps = net.out(net.final_norm(h) * (1 + scale) + shift)
        if cfg_scale is not None:
            cond, uncond = eps.chunk(2)
            eps = uncond + cfg_scale * (cond - uncond)
        x0 = (1 / ab[i]).sqrt().float() * x - (1 / ab[i] - 1).sqrt().float() * eps
        if x0_clip is not None:
            x0 = x0.clamp(-x0_clip, x0_clip)
        mean = (betas[i] * ab_prev[i].sqrt() / (1 - ab[i])).float() * x0 \
            + ((1 - ab_prev[i]) * (1 - betas[i]).sqrt() / (1 - ab[i])).float() * x
        x = mean + var[i].sqrt().float() * temperature * rng.normal(tuple(x.shape), generator, x.device) if i else mean
    return x


@pytest.mark.parametrize("cfg_scale,x0_clip", [(None, None), (3.0, None), (3.0, 2.0)])
def test_fused_ddpm_sampler_equals_the_reference(cfg_scale, x0_clip):
    head = perturbed_head()
    z = torch.randn(6 if cfg_scale is None else 12, 32, generator=gen(1))
    with torch.no_grad():
        fast = head.sample(z, temperature=0.9, cfg_scale=cfg_scale, generator=gen(2), steps=12, x0_clip=x0_clip)
        ref = reference_ddpm(head, z, cfg_scale, 12, 0.9, gen(2), x0_clip)
    assert fast.abs().max() > 0.1  # the perturbed head moves the latents: the comparison has something to compare
    torch.testing.assert_close(fast, ref, rtol=1e-4, atol=1e-4 * float(ref.abs().max()))


def test_training_loss_and_grads_equal_the_per_row_embedding():
    """The timestep table (mN rows > 1000 timesteps) and cond_embed before the repeat change nothing."""
    head = perturbed_head(width=16, token_dim=4)
    head.batch_mul = 4
    head.skip_zero_weight_rows = False  # every row, as the reference (the skip: tests/test_variants.py)
    z = torch.randn(300, 16, generator=gen(3), requires_grad=True)
    target, weight = torch.randn(300, 4, generator=gen(4)), (torch.rand(300, generator=gen(5)) > 0.3).float()

    def reference() -> torch.Tensor:
        m, net = head.batch_mul, head.net
        c = net.cond_embed(z.repeat(m, 1))
        per_row = head.diffusion.training_loss(lambda x_t, t: net(x_t, net.time_embed(t), c),
                                               target.repeat(m, 1), gen(6))
        w = weight.repeat(m)
        return (per_row * w).sum() / w.sum()

    grads = []
    for loss_fn in (lambda: head.loss(z, target, weight, gen(6)), reference):
        head.zero_grad()
        z.grad = None
        loss = loss_fn()
        loss.backward()
        grads.append((loss.detach(), z.grad.clone(), [p.grad.clone() for p in head.parameters()]))
    (fast, gz, gp), (ref, rz, rp) = grads
    torch.testing.assert_close(fast, ref)
    torch.testing.assert_close(gz, rz)
    for a, b in zip(gp, rp):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_state_dict_keys_are_unchanged_by_the_fast_path():
    """Checkpoints written before the fast path load: no new persistent tensors, the same names."""
    keys = set(DiffusionHead(16, 4, blocks=2).state_dict())
    assert "net.blocks.0.ada.1.weight" in keys and "net.final_ada.1.weight" in keys
    assert not any("one" in k for k in keys)


@pytest.mark.parametrize("grid_bias", [0.0, 1.0])
def test_backbone_positions_text_kv_and_no_mask_equal_the_full_pass(grid_bias):
    torch.manual_seed(0)
    v = build_variant("kl-random", "cpu-xs", seq_len=16, vocab_size=8, token_dim=4, text_dim=12, grid_bias=grid_bias)
    bb = v.backbone
    x, text = torch.randn(3, 16, bb.width), torch.randn(3, 5, 12)
    full_mask = torch.ones(3, 5, dtype=torch.bool)
    with torch.no_grad():
        ctx, mask = bb.encode_text(text, full_mask)
        ref = bb(x, ctx, mask, causal=False)
        positions = torch.tensor([[0, 5], [15, 2], [7, 7]])
        fast = bb(x, ctx, None, causal=False, text_kv=bb.text_kv(ctx), positions=positions)
    torch.testing.assert_close(fast, ref.gather(1, positions[..., None].expand(-1, -1, bb.width)))


def test_trimming_padding_changes_no_sample():
    torch.manual_seed(0)
    v = build_variant("kl-random", "cpu-xs", seq_len=16, vocab_size=8, token_dim=4, text_dim=12, steps=4,
                      head_steps=4)
    text = torch.randn(3, 6, 12, generator=gen(1))
    mask = torch.zeros(3, 6, dtype=torch.bool)
    mask[0, :3], mask[1, :2] = True, True  # row 2 is empty: it samples from the null text
    padded_text = torch.cat([text, torch.randn(3, 4, 12)], dim=1)  # 4 more padded positions, random contents
    padded_mask = torch.cat([mask, torch.zeros(3, 4, dtype=torch.bool)], dim=1)
    trimmed, trimmed_mask, padding_left = trim_text(padded_text, padded_mask)
    assert trimmed.shape[1] == 3 and padding_left  # row 1 still has a padded position
    assert trim_text(text[:1], mask[:1])[2] is False  # one caption of 3 real tokens: no mask needed
    a = v.sample(text, mask, generator=gen(2))
    b = v.sample(padded_text, padded_mask, generator=gen(2))
    torch.testing.assert_close(a, b)


# ---- DDIM and DPM-Solver++ against diffusers ------------------------------------------------------------------

def fake_eps(x: torch.Tensor, t: int) -> torch.Tensor:
    """A smooth, timestep-dependent stand-in for a trained network's eps."""
    return torch.tanh(0.7 * x + 0.001 * t) + 0.1 * math.cos(t / 100)


def walk(ours: Solver, theirs, x: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Both solvers from the same x at every step, fed the same eps: (ours, diffusers') per step."""
    pairs = []
    for k, t in zip(reversed(range(len(ours.timesteps))), theirs.timesteps.tolist()):
        assert ours.timesteps[k] == t
        eps = fake_eps(x, t)
        mine = ours(k, x, eps)
        pairs.append((mine, theirs.step(eps, t, x).prev_sample))
        x = mine
    return pairs


@pytest.mark.parametrize("spacing,steps,x0_clip", [("leading", 20, None), ("trailing", 10, None),
                                                   ("leading", 25, 1.5)])
def test_ddim_matches_diffusers_step_for_step(spacing, steps, x0_clip):
    from diffusers import DDIMScheduler

    sched = DDIMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", clip_sample=x0_clip is not None,
                          clip_sample_range=x0_clip or 1.0, set_alpha_to_one=True, timestep_spacing=spacing,
                          prediction_type="epsilon")
    sched.set_timesteps(steps)
    ours = Solver("ddim", sched.alphas_cumprod.double(), sorted(sched.timesteps.tolist()), 1.0, x0_clip, None)
    for mine, theirs in walk(ours, sched, torch.randn(64, 4, generator=gen(0))):
        torch.testing.assert_close(mine, theirs, rtol=1e-4, atol=1e-4 * (1 + float(theirs.abs().max())))


@pytest.mark.parametrize("steps", [5, 12, 20])
def test_dpm_solver_pp_matches_diffusers_step_for_step(steps):
    from diffusers import DPMSolverMultistepScheduler

    sched = DPMSolverMultistepScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2",
                                        algorithm_type="dpmsolver++", solver_order=2, solver_type="midpoint",
                                        final_sigmas_type="zero", lower_order_final=True, prediction_type="epsilon")
    sched.set_timesteps(steps)
    d = GaussianDiffusion(1000)
    assert d.timesteps(steps, "dpm++") == sorted(sched.timesteps.tolist())  # its default ("linspace") spacing
    ours = Solver("dpm++", sched.alphas_cumprod.double(), d.timesteps(steps, "dpm++"), 1.0, None, None)
    pairs = walk(ours, sched, torch.randn(64, 4, generator=gen(0)))
    assert len(pairs) == steps
    for mine, theirs in pairs:
        torch.testing.assert_close(mine, theirs, rtol=1e-4, atol=1e-4 * (1 + float(theirs.abs().max())))


def test_dpm_solver_pp_honours_x0_clip():
    d = GaussianDiffusion(1000)
    x = torch.randn(64, 4, generator=gen(0))
    out = d.sample(lambda x, k: fake_eps(x, k) * 3, x, 10, 1.0, None, x0_clip=0.5, solver="dpm++")
    free = d.sample(lambda x, k: fake_eps(x, k) * 3, x, 10, 1.0, None, solver="dpm++")
    assert out.abs().max() <= 0.5 + 1e-6 < free.abs().max()  # the last step returns the clamped x0


# ---- fewer steps where eps is known exactly -------------------------------------------------------------------

def gaussian_eps(d: GaussianDiffusion, steps: int, s: float, solver: str):
    """The exact eps for data ~ N(0, s^2): E[eps | x_t] = sqrt(1 - ab) x_t / (ab s^2 + 1 - ab)."""
    ab = [float(d.alphas_cumprod[t]) for t in d.timesteps(steps, solver)]
    return lambda x, k: math.sqrt(1 - ab[k]) * x / (ab[k] * s * s + 1 - ab[k])


def spread(solver: str, steps: int, temperature: float = 1.0, s: float = 0.5) -> float:
    """Sampled std / data std for data ~ N(0, s^2) with the exact eps (1 = the data's spread)."""
    d = GaussianDiffusion(1000)
    noise = torch.randn(20000, 2, generator=gen(0))
    x = d.sample(gaussian_eps(d, steps, s, solver), noise, steps, temperature, gen(1), solver=solver)
    return float(x.std()) / s


def test_dpm_solver_pp_at_20_steps_is_closer_to_the_data_than_ddpm_at_100():
    """What the fast solver is for. Measured (std ratio): ddpm 0.762 / 0.867 / 0.970 at 10 / 20 / 100 steps
    (the fixed small variance shrinks samples); ddim 0.855 / 0.926 / 0.986; dpm++ 0.952 / 0.998 / 1.002."""
    ddpm, fast = spread("ddpm", 100), spread("dpm++", 20)
    assert abs(fast - 1) < 0.01 and abs(ddpm - 1) > 2 * abs(fast - 1), (ddpm, fast)
    assert abs(spread("ddim", 100) - 1) < 0.03 and spread("ddpm", 10) < spread("ddim", 10) < spread("dpm++", 10)


@pytest.mark.parametrize("solver", ["ddim", "dpm++"])
def test_temperature_scales_the_initial_noise_of_the_ode_solvers(solver):
    """Deterministic solvers: the temperature scales the only noise there is, the initial one; for Gaussian
    data the ODE is linear, so the samples' spread scales with it."""
    assert abs(spread(solver, 50, temperature=0.5) / spread(solver, 50) - 0.5) < 0.01


def test_head_solver_reaches_the_head_through_the_variant():
    torch.manual_seed(0)
    v = build_variant("kl-random", "cpu-xs", seq_len=16, vocab_size=8, token_dim=4, text_dim=12, steps=4,
                      head_steps=6)
    with torch.no_grad():
        for p in v.head.parameters():
            p.add_(0.1 * torch.randn_like(p))
    text, mask = torch.randn(2, 3, 12), torch.ones(2, 3, dtype=torch.bool)
    out = {k: v.sample(text, mask, generator=gen(1), head_solver=k, x0_clip=3.0) for k in SOLVERS}
    assert v.last_sample_stats["head_solver"] == "dpm++"
    assert not torch.allclose(out["ddpm"], out["dpm++"]) and not torch.allclose(out["ddim"], out["dpm++"])
    default = build_variant("kl-random", "cpu-xs", seq_len=16, vocab_size=8, token_dim=4, text_dim=12, steps=4,
                            head_steps=6, head_solver="ddim")
    default.load_state_dict(v.state_dict())
    torch.testing.assert_close(default.sample(text, mask, generator=gen(1), x0_clip=3.0), out["ddim"])
    with pytest.raises(ValueError, match="head_solver"):
        v.sample(text, mask, head_solver="euler")
    with pytest.raises(ValueError, match="head_solver"):
        build_variant("kl-random", "cpu-xs", seq_len=16, vocab_size=8, token_dim=4, text_dim=12, head_solver="x")
