"""`fluidbench bench`: the speed of the four variants, measured the same way for each.

For every variant at each setting (a ladder rung at 64 tokens, and at the paper's 256 tokens): the training step
as harness/train.py performs it (images/s, tokens/s, the share of the step outside forward + backward); sampling
at the paper's settings with and without guidance (seconds per image, forward passes counted by a hook on the
backbone, the time split between text encoder, text aligner, backbone, head, tokenizer decode); raster sampling
without its KV cache; peak memory; on CUDA achieved TFLOP/s and MFU from the variants' own FLOP accounting.

Warm-up runs are excluded and each number is the median of `reps` runs. The tokenizers are randomly initialised
ones of our embedded architecture (decode time does not depend on the weights); the text encoder is MiniLM.
"""
from __future__ import annotations

import os
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from harness.bench_fixtures import RandomText, Setting, captions, fake_cache, stand_in_tokenizer  # noqa: F401
from harness.bench_probes import (Clock, Marks, Probe, loadavg, machine_info, median_seconds,  # noqa: F401
                                  peak_memory, throughput)
from harness.errors import FluidbenchError

FORMAT = 1
OUTSIDE_TARGET, KV_TARGET = 0.10, 5.0  # docs/benchmarks.md, "Targets"


@dataclass
class BenchConfig:
    """Everything that changes the numbers; written into bench.json."""
    settings: list[Setting]
    reps: int = 3             # timed sampling runs per measurement (after one instrumented warm-up run)
    train_warmup: int = 2
    train_reps: int = 5
    threads: int = 1          # torch intra-op threads, 0 = torch's default (bench_config: 1 on a CPU, see there)
    device: str = "auto"      # auto | cpu | cuda
    dtype: str = "auto"       # auto (bf16 autocast on CUDA) | fp32 | bf16
    compile: bool = False     # torch.compile each block (harness.distributed.parallelize)
    peak_tflops: float | None = None  # for MFU; None = the table above (CUDA only)
    text_encoder: str = "minilm"      # minilm | random (no text-encoder cost: tests, machines without MiniLM)
    seed: int = 0
    quick: bool = False       # a smoke run: the targets are meant for the default settings
    variants: list[str] = field(default_factory=lambda: ["vq-raster", "vq-random", "kl-raster", "kl-random"])


def bench_config(size: str = "cpu-s", *, ladder: str = "cpu", quick: bool = False, device: str = "auto",
                 head_steps: int | None = None, **overrides: Any) -> BenchConfig:
    """The default settings: `size` at 64 and at 256 tokens. On a CPU: small batches, one thread and 5 diffusion
    head steps (the paper's 100 x 256 tokens take minutes there; both counts are recorded, with an estimate at
    100). `quick` (smoke runs): the smallest rung, batches of 1-8, 2 head steps, one timed repetition."""
    from variants.registry import LADDER_SHAPES
    cuda = _device(device).type == "cuda"
    small, paper = LADDER_SHAPES["cpu"], LADDER_SHAPES["paper"]
    if quick and ladder == "cpu":
        size = "cpu-xs"
    hs = head_steps if head_steps is not None else (2 if quick else None if cuda else 5)
    batch = (lambda gpu, cpu, tiny: gpu if cuda else tiny if quick else cpu)  # noqa: E731
    settings = [
        Setting("64-tokens", ladder, size, small["seq_len"], small["vocab_size"], small["token_dim"], 32,
                train_batch=batch(64, 32, 8), sample_batch=batch(16, 2, 2), head_steps=hs),
        # the KV-cache comparison runs at a batch of 8 on a CPU: at 1-2 images per-op overhead bounds both paths
        # and the cache saves ~3.5x; at 8, ~6-9x (docs/benchmarks.md has the speedup by batch)
        Setting("256-tokens", ladder, size, paper["seq_len"], paper["vocab_size"], paper["token_dim"], 64,
                train_batch=batch(64, 4, 2), sample_batch=batch(16, 1, 1), head_steps=hs,
                kv_batch=batch(16, 8, 1)),
    ]
    # One thread on a CPU: these models are too small to gain from more, and on a shared 2-core machine two
    # threads made a training step 15-20x slower (OpenMP threads waiting on each other under oversubscription).
    cfg = BenchConfig(settings, device=device, threads=0 if cuda else 1)
    if quick:
        cfg = replace(cfg, reps=1, train_warmup=1, train_reps=2, quick=True)
    return replace(cfg, **overrides)


