"""CLI: `fluidbench eval geneval|fid|clipscore --run RUN`: sample from a run's EMA weights and score."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

RUN = typer.Option(..., "--run", help="Run folder written by `fluidbench train`.")
CFG = typer.Option(None, "--cfg", help="Guidance scale (default: the variant's paper value).")
TEMPERATURE = typer.Option(None, "--temperature", help="Sampling temperature (default: the paper's).")
STEPS = typer.Option(None, "--steps", help="Random-order reveal steps (default 64; raster always takes L).")
HEAD_STEPS = typer.Option(None, "--head-steps", help="Diffusion-head sampling steps (default 100).")
X0_CLIP = typer.Option(None, "--x0-clip", min=0.0, help="Clamp the diffusion head's predicted x0 to +-X each "
                       "step (default: the variant's; none = MAR's unclipped sampler).")
BATCH = typer.Option(64, "--batch-size", min=1, help="Captions sampled per batch.")
SEED = typer.Option(0, "--seed", help="Sampling seed.")
DEVICE = typer.Option(None, "--device", help="cpu, cuda, cuda:1 ... (default: cuda when available).")


def _settings(cfg, temperature, steps, head_steps, batch_size, seed, x0_clip=None):
    from eval.sampling import SamplingSettings

    return SamplingSettings(cfg_scale=cfg, temperature=temperature, steps=steps, head_steps=head_steps,
                            x0_clip=x0_clip, batch_size=batch_size, seed=seed)


def geneval(run: Path = RUN,
            prompts: Optional[Path] = typer.Option(None, "--prompts", help="GenEval-format metadata file "
                                                   "(default: the run's ShapesT2I prompts, else GenEval's 553)."),
            per_prompt: int = typer.Option(4, "--n", min=1, help="Images per prompt (GenEval: 4)."),
            detector: Optional[str] = typer.Option(None, "--detector", help="shapes-oracle | hf-mask2former | "
                                                   "mmdet (default: shapes-oracle for ShapesT2I, else mmdet)."),
            detector_path: Optional[str] = typer.Option(None, "--detector-path", help="Detector weights."),
            clip_path: Optional[str] = typer.Option(None, "--clip-path", help="CLIP ViT-L/14 weights (colours)."),
            cfg: Optional[float] = CFG, temperature: Optional[float] = TEMPERATURE, steps: Optional[int] = STEPS,
            head_steps: Optional[int] = HEAD_STEPS, x0_clip: Optional[float] = X0_CLIP,
            batch_size: int = BATCH, seed: int = SEED,
            device: Optional[str] = DEVICE) -> None:
    """GenEval of a run: generate in the official folder layout, score, write RUN/eval/geneval.json."""
    from eval.run_eval import eval_geneval

    r = eval_geneval(run, prompts=prompts, per_prompt=per_prompt, detector=detector, detector_path=detector_path,
                     clip_path=clip_path,
                     settings=_settings(cfg, temperature, steps, head_steps, batch_size, seed, x0_clip),
                 device=device)
    tasks = " ".join(f"{t}={r[t]:.3f}" for t in ("single_object", "two_object", "counting", "colors", "position",
                                                   "color_attr") if t in r)
    typer.echo(f"geneval overall={r['overall']:.4f} {tasks} ({r['sampling_stats']['seconds_per_image']:.3f} "
               f"s/img) -> {run / 'eval' / 'geneval.json'}")


DATA_KIND = typer.Option(None, "--data-kind", help="Real images and captions from another data set than the "
                         "run's (coco | shapes | wds), with --data-path and --split (COCO-30K: coco, train2014).")
DATA_PATH = typer.Option(None, "--data-path", help="That data set's folder (or shard pattern).")


def fid(run: Path = RUN,
        n: int = typer.Option(1000, "--n", min=2, help="Samples and real images (COCO-30K: 30000)."),
        split: Optional[str] = typer.Option(None, "--split", help="Captions and real images from this split "
                                            "(default: the run's validation split)."),
        data_seed: int = typer.Option(0, "--data-seed", help="Which N images / captions (seeded sample)."),
        data_kind: Optional[str] = DATA_KIND, data_path: Optional[str] = DATA_PATH,
        extractor: Optional[str] = typer.Option(None, "--extractor", help="inception | shapes (default: shapes "
                                                "for ShapesT2I, else inception)."),
        weights: Optional[str] = typer.Option(None, "--weights", "--inception-weights", "--features",
                                              help="Extractor weights: Inception .pth or a train-features folder."),
        cache: Optional[Path] = typer.Option(None, "--cache", help="Reference statistics folder."),
        cfg: Optional[float] = CFG, temperature: Optional[float] = TEMPERATURE, steps: Optional[int] = STEPS,
        head_steps: Optional[int] = HEAD_STEPS, x0_clip: Optional[float] = X0_CLIP,
        batch_size: int = BATCH, seed: int = SEED,
        device: Optional[str] = DEVICE) -> None:
    """FID of a run's samples against the same captions' real images; writes RUN/eval/fid.json."""
    from eval.run_eval import eval_fid

    r = eval_fid(run, n=n, split=split, seed=data_seed, data_kind=data_kind, data_path=data_path,
                 extractor=extractor, weights=weights, cache_dir=cache,
                 settings=_settings(cfg, temperature, steps, head_steps, batch_size, seed, x0_clip),
                 device=device)
    typer.echo(f"fid={r['fid']:.3f} (n={r['n_images']}, {r['protocol']['extractor']}) -> {run / 'eval' / 'fid.json'}")


def clipscore(run: Path = RUN,
              n: int = typer.Option(1000, "--n", min=1, help="Samples (captions of the validation split)."),
              split: Optional[str] = typer.Option(None, "--split"),
              data_seed: int = typer.Option(0, "--data-seed"),
              data_kind: Optional[str] = DATA_KIND, data_path: Optional[str] = DATA_PATH,
              model: Optional[str] = typer.Option(None, "--clip-model", help="open_clip architecture."),
              weights: Optional[str] = typer.Option(None, "--clip-weights", help="Local open_clip checkpoint."),
              cfg: Optional[float] = CFG, temperature: Optional[float] = TEMPERATURE, steps: Optional[int] = STEPS,
              head_steps: Optional[int] = HEAD_STEPS, x0_clip: Optional[float] = X0_CLIP,
              batch_size: int = BATCH, seed: int = SEED,
              device: Optional[str] = DEVICE) -> None:
    """CLIP score of a run's samples against their captions; writes RUN/eval/clipscore.json."""
    from eval.run_eval import eval_clipscore

    r = eval_clipscore(run, n=n, split=split, seed=data_seed, data_kind=data_kind, data_path=data_path,
                       model=model, weights=weights,
                       settings=_settings(cfg, temperature, steps, head_steps, batch_size, seed, x0_clip),
                 device=device)
    typer.echo(f"clip_score={r['clip_score']:.3f} (n={r['n_images']}) -> {run / 'eval' / 'clipscore.json'}")


def register(app: typer.Typer) -> None:
    app.command("geneval")(geneval)
    app.command("fid")(fid)
    app.command("clipscore")(clipscore)
