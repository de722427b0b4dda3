"""Our own tokenizer as a folder: train it on ShapesT2I, measure its reconstructions, write it atomically.

`train_tokenizer_folder(kind, data, out, options)` is `fluidbench tokenizer train` and the sweep's tokenizer
job; the training loop itself is variants/tokenizer_train.py. `evaluate_reconstruction` is shared with
`fluidbench tokenizer eval`.
"""
from __future__ import annotations

import math
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from harness.errors import FluidbenchError


@dataclass
class TokenizerTrainOptions:
    """The options of `fluidbench tokenizer train` (a sweep spec's tokenizers.<kind>.train)."""

    steps: int | None = None            # training steps (None: the kind's default, vq 1800, kl 1900)
    budget_s: float | None = None       # also stop at this wall-clock budget (None: no budget; the result then
                                        # depends on the machine, so no shipped spec sets it)
    min_steps: int | None = None        # with a budget: at least this many steps (None: 500)
    seed: int = 0
    grid: int | None = None             # tokens per side (None: 8)
    patch: int | None = None            # kl: p x p latent patch per token (None: 1)
    codebook_size: int | None = None    # vq codebook entries (None: 512)
    latent_channels: int | None = None  # kl latent channels / vq code dimension
    batch_size: int | None = None
    lr: float | None = None
    blank_fraction: float = 0.0         # this share of the training images replaced by blank ones (every pixel the
                                        # data's background; every k-th image, k = round(1 / fraction)): ShapesT2I
                                        # has no image without an object, and a tokenizer that never saw one
                                        # decodes an all-background token grid as texture (docs/recipe.md, 7)
    local: bool = False                 # each token's pixel patch encoded alone (variants/tokenizers.py)
    threads: int = 0                    # torch threads while training (0 = this process's torch thread count: in a
                                        # sweep the job's threads; never the machine's load, which would make
                                        # the tokenizer, and every result after it, depend on what else ran)


def train_tokenizer_folder(kind: str, data: str | Path, out: str | Path, options: TokenizerTrainOptions) -> dict:
    """Train a VQ or KL tokenizer on the ShapesT2I folder `data`; writes OUT/tokenizer.json, OUT/model/,
    OUT/metrics.json and returns the metrics."""
    from variants.tokenizer_train import default_config, train_tokenizer
    from variants.tokenizers import save_tokenizer

    data, out, o = Path(data), Path(out), options
    start = time.perf_counter()
    _check_new_folder(out)  # before the minutes of training: the folder is never written over
    _check_ranges({"--steps": (o.steps, 0), "--budget-s": (o.budget_s, 1e-9), "--min-steps": (o.min_steps, 0),
                   "--grid": (o.grid, 1), "--patch": (o.patch, 1), "--codebook-size": (o.codebook_size, 2),
                   "--latent-channels": (o.latent_channels, 1), "--batch-size": (o.batch_size, 1),
                   "--lr": (o.lr, 1e-12), "--threads": (o.threads, 0)})
    if not 0 <= o.blank_fraction < 1:
        raise FluidbenchError(f"--blank-fraction must be in [0, 1), got {o.blank_fraction}")
    threads = o.threads or _default_threads()
    train_images, _ = _shapes_images(data, "train")
    val_images, val_manifest = _shapes_images(data, "val")
    background = _background(val_manifest, data)
    if o.blank_fraction > 0:
        train_images = with_blanks(train_images, o.blank_fraction, background)
    try:
        cfg = default_config(kind, image_size=train_images.shape[-1], grid=o.grid, patch=o.patch,
                             codebook_size=o.codebook_size, steps=o.steps, time_budget_s=o.budget_s,
                             seed=o.seed, min_steps=o.min_steps, threads=threads, latent_channels=o.latent_channels,
                             batch_size=o.batch_size, lr=o.lr, local=o.local)
    except ValueError as e:
        raise FluidbenchError(f"tokenizer settings: {e}") from None
    tokenizer, stats = train_tokenizer(cfg, train_images, log=_progress(cfg))
    metrics = evaluate_reconstruction(tokenizer, val_images, shapes=True)
    metrics["blank_psnr"] = blank_psnr(tokenizer, background)
    metrics.update(steps=stats["steps"], train_s=round(stats["train_s"], 1), train_cpu_s=round(stats["cpu_s"], 1),
                   steps_per_s=round(stats["steps_per_s"], 3), threads=threads, over_budget=stats["over_budget"],
                   final_loss=stats["final_loss"], config=stats["config"], data=str(data.resolve()),
                   kind=tokenizer.kind, seq_len=tokenizer.seq_len, vocab_size=tokenizer.vocab_size,
                   token_dim=tokenizer.token_dim, checksum=tokenizer.checksum)
    metrics["wall_s"] = round(time.perf_counter() - start, 1)
    _write_folder(out, lambda folder: save_tokenizer(tokenizer, folder), metrics)
    return metrics


def _default_threads() -> int:
    """The process's torch thread count: a sweep's worker sets it per job (spec.local.threads), Slurm from
    cpus_per_task. Float sums split over threads round differently, so this choice is part of the result; it
    used to follow the load average (1 thread on a busy machine), and two sweeps then trained other tokenizers."""
    import torch

    return torch.get_num_threads()


