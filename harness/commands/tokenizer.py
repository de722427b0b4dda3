"""CLI: `fluidbench tokenizer train|eval`: our own VQ/KL tokenizers on ShapesT2I and reconstruction reports."""
from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Optional

import typer

from harness.errors import FluidbenchError


def register(app: typer.Typer) -> None:
    tok = typer.Typer(help="Image tokenizers: train our own on ShapesT2I, measure reconstruction.",
                      no_args_is_help=True)
    app.add_typer(tok, name="tokenizer", help="Image tokenizers: train our own (VQ or KL), measure reconstruction.")

    @tok.command("train")
    def train(
        kind: str = typer.Option(..., "--kind", help="vq (discrete codes) or kl (continuous latents)"),
        data: Path = typer.Option(..., "--data", help="a ShapesT2I folder (`fluidbench data shapes`)"),
        out: Path = typer.Option(..., "--out", help="the tokenizer folder to write"),
        steps: int = typer.Option(0, "--steps", help="step cap (0 = train until the time budget)"),
        budget_s: Optional[float] = typer.Option(None, "--budget-s",
                                                 help="wall-clock budget of the training loop [default: 240]"),
        min_steps: Optional[int] = typer.Option(None, "--min-steps",
                                                help="train at least this many steps, budget or not [default: 500]"),
        seed: int = typer.Option(0, "--seed"),
        grid: Optional[int] = typer.Option(None, "--grid", help="tokens per side [default: 8]"),
        patch: Optional[int] = typer.Option(None, "--patch", help="kl: p x p latent patch per token [default: 1]"),
        codebook_size: Optional[int] = typer.Option(None, "--codebook-size",
                                                    help="vq codebook entries [default: 512]"),
        latent_channels: Optional[int] = typer.Option(None, "--latent-channels",
                                                      help="kl latent channels / vq code dimension"),
        batch_size: Optional[int] = typer.Option(None, "--batch-size"),
        lr: Optional[float] = typer.Option(None, "--lr"),
        threads: int = typer.Option(0, "--threads", help="torch threads while training (0 = auto: 2, or 1 when "
                                                          "the machine is already busy)"),
    ) -> None:
        """Train a VQ or KL tokenizer on ShapesT2I; writes OUT/tokenizer.json, OUT/model/, OUT/metrics.json."""
        from variants.tokenizer_train import default_config, train_tokenizer
        from variants.tokenizers import save_tokenizer

        start = time.perf_counter()
        threads = threads or _auto_threads()
        train_images, _ = _shapes_images(data, "train")
        val_images, val_root = _shapes_images(data, "val")
        try:
            cfg = default_config(kind, image_size=train_images.shape[-1], grid=grid, patch=patch,
                                 codebook_size=codebook_size, steps=steps or None, time_budget_s=budget_s, seed=seed,
                                 min_steps=min_steps, threads=threads, latent_channels=latent_channels, batch_size=batch_size, lr=lr)
        except ValueError as e:
            raise FluidbenchError(f"tokenizer settings: {e}") from None
        tokenizer, stats = train_tokenizer(cfg, train_images, log=_progress(cfg))
        metrics = _evaluate(tokenizer, val_images, shapes=True)
        metrics.update(steps=stats["steps"], train_s=round(stats["train_s"], 1), train_cpu_s=round(stats["cpu_s"], 1),
                       steps_per_s=round(stats["steps_per_s"], 3), threads=threads, over_budget=stats["over_budget"],
                       final_loss=stats["final_loss"], config=stats["config"], data=str(val_root.resolve()),
                       kind=tokenizer.kind, seq_len=tokenizer.seq_len, vocab_size=tokenizer.vocab_size,
                       token_dim=tokenizer.token_dim, checksum=tokenizer.checksum)
        metrics["wall_s"] = round(time.perf_counter() - start, 1)
        _write_folder(out, lambda folder: save_tokenizer(tokenizer, folder), metrics)
        _print_metrics(metrics, f"{out}/metrics.json")

    @tok.command("eval")
    def evaluate(
        tokenizer_path: Path = typer.Option(..., "--tokenizer", help="our folder or a published checkpoint"),
        data: Path = typer.Option(..., "--data", help="a data set of the tokenizer's resolution"),
        data_kind: str = typer.Option("shapes", "--data-kind", help="shapes | coco | webdataset"),
        split: str = typer.Option("val", "--split"),
        n: int = typer.Option(0, "--n", help="images to evaluate (0 = the whole split)"),
        image_size: Optional[int] = typer.Option(None, "--image-size", help="published checkpoints: resolution"),
        out: Optional[Path] = typer.Option(None, "--out", help="JSON report (default: beside the tokenizer)"),
        fid_extractor: str = typer.Option("none", "--fid", help="reconstruction FID: none | shapes | inception"),
        fid_weights: Optional[Path] = typer.Option(None, "--fid-weights",
                                                   help="shapes: `fluidbench eval train-features` folder; "
                                                        "inception: torch-fidelity's .pth"),
    ) -> None:
        """Reconstruction PSNR (and oracle_exact on ShapesT2I, rFID when asked) of a tokenizer on a data split."""
        import torch

        from harness.atomic import write_json
        from harness.cache import open_dataset
        from variants.tokenizers import load_tokenizer

        try:
            tokenizer = load_tokenizer(tokenizer_path, image_size=image_size)
        except (FileNotFoundError, ValueError) as e:
            raise FluidbenchError(f"--tokenizer: {e}") from None
        dataset = open_dataset(data_kind, str(data), split)
        count = len(dataset) if n <= 0 else min(n, len(dataset))
        images = torch.stack([dataset[i][0] for i in range(count)])
        if images.shape[-1] != tokenizer.image_size:
            raise FluidbenchError(f"--data: images are {images.shape[-1]} px, the tokenizer reads "
                                  f"{tokenizer.image_size} px (--image-size for published checkpoints)")
        metrics = _evaluate(tokenizer, images, shapes=(data / "manifest.json").is_file() and data_kind == "shapes",
                            fid=(fid_extractor, fid_weights))
        metrics.update(tokenizer=str(tokenizer_path), data=str(data), split=split, kind=tokenizer.kind,
                       seq_len=tokenizer.seq_len)
        if out is None:
            out = (tokenizer_path / "recon_eval.json") if tokenizer_path.is_dir() \
                else tokenizer_path.with_suffix(".recon_eval.json")
        write_json(out, metrics)
        _print_metrics(metrics, str(out))


