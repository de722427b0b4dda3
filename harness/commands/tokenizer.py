"""CLI: `fluidbench tokenizer train|eval`: our own VQ/KL tokenizers on ShapesT2I and reconstruction reports."""
from __future__ import annotations

import json
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
        steps: Optional[int] = typer.Option(None, "--steps",
                                            help="training steps [default: vq 1800, kl 1900]"),
        budget_s: Optional[float] = typer.Option(None, "--budget-s",
                                                 help="also stop at this wall-clock budget of the training loop "
                                                      "(the result then depends on the machine) [default: none]"),
        min_steps: Optional[int] = typer.Option(None, "--min-steps",
                                                help="with --budget-s: train at least this many steps [default: 500]"),
        seed: int = typer.Option(0, "--seed"),
        grid: Optional[int] = typer.Option(None, "--grid", help="tokens per side [default: 8]"),
        patch: Optional[int] = typer.Option(None, "--patch", help="kl: p x p latent patch per token [default: 1]"),
        codebook_size: Optional[int] = typer.Option(None, "--codebook-size",
                                                    help="vq codebook entries [default: 512]"),
        latent_channels: Optional[int] = typer.Option(None, "--latent-channels",
                                                      help="kl latent channels / vq code dimension"),
        batch_size: Optional[int] = typer.Option(None, "--batch-size"),
        lr: Optional[float] = typer.Option(None, "--lr"),
        blank_fraction: float = typer.Option(0.0, "--blank-fraction",
                                             help="share of training images made blank (the data's background "
                                                  "only), so the tokenizer can represent an image without an "
                                                  "object [default: 0]"),
        local: bool = typer.Option(False, "--local", help="encode each token's pixel patch alone, so a token depends "
                                   "on its own pixels only (the decoder sees every token) [default: the encoder "
                                   "sees the whole image]"),
        threads: int = typer.Option(0, "--threads", help="torch threads while training (0 = torch's default, "
                                                          "one per core; the count is part of the result: sums "
                                                          "split over threads round differently)"),
    ) -> None:
        """Train a VQ or KL tokenizer on ShapesT2I; writes OUT/tokenizer.json, OUT/model/, OUT/metrics.json."""
        from harness.tokenizer_folder import TokenizerTrainOptions, train_tokenizer_folder

        options = TokenizerTrainOptions(steps=steps, budget_s=budget_s, min_steps=min_steps, seed=seed, grid=grid,
                                        patch=patch, codebook_size=codebook_size, latent_channels=latent_channels,
                                        batch_size=batch_size, lr=lr, blank_fraction=blank_fraction,
                                        local=local, threads=threads)
        metrics = train_tokenizer_folder(kind, data, out, options)
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
        from harness.data import open_dataset, profile
        from harness.tokenizer_folder import evaluate_reconstruction
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
        oracle = profile(data_kind).scene_oracle and (data / "manifest.json").is_file()
        metrics = evaluate_reconstruction(tokenizer, images, shapes=oracle,
                            fid=(fid_extractor, fid_weights))
        metrics.update(tokenizer=str(tokenizer_path), data=str(data), split=split, kind=tokenizer.kind,
                       seq_len=tokenizer.seq_len)
        if out is None:
            out = (tokenizer_path / "recon_eval.json") if tokenizer_path.is_dir() \
                else tokenizer_path.with_suffix(".recon_eval.json")
        write_json(out, metrics)
        _print_metrics(metrics, str(out))


def _print_metrics(metrics: dict, where: str) -> None:
    shown = {k: metrics[k] for k in ("kind", "psnr", "blank_psnr", "codebook_usage", "oracle_exact", "rfid", "steps",
                                     "train_s", "steps_per_s", "wall_s") if k in metrics}
    print(json.dumps(shown, indent=2))
    print(f"wrote {where}")
