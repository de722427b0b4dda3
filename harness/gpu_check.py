"""`make gpu-check` (`python -m harness.gpu_check`): what a GPU does with the paper-scale models, in <= 5 minutes.

On CUDA, in order (each phase is skipped, with its reason, once the time budget is spent):
  train     bf16-autocast training steps of kl-random at the largest paper rung that fits (1.1B first, then
            665M, 369M, 166M), 256 tokens, T5-XXL-shaped text: eager, then with torch.compile per block (as
            `harness.distributed.parallelize` compiles); step time, images/s, TFLOP/s and MFU against the
            device's dense bf16 peak (harness.bench_probes.PEAK_BF16_TFLOPS), peak memory
  fsdp2     one FSDP2 training step (fully_shard per block, then the root) at world size 1, and at 2 processes
            when the machine has 2 GPUs (NCCL refuses two ranks on one device)
  decode    raster sampling with the KV cache at 256 tokens (vq-raster, guided): tokens/s and ms per token
The report goes to OUT/gpu_check.json (atomically) and to stdout. On a CPU, `--smoke` runs the same phases at
the smallest CPU rung in seconds (the test suite runs it); its numbers mean nothing, its code paths are the GPU's.
FLOPs come from the variants' own accounting (`train_flops_per_image`), as in `fluidbench bench`.
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist

BUDGET_S = 300.0


@dataclass
class CheckConfig:
    """Sizes and counts of every phase; `smoke()` is the CPU version."""
    ladder: str = "paper"
    sizes: list[str] = field(default_factory=lambda: ["1.1B", "665M", "369M", "166M"])  # largest first
    variant: str = "kl-random"
    decode_variant: str = "vq-raster"
    batch: int = 32
    warmup: int = 2
    steps: int = 5
    decode_batch: int = 16
    head_steps: int = 100
    shapes: dict = field(default_factory=dict)  # build_variant shapes; empty = the ladder's (LADDER_SHAPES)
    options: dict = field(default_factory=dict)  # more build_variant options
    budget_s: float = BUDGET_S
    compile: bool = True
    fsdp_processes: int = 2   # also try FSDP2 at this many processes where the machine allows it

    @classmethod
    def smoke(cls) -> "CheckConfig":
        return cls(ladder="cpu", sizes=["cpu-xs"], batch=2, warmup=1, steps=1, decode_batch=1, head_steps=2,
                   shapes=dict(seq_len=16, vocab_size=32, token_dim=4, text_dim=24, text_len=5),
                   options=dict(steps=4), compile=False, fsdp_processes=1)


def _shapes(cfg: CheckConfig) -> dict:
    from variants.registry import LADDER_SHAPES
    return cfg.shapes or dict(LADDER_SHAPES[cfg.ladder])


def _build(name: str, size: str, cfg: CheckConfig, device: torch.device) -> torch.nn.Module:
    from variants.registry import build_variant
    torch.manual_seed(0)
    return build_variant(name, size, ladder=cfg.ladder, head_steps=cfg.head_steps, **_shapes(cfg),
                         **cfg.options).to(device)


def _batch(variant: torch.nn.Module, batch: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    g = torch.Generator(device).manual_seed(0)
    T = variant.text_len
    tokens = variant.random_tokens(batch, g, device)
    text = torch.randn(batch, T, variant.text_dim, generator=g, device=device)
    mask = torch.arange(T, device=device)[None] < torch.randint(T // 4 + 1, T + 1, (batch, 1), generator=g,
                                                                 device=device)
    return tokens, text, mask


def _clock(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def _peak_mib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None


def _train_steps(model: torch.nn.Module, variant: torch.nn.Module, cfg: CheckConfig, device: torch.device,
                 steps: int | None = None) -> dict:
    """`warmup` + `steps` training steps (bf16 autocast on CUDA, grad clip 3.0, fused AdamW): median step time."""
    cuda = device.type == "cuda"
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), fused=cuda)
    tokens, text, mask = _batch(variant, cfg.batch, device)
    g = torch.Generator(device).manual_seed(1)
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    times, first, first_loss = [], None, None
    for i in range(cfg.warmup + (cfg.steps if steps is None else steps)):
        t0 = _clock(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
            loss = model(tokens, text, mask, g)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 3.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        dt = _clock(device) - t0
        first = dt if first is None else first
        first_loss = float(loss.detach()) if first_loss is None else first_loss
        if i >= cfg.warmup:
            times.append(dt)
    step_s = sorted(times)[len(times) // 2]
    return dict(batch=cfg.batch, step_s=step_s, first_step_s=first, images_per_s=cfg.batch / step_s,
                first_loss=first_loss, loss=float(loss.detach()), peak_memory_mib=_peak_mib(device))


def _throughput(row: dict, variant: torch.nn.Module, device: torch.device) -> dict:
    from harness.bench_probes import peak_tflops
    flops = float(variant.train_flops_per_image()) * row["images_per_s"]
    peak = peak_tflops(device, None)
    return row | dict(tflops=flops / 1e12, peak_tflops=peak, mfu=flops / 1e12 / peak if peak else None)


def check_train(cfg: CheckConfig, device: torch.device) -> dict:
    """Eager and compiled training steps at the largest rung that fits."""
    out: dict[str, Any] = dict(tried=[])
    for size in cfg.sizes:
        try:
            variant = _build(cfg.variant, size, cfg, device)
            out["eager"] = _throughput(_train_steps(variant, variant, cfg, device), variant, device)
        except torch.cuda.OutOfMemoryError as e:  # the next rung down
            out["tried"].append(dict(size=size, error=str(e).splitlines()[0]))
            variant = None
            torch.cuda.empty_cache()
            continue
        out.update(size=size, params=variant.param_counts()["total"],
                   flops_per_image=float(variant.train_flops_per_image()))
        if cfg.compile:
            for block in variant.blocks():
                block.compile()  # as harness.distributed.parallelize does
            t0 = time.perf_counter()
            out["compiled"] = _throughput(_train_steps(variant, variant, cfg, device), variant, device)
            out["compiled"]["with_compile_s"] = time.perf_counter() - t0
        del variant
        break
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out


def _fsdp_step(rank: int, world: int, store_path: str, size: str, cfg: CheckConfig, result_path: str | None) -> dict:
    """One process of an FSDP2 run: join the group, shard per block and the root, time training steps."""
    from torch.distributed.fsdp import fully_shard
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    store = dist.FileStore(store_path, world)
    dist.init_process_group("nccl" if cuda else "gloo", store=store, rank=rank, world_size=world)
    try:
        variant = _build(cfg.variant, size, cfg, device)
        for block in variant.blocks():
            fully_shard(block)
        fully_shard(variant)
        row = _throughput(_train_steps(variant, variant, cfg, device, steps=max(1, cfg.steps // 2)), variant, device)
        row = row | dict(world_size=world, images_per_s_all_ranks=row["images_per_s"] * world)
    finally:
        dist.destroy_process_group()
    if result_path and rank == 0:
        import json
        Path(result_path).write_text(json.dumps(row))
    return row


def _fsdp_worker(rank: int, world: int, store_path: str, size: str, cfg: CheckConfig, result_path: str) -> None:
    _fsdp_step(rank, world, store_path, size, cfg, result_path)


def check_fsdp(cfg: CheckConfig, size: str) -> dict:
    """FSDP2 at world size 1 in this process; at `fsdp_processes` when there are that many GPUs."""
    import json

    import torch.multiprocessing as mp
    out: dict[str, Any] = dict(size=size)
    with tempfile.TemporaryDirectory(prefix="fluidbench-gpu-check-") as tmp:
        out["world_1"] = _fsdp_step(0, 1, os.path.join(tmp, "store1"), size, cfg, None)
        world = cfg.fsdp_processes
        if world < 2:
            pass
        elif torch.cuda.is_available() and torch.cuda.device_count() < world:
            out[f"world_{world}"] = (f"skipped: {torch.cuda.device_count()} GPU(s); NCCL refuses two ranks on one "
                                     "device")
        else:
            result = os.path.join(tmp, "result.json")
            mp.spawn(_fsdp_worker, args=(world, os.path.join(tmp, f"store{world}"), size, cfg, result), nprocs=world)
            out[f"world_{world}"] = json.loads(Path(result).read_text())
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return out


def check_decode(cfg: CheckConfig, size: str, device: torch.device) -> dict:
    """Guided raster sampling with the KV cache over the whole sequence (256 tokens at paper shapes)."""
    variant = _build(cfg.decode_variant, size, cfg, device).eval()
    _, text, mask = _batch(variant, cfg.decode_batch, device)
    cuda = device.type == "cuda"

    def run() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
            variant.sample(text, mask, generator=torch.Generator(device).manual_seed(0))

    run()  # warm-up
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    t0 = _clock(device)
    run()
    seconds = _clock(device) - t0
    L = variant.seq_len
    out = dict(size=size, variant=cfg.decode_variant, batch=cfg.decode_batch, seq_len=L, seconds=seconds,
               ms_per_token_step=1e3 * seconds / L, tokens_per_s=cfg.decode_batch * L / seconds,
               kv_cache=variant.last_sample_stats.get("kv_cache"), peak_memory_mib=_peak_mib(device))
    del variant
    if cuda:
        torch.cuda.empty_cache()
    return out


def run_check(cfg: CheckConfig, device: torch.device) -> dict:
    """Every phase in order within `budget_s`; a phase that would start after the budget is skipped."""
    from harness.bench_probes import machine_info
    t_start = time.perf_counter()
    report: dict[str, Any] = dict(config=asdict(cfg), machine=machine_info(device), phases={})

    def phase(name: str, fn: Callable[[], dict]) -> None:
        elapsed = time.perf_counter() - t_start
        if elapsed > cfg.budget_s:
            report["phases"][name] = f"skipped: {elapsed:.0f} s spent of a {cfg.budget_s:.0f} s budget"
            return
        t0 = time.perf_counter()
        report["phases"][name] = fn() | dict(phase_s=time.perf_counter() - t0)

    phase("train", lambda: check_train(cfg, device))
    train = report["phases"]["train"]
    size = train.get("size") if isinstance(train, dict) else None
    if size is None:
        report["phases"]["fsdp2"] = report["phases"]["decode"] = "skipped: no rung fitted"
    else:
        phase("fsdp2", lambda: check_fsdp(cfg, size))
        phase("decode", lambda: check_decode(cfg, size, device))
    report["wall_s"] = time.perf_counter() - t_start
    return report


def summary_lines(report: dict) -> list[str]:
    lines = [f"gpu-check on {report['machine'].get('gpu') or report['machine']['cpu']} "
             f"(torch {report['machine']['torch']}), {report['wall_s']:.0f} s"]
    p = report["phases"]
    fmt = lambda x, spec=".3g": "-" if x is None else format(x, spec)  # noqa: E731
    if isinstance(p.get("train"), dict) and "eager" in p["train"]:
        t = p["train"]
        for mode in ("eager", "compiled"):
            if mode in t:
                m = t[mode]
                lines.append(f"train {t['size']} ({t['params'] / 1e6:.0f}M params) {mode}: {1e3 * m['step_s']:.1f} ms/step "
                             f"at batch {m['batch']}, {fmt(m['images_per_s'])} img/s, {fmt(m['tflops'])} TFLOP/s, MFU "
                             f"{fmt(m['mfu'], '.1%') if m['mfu'] is not None else '-'}, peak {fmt(m['peak_memory_mib'], ',.0f')} MiB")
    for name in ("fsdp2", "decode"):
        value = p.get(name)
        if isinstance(value, str) or value is None:
            lines.append(f"{name}: {value}")
        elif name == "fsdp2":
            for key in sorted(k for k in value if k.startswith("world_")):
                v = value[key]
                lines.append(f"fsdp2 {key}: " + (v if isinstance(v, str) else
                             f"{1e3 * v['step_s']:.1f} ms/step, MFU {fmt(v['mfu'], '.1%') if v['mfu'] is not None else '-'}"))
        else:
            lines.append(f"decode {value['variant']} {value['size']}: {value['seq_len']} tokens x batch {value['batch']} "
                         f"in {value['seconds']:.2f} s ({value['ms_per_token_step']:.1f} ms per step, "
                         f"{value['tokens_per_s']:,.0f} tokens/s, KV cache {value['kv_cache']})")
    return lines


def main(argv: list[str] | None = None) -> int:
    from harness.atomic import write_json
    parser = argparse.ArgumentParser(prog="python -m harness.gpu_check", description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes (what the CPU test suite runs)")
    parser.add_argument("--out", default="results/gpu_check", help="folder for gpu_check.json")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile training steps")
    parser.add_argument("--budget-s", type=float, default=BUDGET_S, help="time budget of all phases")
    args = parser.parse_args(argv)
    cuda = torch.cuda.is_available()
    if not cuda and not args.smoke:
        parser.error("no CUDA device here: run with --smoke for the CPU version")
    cfg = CheckConfig.smoke() if args.smoke else CheckConfig()
    cfg.budget_s, cfg.compile = args.budget_s, cfg.compile and not args.no_compile
    report = run_check(cfg, torch.device("cuda" if cuda and not args.smoke else "cpu"))
    path = Path(args.out) / "gpu_check.json"
    write_json(path, report)
    print("\n".join(summary_lines(report) + [f"wrote {path}"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
