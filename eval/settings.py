"""The settings of each evaluation, as dataclasses (no torch here: a spec, the CLI and the report read them).

A field's `metadata` carries its command-line flags and help (`flag(...)`): `fluidbench eval <metric>` is
built from these fields (harness/commands/eval_run.py) and a sweep job's command line from the values its
spec sets, so the two cannot drift apart. Each dataclass mirrors the keyword arguments of its function in
eval/run_eval.py; a field's default is that function's.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


def flag(default: Any, *flags: str, help: str = "", min: float | None = None) -> Any:
    """A settings field with its command-line flags (the first one is what sweep command lines write)."""
    return field(default=default, metadata={"flags": flags, "help": help, "min": min})


@dataclass
class SamplingSettings:
    """Guidance, temperature and step counts; None means the variant's own (paper) default."""

    cfg_scale: float | None = flag(None, "--cfg", help="Guidance scale (default: the variant's paper value).")
    temperature: float | None = flag(None, "--temperature", help="Sampling temperature (default: the paper's).")
    steps: int | None = flag(None, "--steps", help="Random-order reveal steps (default 64; raster always takes L).")
    head_steps: int | None = flag(None, "--head-steps", help="Diffusion-head sampling steps (default 100).")
    x0_clip: float | None = flag(None, "--x0-clip", min=0.0, help="Clamp the diffusion head's predicted x0 to +-X "
                                 "each step (default: the variant's; none = MAR's unclipped sampler).")
    head_solver: str | None = flag(None, "--head-solver", help="Diffusion-head sampler: ddpm, ddim or dpm++ "
                                   "(default: the variant's, ddpm).")
    reveal: str | None = flag(None, "--reveal", help="Random order: which positions each step writes, random "
                              "(MAR) or confidence (MaskGIT, vq only) (default: the variant's, random).")
    batch_size: int = flag(64, "--batch-size", help="Captions sampled per batch.", min=1)
    seed: int = flag(0, "--seed", help="Sampling seed.")

    def resolved(self, variant: Any) -> dict:
        """The settings actually used, with the variant's defaults filled in (recorded with every result)."""
        out = asdict(self)
        for key in ("cfg_scale", "temperature", "steps", "head_steps", "x0_clip", "head_solver", "reveal"):
            if out[key] is None:
                out[key] = variant.defaults.get(key)
        return out


DATA_KIND_HELP = ("Real images and captions from another data set than the run's (coco | shapes | wds), with "
                  "--data-path and --split (COCO-30K: coco, train2014).")


@dataclass
class FIDSettings:
    """eval.run_eval.eval_fid: N samples for N captions against real images, scored by the metric panel."""

    n: int | None = flag(None, "--n", help="Samples and real images (default 1000; a --protocol's own, 30000).",
                         min=2)
    split: str | None = flag(None, "--split", help="Captions and real images from this split (default: the "
                             "run's validation split).")
    seed: int = flag(0, "--data-seed", help="Which N images / captions (seeded sample).")
    data_kind: str | None = flag(None, "--data-kind", help=DATA_KIND_HELP)
    data_path: str | None = flag(None, "--data-path", help="That data set's folder (or shard pattern).")
    protocol: str | None = flag(None, "--protocol", help="A published COCO protocol (docs/protocols.md): fluid "
                                "(30K train2014 captions vs the same images) | imagen (30K val2014 prompts vs "
                                "all of val2014); with --data-path, the COCO folder.")
    extractor: str | None = flag(None, "--extractor", help="inception | shapes | dinov2-vit-{s,b,l,g}-14 | clip "
                                 "(default: shapes for ShapesT2I, else inception).")
    weights: str | None = flag(None, "--weights", "--inception-weights", "--features",
                               help="Extractor weights: Inception .pth, a train-features folder, DINOv2 .pth or "
                               "an open_clip checkpoint.")
    cache_dir: str | None = flag(None, "--cache", help="Reference statistics folder.")
    metrics: str | None = flag(None, "--metrics", help="Comma-separated panel metrics (eval/panel.py; default "
                               "fid,kid,precision,recall,density,coverage).")
    n_boot: int = flag(100, "--n-boot", help="Bootstrap replicates for the standard errors (0 = none).", min=0)
    floor: bool | None = flag(None, "--floor/--no-floor", help="Also score N real images of the other split "
                              "(default: on for ShapesT2I).")

    def images(self) -> int:
        """Images sampled with these settings."""
        return self.n or (30000 if self.protocol else 1000)


@dataclass
class FDDinoV2Settings(FIDSettings):
    """FID on DINOv2 ViT features (FD-DINOv2, Stein et al. 2023): eval_fid with torch-fidelity's DINOv2."""

    extractor: str | None = flag("dinov2-vit-l-14", "--extractor", help="dinov2-vit-{s,b,l,g}-14.")
    weights: str | None = flag(None, "--weights", help="dinov2_vit?14_pretrain.pth (default: torch.hub's "
                               "checkpoints folder).")
    metrics: str | None = flag("fid", "--metrics", help="Comma-separated panel metrics on DINOv2 features.")


@dataclass
class CMMDSettings(FIDSettings):
    """CMMD (Jayasumana et al. 2024): eval_fid on CLIP ViT-L/14-336 embeddings with the RBF MMD."""

    extractor: str | None = flag("clip", "--extractor", help="clip (ViT-L-14-336-quickgelu, OpenAI weights) or "
                                 "clip-<open_clip model>.")
    weights: str | None = flag(None, "--weights", "--clip-weights", help="Local open_clip checkpoint (default: "
                               "open_clip's cache).")
    metrics: str | None = flag("cmmd", "--metrics", help="Comma-separated panel metrics on CLIP embeddings.")


@dataclass
class GenEvalSettings:
    """eval.run_eval.eval_geneval: the official folder layout, scored by a detector."""

    prompts: str | None = flag(None, "--prompts", help="GenEval-format metadata file (default: the run's "
                               "ShapesT2I prompts, else GenEval's 553).")
    per_prompt: int = flag(4, "--n", help="Images per prompt (GenEval: 4).", min=1)
    detector: str | None = flag(None, "--detector", help="shapes-oracle | hf-mask2former | mmdet (default: "
                                "shapes-oracle for ShapesT2I, else mmdet).")
    detector_path: str | None = flag(None, "--detector-path", help="Detector weights.")
    clip_path: str | None = flag(None, "--clip-path", help="CLIP ViT-L/14 weights (colours).")


@dataclass
class CLIPScoreSettings:
    """eval.run_eval.eval_clipscore: N samples against their captions."""

    n: int = flag(1000, "--n", help="Samples (captions of the validation split).", min=1)
    split: str | None = flag(None, "--split")
    seed: int = flag(0, "--data-seed")
    data_kind: str | None = flag(None, "--data-kind", help=DATA_KIND_HELP)
    data_path: str | None = flag(None, "--data-path", help="That data set's folder (or shard pattern).")
    model: str | None = flag(None, "--clip-model", help="open_clip architecture.")
    weights: str | None = flag(None, "--clip-weights", help="Local open_clip checkpoint.")


@dataclass
class ContextSettings:
    """eval.context.eval_context: the loss against the number of image tokens known (no sampling)."""

    known: str = flag("0,0.125,0.5,1", "--known", help="Comma-separated fractions of the image tokens known "
                      "(each rounded, at most L - 1).")
    size: int = flag(500, "--size", help="Validation images (0 = all).", min=0)
    batch_size: int = flag(250, "--context-batch-size", help="Validation images per batch.", min=1)
    seed: int = flag(1234, "--context-seed", help="Seed of the orders, kl token draws, timesteps and noise.")
