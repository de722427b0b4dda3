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
    batch_size: int = flag(64, "--batch-size", help="Captions sampled per batch.", min=1)
    seed: int = flag(0, "--seed", help="Sampling seed.")

    def resolved(self, variant: Any) -> dict:
        """The settings actually used, with the variant's defaults filled in (recorded with every result)."""
        out = asdict(self)
        for key in ("cfg_scale", "temperature", "steps", "head_steps", "x0_clip"):
            if out[key] is None:
                out[key] = variant.defaults.get(key)
        return out


DATA_KIND_HELP = ("Real images and captions from another data set than the run's (coco | shapes | wds), with "
                  "--data-path and --split (COCO-30K: coco, train2014).")


@dataclass
class FIDSettings:
    """eval.run_eval.eval_fid: N samples for N captions against the same N real images."""

    n: int = flag(1000, "--n", help="Samples and real images (COCO-30K: 30000).", min=2)
    split: str | None = flag(None, "--split", help="Captions and real images from this split (default: the "
                             "run's validation split).")
    seed: int = flag(0, "--data-seed", help="Which N images / captions (seeded sample).")
    data_kind: str | None = flag(None, "--data-kind", help=DATA_KIND_HELP)
    data_path: str | None = flag(None, "--data-path", help="That data set's folder (or shard pattern).")
    extractor: str | None = flag(None, "--extractor", help="inception | shapes (default: shapes for ShapesT2I, "
                                 "else inception).")
    weights: str | None = flag(None, "--weights", "--inception-weights", "--features",
                               help="Extractor weights: Inception .pth or a train-features folder.")
    cache_dir: str | None = flag(None, "--cache", help="Reference statistics folder.")


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