def _device(name: str) -> torch.device:
    from harness.devices import default_device

    return default_device(name)


def _bf16(cfg: "BenchConfig", device: torch.device) -> bool:
    from harness.devices import autocast_dtype

    return autocast_dtype(cfg.dtype, device) is not None  # the training loop's rule



# ---- training ------------------------------------------------------------------------------------------------

def measure_training(variant: nn.Module, setting: Setting, cfg: BenchConfig, device: torch.device,
                     text_len: int, text_dim: int) -> dict:
    """The training step as harness/train.py's loop runs it (batch from a CachedSplit, lr schedule, autocast,
    loss, backward, grad clip, fused AdamW, zero_grad, EMA, loss accumulation): median step time and the share
    of the step outside the model's forward + backward. The step is train.py's own `train_step`, with its
    EMA, sampler and data classes, so what is timed is what the training loop runs."""
    from harness.cache import CachedSplit
    from harness.config import RunConfig
    from harness.devices import to_device
    from harness.train import EMA, EpochSampler, make_optimizer, train_step

    run = RunConfig.from_overrides({"train.batch_size": setting.train_batch, "train.seed": cfg.seed})
    use_bf16 = _bf16(cfg, device)
    model = variant.train()
    optimizer = make_optimizer(run, variant)
    params = [p for g in optimizer.param_groups for p in g["params"]]
    ema = EMA(params)
    # as train.py: loss draws on the device, KL token samples on the host where the cache lives
    loss_gen = torch.Generator(device).manual_seed(cfg.seed + 1)
    data_gen = torch.Generator().manual_seed(cfg.seed + 2)
    loss_sum = torch.zeros((), device=device)
    marks, steps = Marks(device), cfg.train_warmup + cfg.train_reps
    with tempfile.TemporaryDirectory(prefix="fluidbench-bench-") as tmp:
        data = CachedSplit(fake_cache(Path(tmp), variant.token_kind, setting, 4 * setting.train_batch, text_len,
                                       text_dim, cfg.seed))
        sampler = EpochSampler(len(data), setting.train_batch, cfg.seed)
        with peak_memory(device) as memory:
            for step in range(steps):
                marks.mark()  # 4 step: the step begins
                batch = to_device(data.batch(sampler.next_batch(), data_gen), device)
                # marks 4 step + 1 (forward begins) and 4 step + 2 (backward done) are set inside
                loss, _ = train_step(run, step, model, optimizer, ema, params, batch, loss_gen,
                                     torch.bfloat16 if use_bf16 else None, mark=marks.mark)
                loss_sum += loss
                marks.mark()  # 4 step + 3: the step is done
    variant.eval()
    timed = range(cfg.train_warmup, steps)
    step_s = statistics.median(marks.seconds(4 * s, 4 * s + 3) for s in timed)
    cpu = None if marks.cuda else statistics.median(marks.seconds(4 * s, 4 * s + 3, cpu=True) for s in timed)
    # the share outside forward + backward in CPU time on a CPU (other processes on a shared machine inflate
    # wall times at random), in device time on CUDA
    inside = sum(marks.seconds(4 * s + 1, 4 * s + 2, cpu=not marks.cuda) for s in timed)
    total = sum(marks.seconds(4 * s, 4 * s + 3, cpu=not marks.cuda) for s in timed)
    images_per_s = setting.train_batch / step_s
    flops = float(variant.train_flops_per_image())
    return dict(batch_size=setting.train_batch, step_s=step_s, step_cpu_s=cpu, images_per_s=images_per_s,
                tokens_per_s=images_per_s * setting.seq_len, outside_forward_backward=1 - inside / total,
                flops_per_image=flops, **throughput(flops * images_per_s, device, cfg.peak_tflops), **memory,
                mean_loss=float(loss_sum) / steps)


# ---- sampling ------------------------------------------------------------------------------------------------

