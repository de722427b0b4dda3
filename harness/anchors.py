"""`fluidbench bench --anchor-configs`: our variants against the anchors' own code, timed interleaved.

The anchors are MAR (`LTH14/mar`: `models/mar.py`, `models/diffloss.py`) for continuous tokens and LlamaGen
(`FoundationVision/LlamaGen`: `autoregressive/models/gpt.py`, `generate.py`) for discrete ones, imported from
local checkouts given by `--mar-root` / `--llamagen-root` (never vendored, never needed by the tests). All
models share one configuration, the closest each codebase allows (ANCHOR below): batch 64, 8x8 = 64 tokens,
width 128, fp32, eager, guidance 2 for everyone. Ours are built with `build_variant` (4 blocks at width 128, a
2-block diffusion head, no text aligner: the anchors are class-conditional, ours read a short fixed text of
8 real tokens by cross-attention). MAR: encoder and decoder 2 + 2 blocks at 128, buffer 64, DiffLoss 2 x 128,
batch_mul 4, 16 AR steps, 50 head steps. LlamaGen: 4 layers at 128, vocabulary 1024, its KV cache.

Each measurement alternates ours and the anchor's (a b a b ...), so both see the same load on a shared
machine, and reports medians and the ratio anchor / ours (> 1: ours is faster), in wall and in process CPU
time. MAR calls `.cuda()` inside its methods; on a CPU those calls are made no-ops for the anchor's calls only.
"""
from __future__ import annotations

import importlib
import statistics
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch

from harness.errors import FluidbenchError

ANCHOR = dict(batch=64, seq_len=64, grid=8, width=128, heads=4, blocks=4, token_dim=16, vocab_size=1024,
              text_len=8, text_dim=384, ar_steps=16, head_steps=50, cfg=2.0, temperature=1.0,
              mar=dict(encoder_depth=2, decoder_depth=2, buffer_size=64, diffloss_d=2, diffloss_w=128,
                       diffusion_batch_mul=4),
              llamagen=dict(n_layer=4))
# (ours, anchor) pairs of the issue-14 table, plus kl-raster against MAR
PAIRS = [("kl-random", "mar"), ("kl-raster", "mar"), ("vq-raster", "llamagen")]


def build_ours(name: str, *, head_solver: str = "ddpm", head_steps: int | None = None) -> torch.nn.Module:
    from variants.registry import build_variant
    a = ANCHOR
    return build_variant(name, "cpu-m", seq_len=a["seq_len"], vocab_size=a["vocab_size"], token_dim=a["token_dim"],
                         text_dim=a["text_dim"], text_len=a["text_len"], blocks=a["blocks"], width=a["width"],
                         heads=a["heads"], aligner_blocks=0, head_blocks=2, steps=a["ar_steps"],
                         head_steps=head_steps or a["head_steps"], cfg_scale=a["cfg"],
                         temperature=a["temperature"], head_solver=head_solver)


@contextmanager
def _on_path(root: Path, modules: tuple[str, ...]) -> Iterator[None]:
    """`root` first on sys.path while importing an anchor (its top-level packages: models, diffusion, ...)."""
    sys.path.insert(0, str(root))
    try:
        yield
    finally:
        sys.path.remove(str(root))


@contextmanager
def cuda_calls_are_noops() -> Iterator[None]:
    """MAR hard-codes `.cuda()` in its methods; on a CPU, make them return the tensor for the duration."""
    if torch.cuda.is_available():
        yield
        return
    saved = torch.Tensor.cuda
    torch.Tensor.cuda = lambda self, *args, **kwargs: self  # type: ignore[method-assign]
    try:
        yield
    finally:
        torch.Tensor.cuda = saved  # type: ignore[method-assign]