def with_blanks(images, fraction: float, background: list[int]):
    """`images` (N, 3, H, W) uint8 with every k-th one (k = round(1 / fraction), from index 0) made blank."""
    import torch

    out = images.clone()
    out[::max(1, round(1 / fraction))] = torch.tensor(background, dtype=images.dtype).view(3, 1, 1)
    return out


def blank_psnr(tokenizer, background: list[int]) -> float:
    """PSNR (dB) of a blank image's reconstruction: high when the tokenizer can represent "no object"."""
    import torch

    from variants.tokenizer_train import psnr, reconstruct

    size = tokenizer.image_size
    blank = torch.tensor(background, dtype=torch.uint8).view(1, 3, 1, 1).expand(1, 3, size, size).contiguous()
    return float(psnr(blank, reconstruct(tokenizer, blank)[0])[0])


def _background(manifest: dict, data: Path) -> list[int]:
    """The data's background RGB, from its manifest (what a blank image is made of)."""
    background = manifest.get("background")
    if not (isinstance(background, list) and len(background) == 3):
        raise FluidbenchError(f"{data / 'manifest.json'}: 'background' must be an RGB list of 3 values, got "
                              f"{background!r}")
    return background


def _shapes_images(data: Path, split: str):
    """A ShapesT2I split as one uint8 tensor (N, 3, H, W), plus the data folder's manifest."""
    import numpy as np
    import torch

    from harness.data.shapes import ShapesDataset

    ds = ShapesDataset(data, split)
    return torch.from_numpy(np.ascontiguousarray(np.asarray(ds.images).transpose(0, 3, 1, 2))), ds.manifest


def _progress(cfg):
    from tqdm import tqdm

    budget = cfg.time_budget_s
    total, unit = (int(budget), "s") if budget else (cfg.steps, " steps")
    bar = tqdm(total=total, desc=f"tokenizer {cfg.kind}", file=sys.stderr,
               bar_format="{desc}: {percentage:3.0f}%|{bar}| {n:.0f}/{total}" + unit + " {postfix}")

    def log(row: dict) -> None:
        bar.n = min(int(row["elapsed_s"] if budget else row["step"]), bar.total)
        bar.set_postfix(step=row["step"], loss=f"{row['loss']:.4f}")

    return log


def evaluate_reconstruction(tokenizer, images, *, shapes: bool, fid: tuple[str, Path | None] = ("none", None)) -> dict:
    from variants.tokenizer_train import reconstruction_metrics

    start = time.perf_counter()
    metrics, recs = reconstruction_metrics(tokenizer, images)
    if shapes:
        metrics["oracle_exact"] = oracle_exact(images, recs)
    if fid[0] != "none":
        metrics["rfid"] = reconstruction_fid(images, recs, *fid)
    metrics["eval_s"] = round(time.perf_counter() - start, 1)
    return metrics


def oracle_exact(originals, reconstructions) -> float:
    """Fraction of scenes whose reconstruction the ShapesT2I oracle reads exactly as the original (classes,
    counts and colours): the ceiling a tokenizer puts on the synthetic GenEval score."""
    from eval.shapes_oracle import detect

    def read(image) -> list[tuple[str, str]]:
        return sorted((d.class_name, d.color) for d in detect(image.permute(1, 2, 0).numpy()))

    same = [read(a) == read(b) for a, b in zip(originals, reconstructions)]
    return sum(same) / max(len(same), 1)


def reconstruction_fid(originals, reconstructions, extractor_name: str, weights: Path | None) -> dict:
    from eval.fid import extract_stats, fid_between, load_extractor

    extractor = load_extractor(extractor_name, weights)
    real = extract_stats(originals.split(64), extractor)
    fake = extract_stats(reconstructions.split(64), extractor)
    return dict(fid=fid_between(fake, real), extractor=extractor.name, n_images=real.n)


def _check_new_folder(out: Path) -> None:
    """`--out` must be new (or an empty folder): a tokenizer folder is written whole, never over a user's files."""
    out = out.expanduser()
    if out.is_file() or (out.is_dir() and any(out.iterdir())):
        raise FluidbenchError(f"--out {out}: already exists and is not an empty folder; tokenizer train writes a "
                              "new folder (choose another --out, or move this one away)")


def _check_ranges(values: dict[str, tuple[float | None, float]]) -> None:
    """Each numeric option that is set must be finite and at least its minimum: one line naming the option."""
    for option, (value, least) in values.items():
        if value is not None and not (math.isfinite(value) and value >= least):
            raise FluidbenchError(f"{option}={value}: must be >= {least:g}" if least >= 1 or least == 0
                                  else f"{option}={value}: must be a finite number > 0")


def _write_folder(out: Path, save, metrics: dict) -> None:
    """Write into a temporary sibling, then rename it to OUT in one step: a crash never leaves a half-written
    tokenizer folder, and an OUT that appeared meanwhile (a file, or a folder with files) is never replaced."""
    from harness.atomic import write_json

    out = out.expanduser()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        save(tmp)
        write_json(tmp / "metrics.json", metrics)
        _check_new_folder(out)
        try:
            os.rename(tmp, out)  # replaces only an empty folder (POSIX); refuses one with files
        except OSError as e:
            raise FluidbenchError(f"--out {out}: cannot be written ({e.strerror}); nothing there was changed") \
                from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