def _auto_threads() -> int:
    """2 threads (the 5-minute target is for 2 cores), but 1 when the load average already fills the cores: every
    op's threads wait for each other, so one descheduled thread stalls them all (measured on a shared 2-core
    machine: 8.7 s/step with 2 threads against 2.7 s/step with 1)."""
    cores = os.cpu_count() or 1
    return 1 if cores < 2 or os.getloadavg()[0] >= cores else 2


def _shapes_images(data: Path, split: str):
    """A ShapesT2I split as one uint8 tensor (N, 3, H, W), plus the data folder."""
    import numpy as np
    import torch

    from harness.data.shapes import ShapesDataset

    ds = ShapesDataset(data, split)
    return torch.from_numpy(np.ascontiguousarray(np.asarray(ds.images).transpose(0, 3, 1, 2))), data


def _progress(cfg):
    from tqdm import tqdm

    bar = tqdm(total=int(cfg.time_budget_s), desc=f"tokenizer {cfg.kind}", unit="s", file=sys.stderr,
               bar_format="{desc}: {percentage:3.0f}%|{bar}| {n:.0f}/{total}s {postfix}")

    def log(row: dict) -> None:
        bar.n = min(int(row["elapsed_s"]), bar.total)
        bar.set_postfix(step=row["step"], loss=f"{row['loss']:.4f}")

    return log


def _evaluate(tokenizer, images, *, shapes: bool, fid: tuple[str, Path | None] = ("none", None)) -> dict:
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


def _write_folder(out: Path, save, metrics: dict) -> None:
    """Write into a temporary sibling, then swap it in: a crash never leaves a half-written tokenizer folder."""
    from harness.atomic import write_json

    out = out.expanduser()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        save(tmp)
        write_json(tmp / "metrics.json", metrics)
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            out.rename(old)
            shutil.rmtree(old)
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _print_metrics(metrics: dict, where: str) -> None:
    shown = {k: metrics[k] for k in ("kind", "psnr", "codebook_usage", "oracle_exact", "rfid", "steps", "train_s",
                                     "steps_per_s", "wall_s") if k in metrics}
    print(json.dumps(shown, indent=2))
    print(f"wrote {where}")
