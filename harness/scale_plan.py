"""The scale plan of a sweep on paper: GPU-hours, memory per GPU and parallelism per training run.

Compute comes from the variants' own FLOP accounting (`Variant.train_flops_per_image`, `sampling_cost`; the
models are built on the meta device, so 10.5B costs nothing) times batch x steps, at an assumed model FLOPs
utilisation of the GPU's dense bf16 peak (spec `cluster`). Memory per GPU is an estimate:
- training state: fp32 weights 4 + gradients 4 + AdamW moments 8 + EMA 4 = 20 bytes per parameter, divided by
  the number of GPUs under FSDP2 (DDP keeps a full copy on every GPU);
- activations per image (bf16, fused attention so no L x L scores kept): about 46 x L x width bytes per block
  (Korthikanti et al. 2022 give 34 sbh for self-attention + MLP; cross-attention adds ~12), 34 x T x width per
  aligner block, ~16 x width bytes per diffusion-head block for each of the L x diffusion_batch_mul token
  copies, and fp32 logits x 2 for a categorical head; activation checkpointing keeps only block inputs;
- the frozen text encoder in bf16 when it runs online (T5-XXL's encoder: ~4.76B parameters, 9.5 GB, and
  ~1.2 TFLOPs per caption; pre-encoding the captions, as MAR pre-encodes latents, removes both).
"""
from __future__ import annotations

from dataclasses import dataclass

from eval.metrics import METRICS
from harness.config import RunConfig
from harness.plan import run_config_values
from harness.spec import Spec

STATE_BYTES_PER_PARAM = 20


@dataclass
class RunPlan:
    """What one training run of a sweep costs on the spec's cluster."""

    variant: str
    size: str
    params: float
    train_flops: float           # batch x steps x train_flops_per_image
    gpus: int
    strategy: str
    activation_checkpointing: bool
    gpu_hours: float             # training, at the assumed MFU
    text_gpu_hours: float        # of which the frozen text encoder run online
    wall_days: float             # gpu_hours / gpus / 24
    mem_state_gb: float          # per GPU
    mem_act_gb: float            # per GPU, at batch / gpus images
    mem_total_gb: float
    eval_gpu_hours: float        # sampling for FID, GenEval and CLIP score at the assumed sampling MFU
    budget: float | None = None  # an IsoFLOP cell's budget (harness/isoflop.py): its steps spend it
    seed: int = 0                # a further seed of the same run (`extra_runs: seeds`) costs as much again


def _activation_bytes(variant, checkpointing: bool) -> float:
    """Bytes of activations kept for the backward pass, per training image (see the module docstring)."""
    bb, L, T = variant.backbone, variant.seq_len, variant.text_len
    W = bb.width
    block = 46.0 * L * W + 4.0 * T * W
    blocks = len(bb.blocks) * (2.0 * L * W) + block if checkpointing else len(bb.blocks) * block
    aligner = len(bb.aligner) * 34.0 * T * W
    head_bytes = variant.head.activation_bytes(L)
    return blocks + aligner + head_bytes


def plan_run(spec: Spec, variant_name: str, size: str, steps: int | None = None,
             budget: float | None = None) -> RunPlan:
    """One run's plan; `steps` (an IsoFLOP cell's) replaces the spec's train.steps."""
    import torch

    from variants.registry import LADDER_SHAPES, build_variant

    cfg = RunConfig.from_overrides(run_config_values(spec, variant_name, size))
    shapes = {k: v for k, v in LADDER_SHAPES[spec.ladder].items() if k != "text_len"}
    options = cfg.model.options
    with torch.device("meta"):
        variant = build_variant(variant_name, size, ladder=spec.ladder, **shapes, **options)
    cluster = spec.cluster
    peak = cluster.peak_tflops * 1e12
    batch, steps = cfg.train.batch_size, steps or cfg.train.steps
    text_online = cluster.text_encoder_params if cluster.text_encoder_online else 0.0
    text_flops = 2.0 * text_online * variant.text_len  # frozen encoder: forward only
    train_flops = variant.train_flops_per_image() * batch * steps
    per_hour = peak * cluster.mfu * 3600
    gpu_hours = (train_flops + text_flops * batch * steps) / per_hour

    resources = spec.resources_for("train", size)
    gpus = max(resources.nodes * resources.gpus_per_node, 1)
    strategy = cfg.dist.strategy
    checkpointing = cfg.dist.activation_checkpointing
    params = variant.param_counts()["total"]
    state = STATE_BYTES_PER_PARAM * params / (gpus if strategy == "fsdp2" else 1)
    act = _activation_bytes(variant, checkpointing) * batch / gpus
    frozen = 2.0 * text_online
    eval_images = sum(METRICS[m].images(s) for m, s in spec.eval.metrics.items())
    sampling = spec.eval.sampling
    cost = variant.sampling_cost(steps=sampling.steps, cfg_scale=sampling.cfg_scale, head_steps=sampling.head_steps)
    eval_hours = eval_images * (cost["flops"] + text_flops) / (peak * cluster.sample_mfu) / 3600
    return RunPlan(variant=variant_name, size=size, budget=budget, params=params, train_flops=train_flops, gpus=gpus,
                   text_gpu_hours=text_flops * batch * steps / per_hour, strategy=strategy, activation_checkpointing=checkpointing, gpu_hours=gpu_hours,
                   wall_days=gpu_hours / gpus / 24, mem_state_gb=state / 1e9, mem_act_gb=act / 1e9,
                   mem_total_gb=(state + act + frozen) / 1e9 + 2.0, eval_gpu_hours=eval_hours)