def measure_sampling(variant: nn.Module, text: torch.Tensor, text_mask: torch.Tensor, tokenizer: nn.Module, *,
                     cfg_scale: float | None, head_steps: int | None, cfg: BenchConfig, device: torch.device,
                     kv_cache: bool = True, reps: int | None = None) -> dict:
    """One instrumented run (the warm-up: passes and head evaluations counted, time split), then timed runs.

    cfg_scale None = the variant's paper guidance, 1.0 = no guidance (no null branch)."""
    clock, B = Clock(device), text.shape[0]
    reps = cfg.reps if reps is None else reps
    # a head without steps (categorical) ignores head_steps: pass None so that the cost model ignores it too
    head_steps = head_steps if variant.defaults["head_steps"] else None
    kwargs = dict(cfg_scale=cfg_scale, head_steps=head_steps, kv_cache=kv_cache)
    use_bf16 = _bf16(cfg, device)

    def run() -> torch.Tensor:
        generator = torch.Generator(device=device).manual_seed(cfg.seed)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
            return variant.sample(text, text_mask, generator=generator, **kwargs)

    t0 = clock()[0]
    with Probe(variant, clock) as probe:
        tokens = run()
    probe_s = clock()[0] - t0
    stats = dict(variant.last_sample_stats)
    with peak_memory(device) as memory:
        wall, cpu = median_seconds(run, reps, clock)
    decode, _ = median_seconds(lambda: tokenizer.decode(tokens), reps, clock)

    steps, used, rows = stats["steps"], stats["head_steps"], 2 if stats["cfg_scale"] != 1.0 else 1
    cost = variant.sampling_cost(cfg_scale=cfg_scale, head_steps=head_steps, kv_cache=kv_cache)
    counted = dict(forward_passes=len(probe.pass_rows), forward_passes_per_image=_per(sum(probe.pass_rows), B),
                   head_evals_per_image=_per(probe.head_rows, B))
    expected = dict(forward_passes=steps, forward_passes_per_image=steps * rows,
                    head_evals_per_image=cost["head_evals_per_image"])
    reported = dict(stats=stats["forward_passes_per_image"], cost_model=cost["forward_passes_per_image"])
    split = {part: s / B for part, s in probe.seconds.items()}
    split["other"] = max(0.0, probe_s / B - sum(split.values()))
    out = dict(cfg_scale=stats["cfg_scale"], temperature=stats["temperature"], steps=steps, head_steps=used,
               paper_head_steps=variant.defaults["head_steps"], kv_cache=kv_cache, batch_size=B, reps=reps,
               seconds_per_image=wall / B, cpu_seconds_per_image=None if cpu is None else cpu / B,
               tokenizer_decode_seconds_per_image=decode / B, counted=counted, expected=expected,
               reported_forward_passes_per_image=reported,
               counts_match=counted == expected and set(reported.values()) == {expected["forward_passes_per_image"]},
               instrumented_seconds_per_image=split, flops_per_image=cost["flops"],
               **throughput(cost["flops"] * B / wall, device, cfg.peak_tflops), **memory)
    paper = variant.defaults["head_steps"]
    if paper and used and used != paper:  # the head's time grows with its steps: an estimate, labelled so
        head_s = split["head"] * wall / max(probe_s, 1e-12)  # its share of the instrumented run, of a timed one
        out["seconds_per_image_at_paper_head_steps_est"] = wall / B + head_s * (paper / used - 1)
    return out


def _per(total: int, batch: int) -> int | float:
    return total // batch if total % batch == 0 else total / batch


def _has_kv_cache(variant: nn.Module) -> bool:
    """Whether sampling without a cache costs more, by the variant's own accounting (raster order)."""
    return variant.sampling_cost(kv_cache=False)["flops"] > variant.sampling_cost(kv_cache=True)["flops"]


# ---- the whole bench -----------------------------------------------------------------------------------------

