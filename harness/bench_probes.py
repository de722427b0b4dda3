"""The bench's instruments: clocks (wall and CPU, CUDA-synchronised), timestamps without host syncs, peak memory,
the machine's description, throughput against the GPU's peak, and `Probe`, which counts a variant's backbone
passes and head evaluations and times its parts while it samples."""
from __future__ import annotations

import os
import platform
import re
import statistics
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch import nn

# Dense bf16 tensor-core peaks from NVIDIA's datasheets (TFLOP/s); the first name found in the device name wins.
PEAK_BF16_TFLOPS = [("H200", 989.0), ("H100 PCIe", 756.0), ("H100", 989.0), ("A100", 312.0), ("L40S", 362.0)]


class Clock:
    """(wall, cpu) seconds: wall includes the device's queued work (CUDA is synchronised at each reading); cpu
    is this process's CPU time, the steadier measure on a shared machine (with 1 thread, the idle wall time)."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def __call__(self) -> tuple[float, float]:
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter(), time.process_time()


class Marks:
    """Timestamps inside a loop without host synchronisation: CUDA events on GPUs, (wall, cpu) times on CPUs."""

    def __init__(self, device: torch.device):
        self.cuda, self.marks = device.type == "cuda", []

    def mark(self) -> None:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.marks.append(event)
        else:
            self.marks.append((time.perf_counter(), time.process_time()))

    def seconds(self, i: int, j: int, cpu: bool = False) -> float | None:
        if self.cuda:
            torch.cuda.synchronize()
            return None if cpu else self.marks[i].elapsed_time(self.marks[j]) / 1e3
        return self.marks[j][cpu] - self.marks[i][cpu]


def median_seconds(fn: Callable[[], Any], reps: int, clock: Clock) -> tuple[float, float | None]:
    """Median (wall, cpu) seconds of `reps` calls; cpu is None on CUDA."""
    wall, cpu = [], []
    for _ in range(max(reps, 1)):
        w0, c0 = clock()
        fn()
        w1, c1 = clock()
        wall.append(w1 - w0)
        cpu.append(c1 - c0)
    return statistics.median(wall), None if clock.cuda else statistics.median(cpu)


def _rss_kib(field_name: str) -> int | None:
    try:
        m = re.search(rf"{field_name}:\s+(\d+)", Path("/proc/self/status").read_text())
        return int(m.group(1)) if m else None
    except OSError:
        return None


@contextmanager
def peak_memory(device: torch.device) -> Iterator[dict]:
    """Peak memory of the block in MiB: CUDA max_memory_allocated, else the process's peak resident set
    (Linux resets it through /proc/self/clear_refs; elsewhere ru_maxrss, the peak since the process began).
    The RSS includes torch and the text encoder: compare against `memory_before_mib`."""
    out: dict = {}
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        yield out
        out.update(peak_memory_mib=torch.cuda.max_memory_allocated(device) / 2**20,
                   memory_before_mib=before / 2**20, memory="cuda_max_allocated")
        return
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
        kind = "peak_rss"
    except OSError:
        kind = "ru_maxrss_since_start"
    before = _rss_kib("VmRSS")
    yield out
    kib = _rss_kib("VmHWM") if kind == "peak_rss" else None
    if kib is None:
        import resource
        kib, kind = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, "ru_maxrss_since_start"
    out.update(peak_memory_mib=kib / 1024, memory_before_mib=before / 1024 if before else None, memory=kind)


def machine_info(device: torch.device) -> dict:
    cpu = platform.processor()
    try:
        cpu = re.search(r"model name\s*:\s*(.+)", Path("/proc/cpuinfo").read_text()).group(1).strip()
    except (OSError, AttributeError):
        pass
    info = dict(torch=torch.__version__, python=platform.python_version(), platform=platform.platform(),
                cpu=cpu, cpu_count=os.cpu_count(), threads=torch.get_num_threads(),
                interop_threads=torch.get_num_interop_threads(), device=str(device), loadavg_start=loadavg())
    if device.type == "cuda":
        info.update(gpu=torch.cuda.get_device_name(device), cuda=torch.version.cuda)
    return info


def loadavg() -> list[float] | None:
    """1/5/15-minute load averages: above the core count, the machine was shared while measuring."""
    return [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None


def peak_tflops(device: torch.device, override: float | None) -> float | None:
    if override:
        return override
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((tflops for key, tflops in PEAK_BF16_TFLOPS if key in name), None)


def throughput(flops_per_s: float, device: torch.device, peak_override: float | None) -> dict:
    """Achieved TFLOP/s and the model FLOPs utilisation of the device's dense bf16 peak (None off CUDA)."""
    peak = peak_tflops(device, peak_override)
    tflops = flops_per_s / 1e12
    return dict(achieved_tflops=tflops, mfu=tflops / peak if peak else None)


# ---- probes: forward passes and head evaluations counted, time split by component -----------------------------

class Probe:
    """Counts backbone passes (a forward pre-hook on the first backbone block, which every pass runs, cached
    or not) and head evaluations (rows into the head's output layer), and times text alignment, backbone and
    head by wrapping those methods on this instance only. Everything is removed on exit."""

    TIMED = {"text_aligner": ("backbone", ("encode_text", "guided_text")),
             "backbone": ("backbone", ("forward", "decode")), "head": ("head", ("sample",))}

    def __init__(self, variant: nn.Module, clock: Clock):
        self.variant, self.clock = variant, clock
        self.pass_rows: list[int] = []
        self.head_rows = 0
        self.seconds = dict.fromkeys(self.TIMED, 0.0)
        self._inside = False

    def __enter__(self) -> "Probe":
        def count_head(module: nn.Module, args: tuple) -> None:
            self.head_rows += args[0].shape[0]

        # the head's last Linear maps to tokens (categorical logits, predicted eps): one row per evaluation
        out_layer = [m for m in self.variant.head.modules() if isinstance(m, nn.Linear)][-1]
        self._hooks = [self.variant.backbone.blocks[0].register_forward_pre_hook(
                           lambda module, args: self.pass_rows.append(args[0].shape[0])),
                       out_layer.register_forward_pre_hook(count_head)]
        self._wrapped = []
        for part, (owner, methods) in self.TIMED.items():
            module = getattr(self.variant, owner)
            for name in methods:
                setattr(module, name, self._timed(part, getattr(module, name)))
                self._wrapped.append((module, name))
        return self

    def _timed(self, part: str, fn: Callable) -> Callable:
        def call(*args: Any, **kwargs: Any) -> Any:
            if self._inside:  # guided_text calls encode_text: count the outer call only
                return fn(*args, **kwargs)
            self._inside, t0 = True, self.clock()[0]
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds[part] += self.clock()[0] - t0
                self._inside = False
        return call

    def __exit__(self, *exc: Any) -> None:
        for hook in self._hooks:
            hook.remove()
        for module, name in self._wrapped:
            delattr(module, name)  # the instance attribute goes; the class's method is back