def scale_plan(spec: Spec) -> list[RunPlan]:
    """One plan per training run of the spec: its IsoFLOP cells (and extra runs) when it has a design."""
    from dataclasses import replace

    if spec.isoflop is None:
        grid = [plan_run(spec, v, s) for v, s in spec.runs()]
    else:
        from harness.isoflop import cells

        extra = [plan_run(spec, v, s) for v, s in dict.fromkeys((r.variant, r.size) for r in spec.extra_runs)]
        grid = [plan_run(spec, c.variant, c.size, steps=c.steps, budget=c.budget) for c in cells(spec)] + extra
    seeds = [replace(p, seed=k) for p in grid if p.budget is None for k in spec.extra_seeds(p.variant, p.size)]
    return grid + seeds


def format_plan(spec: Spec, plans: list[RunPlan]) -> str:
    """A markdown table (docs/cluster.md is this output) and the totals."""
    c = spec.cluster
    lines = [f"Scale plan of `{spec.name}` on {c.gpu} ({c.peak_tflops:g} TFLOP/s dense "
             f"bf16, {c.gpu_mem_gb:g} GB) at {c.mfu:.0%} MFU for training and "
             f"{c.sample_mfu:.0%} for sampling; memory per GPU is an estimate "
             "(harness/scale_plan.py).", "",
             "| run | params | train FLOPs | GPUs | parallelism | GPU-hours (text encoder) | days | state GB/GPU | "
             "activations GB/GPU | total GB/GPU | eval GPU-hours |", "|" + "---|" * 11]
    limit = c.gpu_mem_gb
    for p in plans:
        par = p.strategy + (" + act. ckpt" if p.activation_checkpointing else "")
        flag = " (over!)" if p.mem_total_gb > limit else ""
        run = f"{p.variant} {p.size}" + (f" @ {p.budget:.3g}" if p.budget else "") + (f" seed {p.seed}" if p.seed else "")
        lines.append(f"| {run} | {p.params / 1e9:.2f}B | {p.train_flops:.2e} | {p.gpus} | {par} | "
                     f"{p.gpu_hours:,.0f} ({p.text_gpu_hours:,.0f}) | {p.wall_days:.1f} | {p.mem_state_gb:.1f} | {p.mem_act_gb:.1f} | "
                     f"{p.mem_total_gb:.1f}{flag} | {p.eval_gpu_hours:,.1f} |")
    total = sum(p.gpu_hours for p in plans)
    evals = sum(p.eval_gpu_hours for p in plans)
    lines += ["", f"Total: {total:,.0f} GPU-hours of training and {evals:,.0f} of evaluation sampling for "
              f"{len(plans)} runs."]
    if c.text_encoder_online:
        text = sum(p.text_gpu_hours for p in plans)
        lines.append(f"Of the training GPU-hours, {text:,.0f} are the frozen text encoder run online "
                     f"({c.text_encoder_params / 1e9:.2f}B parameters, forward only, in parentheses "
                     "per run); pre-encoded captions would remove that share.")
    return "\n".join(lines)