def run_bench(cfg: BenchConfig, progress: bool = True) -> dict:
    """Measure every variant at every setting; returns the bench.json document (docs/benchmarks.md)."""
    from tqdm.auto import tqdm

    from variants.text import load_text_encoder

    if cfg.text_encoder not in ("minilm", "random"):
        raise FluidbenchError(f"bench text_encoder={cfg.text_encoder!r}: choose minilm or random")
    device, threads = _device(cfg.device), torch.get_num_threads()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    try:
        t_start = time.perf_counter()
        machine = machine_info(device)
        encoder = load_text_encoder("minilm", device=device) if cfg.text_encoder == "minilm" else RandomText(device)
        results, kv_rows = [], []
        bar = tqdm(total=len(cfg.settings) * len(cfg.variants), desc="bench", unit="variant", disable=not progress)
        for setting in cfg.settings:
            texts = captions(setting.sample_batch)
            encode_s = median_seconds(lambda: encoder.encode(texts), cfg.reps, Clock(device))[0] / len(texts)
            built, tokenizers = {}, {}
            for name in cfg.variants:
                bar.set_postfix_str(f"{setting.name} {name}")
                row, built[name] = _bench_variant(name, setting, cfg, device, encoder, encode_s, tokenizers)
                results.append(row)
                bar.update(1)
            if setting.kv_batch:
                kv_rows += _kv_comparison(setting, [r for r in results if r["setting"] == setting.name], built,
                                          cfg, device, encoder)
        bar.close()
    finally:
        torch.set_num_threads(threads)
    doc = dict(format=FORMAT, created=time.strftime("%Y-%m-%dT%H:%M:%S%z"), machine=machine,
               config=asdict(cfg) | dict(text_encoder=encoder.name, text_max_length=encoder.max_length,
                                         dtype_used="bf16" if _bf16(cfg, device) else "fp32",
                                         tokenizers="randomly initialised embedded architecture (f4): decode time"),
               results=results, kv_cache=kv_rows)
    doc.update(kv_cache_summary(kv_rows))
    doc["targets"] = check_targets(doc)
    doc["machine"]["loadavg_end"] = loadavg()
    doc["wall_s"] = time.perf_counter() - t_start
    return doc


def _bench_variant(name: str, setting: Setting, cfg: BenchConfig, device: torch.device, encoder: Any,
                   encode_s: float, tokenizers: dict[str, nn.Module]) -> tuple[dict, tuple[nn.Module, nn.Module]]:
    """Training and sampling (guided, unguided) of one variant; returns its row and (variant, tokenizer).
    `encode_s`: the text encoder's seconds per caption; `tokenizers`: stand-ins by kind, built on first use."""
    from harness import distributed as D
    from harness.config import DistConfig
    from variants.registry import build_variant

    torch.manual_seed(cfg.seed)
    variant = build_variant(name, setting.size, ladder=setting.ladder, seq_len=setting.seq_len,
                            vocab_size=setting.vocab_size, token_dim=setting.token_dim, text_dim=encoder.dim,
                            text_len=encoder.max_length, **setting.options).to(device)
    D.parallelize(variant, DistConfig(compile=cfg.compile), D.DistInfo(device=device))  # compile only, in place
    kind = variant.token_kind
    if kind not in tokenizers:
        tokenizers[kind] = stand_in_tokenizer(kind, setting, cfg.seed, device)
    tokenizer = tokenizers[kind]
    row: dict[str, Any] = dict(setting=setting.name, variant=name, ladder=setting.ladder, size=setting.size,
                               seq_len=setting.seq_len, params=variant.param_counts())
    row["train"] = measure_training(variant, setting, cfg, device, encoder.max_length, encoder.dim)
    text, text_mask = encoder.encode(captions(setting.sample_batch))
    row["sample"] = {}
    for guidance, cfg_scale in (("guided", None), ("unguided", 1.0)):
        m = measure_sampling(variant, text, text_mask, tokenizer, cfg_scale=cfg_scale,
                             head_steps=setting.head_steps, cfg=cfg, device=device)
        m["text_encoder_seconds_per_image"] = encode_s
        m["end_to_end_seconds_per_image"] = (m["text_encoder_seconds_per_image"] + m["seconds_per_image"]
                                             + m["tokenizer_decode_seconds_per_image"])
        m["split"] = _split(m)
        row["sample"][guidance] = m
    return row, (variant, tokenizer)


def _split(m: dict) -> dict:
    """Fractions of one image's end-to-end time: the timed sampling run divided in the proportions of the
    instrumented one, plus the text encoder and the tokenizer decode, measured on their own."""
    parts = m["instrumented_seconds_per_image"]
    scale = m["seconds_per_image"] / max(sum(parts.values()), 1e-12)
    seconds = {"text_encoder": m["text_encoder_seconds_per_image"], **{k: v * scale for k, v in parts.items()},
               "tokenizer_decode": m["tokenizer_decode_seconds_per_image"]}
    total = sum(seconds.values())
    return {k: v / total for k, v in seconds.items()}