def build_mar(root: Path) -> torch.nn.Module:
    if not (root / "models" / "mar.py").is_file():
        raise FluidbenchError(f"--mar-root {root}: no models/mar.py (a checkout of github.com/LTH14/mar)")
    with _on_path(root, ("models", "diffusion")):
        MAR = importlib.import_module("models.mar").MAR
    a, m = ANCHOR, ANCHOR["mar"]
    return MAR(img_size=a["grid"] * 16, vae_stride=16, patch_size=1, encoder_embed_dim=a["width"],
               encoder_depth=m["encoder_depth"], encoder_num_heads=a["heads"], decoder_embed_dim=a["width"],
               decoder_depth=m["decoder_depth"], decoder_num_heads=a["heads"], vae_embed_dim=a["token_dim"],
               attn_dropout=0.0, proj_dropout=0.0, buffer_size=m["buffer_size"], diffloss_d=m["diffloss_d"],
               diffloss_w=m["diffloss_w"], num_sampling_steps=str(a["head_steps"]),
               diffusion_batch_mul=m["diffusion_batch_mul"])


def build_llamagen(root: Path) -> torch.nn.Module:
    if not (root / "autoregressive" / "models" / "gpt.py").is_file():
        raise FluidbenchError(f"--llamagen-root {root}: no autoregressive/models/gpt.py (a checkout of "
                              "github.com/FoundationVision/LlamaGen)")
    with _on_path(root, ("autoregressive", "utils")):
        gpt = importlib.import_module("autoregressive.models.gpt")
    a = ANCHOR
    args = gpt.ModelArgs(dim=a["width"], n_layer=ANCHOR["llamagen"]["n_layer"], n_head=a["heads"],
                         vocab_size=a["vocab_size"], block_size=a["seq_len"], cls_token_num=1, model_type="c2i",
                         resid_dropout_p=0.0, ffn_dropout_p=0.0, token_dropout_p=0.0)
    return gpt.Transformer(args)


def _llamagen_generate(root: Path) -> Callable:
    with _on_path(root, ("autoregressive", "utils")):
        return importlib.import_module("autoregressive.models.generate").generate


def _interleaved(fns: dict[str, Callable[[], Any]], reps: int) -> dict[str, dict]:
    """Medians of `reps` calls of each function, called in turn (a b a b ...) after one warm-up each."""
    for fn in fns.values():
        fn()
    times: dict[str, list[tuple[float, float]]] = {k: [] for k in fns}
    for _ in range(reps):
        for key, fn in fns.items():
            w0, c0 = time.perf_counter(), time.process_time()
            fn()
            times[key].append((time.perf_counter() - w0, time.process_time() - c0))
    return {k: dict(wall_s=statistics.median(w for w, _ in v), cpu_s=statistics.median(c for _, c in v),
                    wall_all=[round(w, 4) for w, _ in v]) for k, v in times.items()}


def _train_step(model: torch.nn.Module, loss_fn: Callable[[], torch.Tensor]) -> Callable[[], None]:
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.02, fused=True)

    def step() -> None:
        model.train()
        loss = loss_fn()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return step


def _ours(name: str) -> tuple[Callable, Callable, int]:
    a, B = ANCHOR, ANCHOR["batch"]
    torch.manual_seed(0)
    v = build_ours(name)
    g = torch.Generator().manual_seed(0)
    text, mask = torch.randn(B, a["text_len"], a["text_dim"], generator=g), torch.ones(B, a["text_len"], dtype=torch.bool)
    tokens = v.random_tokens(B, g, torch.device("cpu"))
    train = _train_step(v, lambda: v(tokens, text, mask, g))

    def sample() -> None:
        v.eval()
        v.sample(text, mask, generator=torch.Generator().manual_seed(1))
    return train, sample, v.param_counts()["total"]


def _mar(root: Path) -> tuple[Callable, Callable, int]:
    a, B = ANCHOR, ANCHOR["batch"]
    torch.manual_seed(0)
    np.random.seed(0)
    model = build_mar(root)
    latents = torch.randn(B, a["token_dim"], a["grid"], a["grid"])
    labels = torch.randint(0, 1000, (B,))
    step = _train_step(model, lambda: model(latents, labels))

    def train() -> None:
        with cuda_calls_are_noops():
            step()

    @torch.no_grad()
    def sample() -> None:
        model.eval()
        with cuda_calls_are_noops():
            model.sample_tokens(B, num_iter=a["ar_steps"], cfg=a["cfg"], cfg_schedule="linear", labels=labels,
                                temperature=a["temperature"])
    return train, sample, sum(p.numel() for p in model.parameters())


