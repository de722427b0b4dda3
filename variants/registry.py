"""The four variants, the size ladders, and `build_variant`.

A variant is a pair (order, head); a rung of a ladder fixes the backbone's blocks, width and heads plus the
depth of the text aligner and of the diffusion head. Everything else is an option with a documented default.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from typing import Iterator

import torch
from torch import nn

from variants.backbone import Backbone
from variants.diffusion import SOLVERS
from variants.heads import CategoricalHead, DiffusionHead
from variants.orders import RandomOrder, RasterOrder
from variants.variant import REVEALS, Variant

VARIANTS = {"vq-raster": (RasterOrder, CategoricalHead), "vq-random": (RandomOrder, CategoricalHead),
            "kl-raster": (RasterOrder, DiffusionHead), "kl-random": (RandomOrder, DiffusionHead)}

# Paper appendix (Fan et al. 2024): (cfg scale, temperature) per variant
GUIDANCE = {"kl-random": (5.0, 0.975), "kl-raster": (4.5, 0.975), "vq-random": (1.6, 1.05), "vq-raster": (2.5, 0.95)}


@dataclass(frozen=True)
class Rung:
    """One model size: backbone blocks / width / heads, text-aligner and diffusion-head depths."""
    name: str
    blocks: int
    width: int
    heads: int
    aligner_blocks: int = 6
    head_blocks: int = 6


LADDERS = {
    # Fluid's appendix; a 6-block aligner and a 6-block diffusion MLP at the backbone width: a decomposition
    # that fits the paper's parameter counts within a few percent (the paper does not state it)
    "paper": [Rung("166M", 12, 768, 12), Rung("369M", 16, 1024, 16), Rung("665M", 20, 1280, 16),
              Rung("1.1B", 24, 1536, 16), Rung("3.1B", 32, 2304, 24), Rung("10.5B", 34, 4096, 64)],
    # The embedded sweeps on a 2-core CPU at 64 tokens: ~0.03M to ~4M parameters. The rungs named blocks x
    # width sit between the letter sizes: the embedded sweep trains cpu-2xs / xs / 2x48 / s (27k-308k
    # non-embedding parameters, ~2x apart) for 800 steps (docs/recipe.md, section 5), and the
    # IsoFLOP sweep's smallest budget is best spent on cpu-2xs
    # cpu-3xs (width 8, ~10k kl parameters): run by the IsoFLOP sweep to bracket kl-random's minimum, which lay
    # below cpu-2xs with three sizes; kl-random plateaus there (a width-8 head; README, IsoFLOP section)
    "cpu": [Rung("cpu-3xs", 2, 8, 2, aligner_blocks=1, head_blocks=2),
            Rung("cpu-2xs", 2, 16, 2, aligner_blocks=1, head_blocks=2),
            Rung("cpu-xs", 2, 32, 2, aligner_blocks=1, head_blocks=2),
            Rung("cpu-2x48", 2, 48, 3, aligner_blocks=1, head_blocks=2),
            Rung("cpu-s", 3, 64, 4, aligner_blocks=1, head_blocks=2),
            Rung("cpu-3x96", 3, 96, 4, aligner_blocks=1, head_blocks=2),
            Rung("cpu-m", 4, 128, 4, aligner_blocks=2, head_blocks=3),
            Rung("cpu-l", 6, 192, 6, aligner_blocks=2, head_blocks=3)],
}
# The name the embedded IsoFLOP spec was written with, from when cpu-2xs was not yet on the CPU ladder
LADDERS["cpu-isoflop"] = LADDERS["cpu"]

# Token and text shapes each ladder is meant for (used to count parameters for `fluidbench variants`):
# paper = 256 tokens, aMUSEd VQ 8192 codes, SD-VAE 2x2 patches of 4 channels, T5-XXL (D 4096, 128 tokens);
# cpu = 8x8 grid on 32x32 ShapesT2I, a 512-code VQ, 8 latent channels (our tokenizers' defaults), MiniLM
# (D 384, 32 tokens).
LADDER_SHAPES = {"paper": {"seq_len": 256, "vocab_size": 8192, "token_dim": 16, "text_dim": 4096, "text_len": 128},
                 "cpu": {"seq_len": 64, "vocab_size": 512, "token_dim": 8, "text_dim": 384, "text_len": 32}}
LADDER_SHAPES["cpu-isoflop"] = LADDER_SHAPES["cpu"]

RUNG_FIELDS = ("blocks", "width", "heads", "aligner_blocks", "head_blocks")

OPTIONS = {
    "text_dropout": 0.1,          # p of replacing a caption by the null text in training (guidance)
    "text_len": None,             # text tokens assumed by the FLOP accounting (None: the ladder's)
    "blocks": None,               # these five override the rung's (None: the rung's), for custom sizes
    "width": None,
    "heads": None,
    "aligner_blocks": None,
    "head_blocks": None,          # diffusion head depth
    "head_width": None,           # diffusion head width; None: the backbone width
    "mlp_ratio": 4.0,
    "grid_bias": 0.0,             # > 0: a fixed 2D distance bias in image self-attention, head h slope grid_bias * 2^-h
    "diffusion_batch_mul": 4,     # MAR: each target repeated 4x with independent t and noise
    "diffusion_steps": 1000,      # training timesteps
    "mask_ratio": "truncnorm",    # random order: "truncnorm" (MAR, per batch) or "cosine" (MaskGIT, per sample)
    "mask_ratio_min": 0.7,
    "top_k": None,                # categorical sampling
    "cfg_scale": None,            # None: the paper's default for the variant
    "temperature": None,
    "steps": 64,                  # random-order reveal steps (capped at seq_len); raster always takes seq_len
    "head_steps": 100,            # diffusion head sampling steps
    "x0_clip": None,              # diffusion head: clamp predicted x0 to +-x0_clip each step (None: MAR, unclipped)
    "head_solver": "ddpm",        # diffusion head sampler: ddpm (MAR), ddim or dpm++ (variants/diffusion.py)
    "reveal": "random",           # random order: which positions a step writes, random (MAR) or confidence (MaskGIT, vq)
}


def find_rung(size: str, ladder: str = "cpu") -> Rung:
    """The rung called `size` in `ladder`; a one-line error listing the choices otherwise."""
    if ladder not in LADDERS:
        raise ValueError(f"unknown ladder {ladder!r}: choose from {', '.join(LADDERS)}")
    for rung in LADDERS[ladder]:
        if rung.name == size:
            return rung
    others = [name for name, rungs in LADDERS.items() if any(r.name == size for r in rungs)]
    hint = f" (it is in ladder {others[0]!r})" if others else ""
    raise ValueError(f"unknown size {size!r} for ladder {ladder!r}{hint}: choose from "
                     f"{', '.join(r.name for r in LADDERS[ladder])}")


def build_variant(name: str, size: str, *, seq_len: int, vocab_size: int, token_dim: int, text_dim: int,
                  ladder: str = "cpu", **options) -> Variant:
    """Build one of the four variants at one rung. `variant.config` holds these arguments for a rebuild."""
    if name not in VARIANTS:
        raise ValueError(f"unknown variant {name!r}: choose from {', '.join(VARIANTS)}")
    unknown = sorted(set(options) - set(OPTIONS))
    if unknown:
        raise ValueError(f"unknown variant option {unknown[0]!r}: choose from {', '.join(OPTIONS)}")
    o = OPTIONS | options
    if not isinstance(o["grid_bias"], (int, float)) or o["grid_bias"] < 0:
        raise ValueError(f"grid_bias must be a number >= 0 (0 = off), got {o['grid_bias']!r}")
    if o["head_solver"] not in SOLVERS:
        raise ValueError(f"head_solver must be one of {', '.join(SOLVERS)}, got {o['head_solver']!r}")
    if o["reveal"] not in REVEALS or (o["reveal"] == "confidence" and VARIANTS[name][1] is DiffusionHead):
        raise ValueError(f"reveal must be one of {', '.join(REVEALS)} (confidence: vq variants only), "
                         f"got {o['reveal']!r} for {name}")
    rung = replace(find_rung(size, ladder), **{k: o[k] for k in RUNG_FIELDS if o[k] is not None})
    order_cls, head_cls = VARIANTS[name]
    W = rung.width
    backbone = Backbone(seq_len=seq_len, width=W, blocks=rung.blocks, heads=rung.heads, text_dim=text_dim,
                        aligner_blocks=rung.aligner_blocks, mlp_ratio=o["mlp_ratio"],
                        grid_bias_slope=float(o["grid_bias"]))
    if order_cls is RandomOrder:
        order = RandomOrder(W, seq_len, mask_ratio=o["mask_ratio"], mask_ratio_min=o["mask_ratio_min"],
                            default_steps=o["steps"])
    else:
        order = RasterOrder(W, seq_len)
    if head_cls is DiffusionHead:
        head = DiffusionHead(W, token_dim, blocks=rung.head_blocks, head_width=o["head_width"],
                             batch_mul=o["diffusion_batch_mul"], train_steps=o["diffusion_steps"])
        head_steps = o["head_steps"]
    else:
        head = CategoricalHead(W, vocab_size, top_k=o["top_k"])
        head_steps = 0
    cfg, temperature = GUIDANCE[name]
    defaults = {"cfg_scale": cfg if o["cfg_scale"] is None else o["cfg_scale"],
                "temperature": temperature if o["temperature"] is None else o["temperature"],
                "steps": order.default_steps(), "head_steps": head_steps,
                "x0_clip": o["x0_clip"] if head_cls is DiffusionHead else None,
                "head_solver": o["head_solver"] if head_cls is DiffusionHead else None,
                "reveal": o["reveal"] if order_cls is RandomOrder else None}
    config = {"name": name, "size": size, "ladder": ladder, "seq_len": seq_len, "vocab_size": vocab_size,
              "token_dim": token_dim, "text_dim": text_dim, **options}
    text_len = o["text_len"] or LADDER_SHAPES[ladder]["text_len"]
    return Variant(name, order=order, head=head, backbone=backbone, vocab_size=vocab_size, token_dim=token_dim,
                   defaults=defaults, config=config, text_dropout=o["text_dropout"], text_len=text_len)


@contextmanager
def empty_weights() -> Iterator[None]:
    """Build modules on the meta device without running their initialisers: shapes only, nothing allocated
    (10.5B is fine), and ~4x faster, since meta-tensor initialisers run through Python decompositions.
    Like accelerate's init_empty_weights; the patch of torch.nn.init is undone on exit."""
    names = ("uniform_", "normal_", "zeros_", "ones_", "xavier_uniform_", "kaiming_uniform_", "trunc_normal_")
    saved = {n: getattr(nn.init, n) for n in names}
    try:
        for n in names:
            setattr(nn.init, n, lambda tensor, *args, **kwargs: tensor)
        with torch.device("meta"):
            yield
    finally:
        for n, fn in saved.items():
            setattr(nn.init, n, fn)


def ladder_table(ladder: str) -> list[dict]:
    """Each rung of `ladder` with the total parameters of every variant at the ladder's token/text shapes."""
    shapes = {k: v for k, v in LADDER_SHAPES[ladder].items() if k != "text_len"}
    rows = []
    for rung in LADDERS[ladder]:
        params = {}
        for name in VARIANTS:
            with empty_weights():
                params[name] = build_variant(name, rung.name, ladder=ladder, **shapes).param_counts()["total"]
        rows.append({**{k: v for k, v in asdict(rung).items() if k in ("name", "blocks", "width", "heads")},
                     "params": params})
    return rows