def _kv_comparison(setting: Setting, rows: list[dict], built: dict, cfg: BenchConfig, device: torch.device,
                   encoder: Any) -> list[dict]:
    """Guided sampling with and without the KV cache at `setting.kv_batch`, for the cached variant whose head
    takes the smallest share of its time: the cache speeds up the backbone only, and a diffusion head's
    steps per token cost the same either way (its share is in the guided split of every variant)."""
    cached = [r for r in rows if _has_kv_cache(built[r["variant"]][0])]
    if not cached:
        return []
    row = min(cached, key=lambda r: r["sample"]["guided"]["split"]["head"])
    variant, tokenizer = built[row["variant"]]
    text, text_mask = encoder.encode(captions(setting.kv_batch))
    common = dict(cfg_scale=None, head_steps=setting.head_steps, cfg=cfg, device=device)
    with_cache = measure_sampling(variant, text, text_mask, tokenizer, **common)
    # the slow path takes >= 5x as long as the fast one (256 passes over a growing prefix, each averaging
    # over the steps): after its instrumented run, one timed run
    without = measure_sampling(variant, text, text_mask, tokenizer, kv_cache=False, reps=1, **common)
    ratio = lambda key: (without[key] / with_cache[key]) if with_cache[key] else None  # noqa: E731
    backbone = (without["instrumented_seconds_per_image"]["backbone"]
                / max(with_cache["instrumented_seconds_per_image"]["backbone"], 1e-12))
    return [dict(setting=setting.name, variant=row["variant"], seq_len=setting.seq_len, batch_size=setting.kv_batch,
                 head_share=row["sample"]["guided"]["split"]["head"], speedup=ratio("seconds_per_image"),
                 speedup_cpu_time=ratio("cpu_seconds_per_image"), backbone_speedup=backbone,
                 with_cache=with_cache, without_cache=without)]


def kv_cache_summary(kv_rows: list[dict]) -> dict:
    """kv_cache_speedup_256: raster sampling with its KV cache vs full recomputation at 256 tokens, in process
    CPU time on a CPU (on a shared machine, wall-time ratios swing with the others' load) and in wall time
    on CUDA; both ratios are kept."""
    rows = [r for r in kv_rows if r["seq_len"] == 256]
    if not rows:
        return dict(kv_cache_speedup_256=None, kv_cache_speedup_256_measure=None, kv_cache_speedup_256_wall=None,
                    kv_cache_speedup_256_cpu_time=None)
    wall, cpu = rows[0]["speedup"], rows[0]["speedup_cpu_time"]
    return dict(kv_cache_speedup_256=cpu if cpu is not None else wall,
                kv_cache_speedup_256_measure="cpu_time" if cpu is not None else "wall",
                kv_cache_speedup_256_wall=wall, kv_cache_speedup_256_cpu_time=cpu)


def check_targets(doc: dict) -> dict:
    """The targets of docs/benchmarks.md, checked on the measured numbers."""
    runs = [(f"{r['setting']} {r['variant']} {g}", m) for r in doc["results"] for g, m in r["sample"].items()]
    runs += [(f"{r['setting']} {r['variant']} kv {k}", r[k]) for r in doc["kv_cache"]
             for k in ("with_cache", "without_cache")]
    mismatches = [f"{where}: counted {m['counted']}, expected {m['expected']}, reported "
                  f"{m['reported_forward_passes_per_image']}" for where, m in runs if not m["counts_match"]]
    outside = [r["train"]["outside_forward_backward"] for r in doc["results"]]
    kv = doc["kv_cache_speedup_256"]
    return {
        "forward_passes_match_schedule": dict(ok=not mismatches, checked=len(runs), mismatches=mismatches),
        "train_outside_forward_backward_lt_10pct": dict(ok=all(v < OUTSIDE_TARGET for v in outside),
                                                        max=max(outside, default=None), threshold=OUTSIDE_TARGET),
        "kv_cache_speedup_256_ge_5": dict(ok=kv is not None and kv >= KV_TARGET, value=kv,
                                          measure=doc["kv_cache_speedup_256_measure"],
                                          value_wall=doc["kv_cache_speedup_256_wall"], threshold=KV_TARGET),
    }


def write_bench(doc: dict, out: str | os.PathLike) -> Path:
    """OUT/bench.json, written atomically."""
    from harness.atomic import write_json
    path = Path(out) / "bench.json"
    write_json(path, doc)
    return path