def _llamagen(root: Path) -> tuple[Callable, Callable, int]:
    a, B = ANCHOR, ANCHOR["batch"]
    torch.manual_seed(0)
    model = build_llamagen(root)
    generate = _llamagen_generate(root)
    codes = torch.randint(0, a["vocab_size"], (B, a["seq_len"]))
    labels = torch.randint(0, 1000, (B,))

    def loss() -> torch.Tensor:
        return model(idx=codes[:, :-1], cond_idx=labels, targets=codes)[1]

    train = _train_step(model, loss)

    @torch.no_grad()
    def sample() -> None:
        model.eval()
        generate(model, labels, a["seq_len"], cfg_scale=a["cfg"], temperature=a["temperature"], top_k=0, top_p=1.0,
                 sample_logits=True)
    return train, sample, sum(p.numel() for p in model.parameters())


def run_anchors(mar_root: Path | None, llamagen_root: Path | None, *, threads: int = 1, reps: int = 3,
                pairs: list[tuple[str, str]] | None = None) -> dict:
    """Interleaved medians for every (ours, anchor) pair; ours alone where that anchor's checkout is not given."""
    import os
    roots = {"mar": mar_root, "llamagen": llamagen_root}
    builders = {"mar": _mar, "llamagen": _llamagen}
    for option, root, marker in (("--mar-root", mar_root, "models/mar.py"),
                                 ("--llamagen-root", llamagen_root, "autoregressive/models/gpt.py")):
        if root is not None and not (Path(root) / marker).is_file():
            raise FluidbenchError(f"{option} {root}: no {marker} there (a checkout of the anchor's repository)")
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    rows = []
    try:
        for ours_name, anchor in pairs or PAIRS:
            o_train, o_sample, o_params = _ours(ours_name)
            train_fns, sample_fns, params = {"ours": o_train}, {"ours": o_sample}, {"ours": o_params}
            if roots[anchor] is not None:  # without a checkout: ours alone at the anchor's configuration
                train_fns["anchor"], sample_fns["anchor"], params["anchor"] = builders[anchor](Path(roots[anchor]))
            load = [round(x, 2) for x in os.getloadavg()]
            train = _interleaved(train_fns, max(reps, 3))
            sample = _interleaved(sample_fns, reps)
            ratio = (lambda part, key: part["anchor"][key] / part["ours"][key] if "anchor" in part else None)  # noqa: E731
            rows.append(dict(ours=ours_name, anchor=anchor, params=params, train=train, sample=sample,
                             loadavg_start=load, loadavg_end=[round(x, 2) for x in os.getloadavg()],
                             ratio=dict(train_wall=ratio(train, "wall_s"), train_cpu=ratio(train, "cpu_s"),
                                        sample_wall=ratio(sample, "wall_s"), sample_cpu=ratio(sample, "cpu_s"))))
    finally:
        torch.set_num_threads(saved)
    return dict(config=ANCHOR, threads=threads, reps=reps, roots={k: str(v) if v else None for k, v in roots.items()},
                results=rows)


def anchor_lines(doc: dict) -> list[str]:
    """One line per pair: train ms/step and sample s per 64 images, ours vs anchor, and the ratios."""
    lines = []
    for r in doc["results"]:
        t, s, q = r["train"], r["sample"], r["ratio"]
        if "anchor" not in t:
            lines.append(f"{r['ours']} at {r['anchor']}'s configuration ({doc['threads']} thread(s)): train "
                         f"{1e3 * t['ours']['wall_s']:.0f} ms/step, sample {s['ours']['wall_s']:.2f} s / "
                         f"{ANCHOR['batch']} images (no --{r['anchor']}-root: the anchor was not run)")
            continue
        lines.append(f"{r['ours']} vs {r['anchor']} ({doc['threads']} thread(s)): train {1e3 * t['ours']['wall_s']:.0f} "
                     f"vs {1e3 * t['anchor']['wall_s']:.0f} ms/step ({q['train_wall']:.2f}x wall, {q['train_cpu']:.2f}x "
                     f"cpu); sample {s['ours']['wall_s']:.2f} vs {s['anchor']['wall_s']:.2f} s / {ANCHOR['batch']} "
                     f"images ({q['sample_wall']:.2f}x wall, {q['sample_cpu']:.2f}x cpu); load {r['loadavg_start']}")
    return lines
