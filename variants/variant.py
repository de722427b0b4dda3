"""The Variant: one generation order and one head around the shared backbone (docs/design.md pins the contract).

Everything variant-specific the harness needs (paper defaults, token kind, parameter groups, FLOPs, sampling
cost) is read from the Variant, so `harness/` never branches on a variant's name.
"""
from __future__ import annotations

import torch
from torch import nn

from variants import rng
from variants.backbone import AlignerBlock, Backbone, Block
from variants.diffusion import SOLVERS
from variants.heads import AdaLNBlock

REVEALS = ("random", "confidence")  # which positions a random-order step writes (RandomOrder.sample)


def trim_text(text: torch.Tensor, text_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """Text and mask without the trailing positions that are padding in every row, and whether any padding is
    left (False: every kept position of every row with a real token is real, so attention needs no mask).
    Attention gives padded keys zero weight, so this changes nothing but the cost (one host sync)."""
    T = text_mask.shape[1]
    real = text_mask.any(dim=0)  # (T,)
    last = torch.where(real, torch.arange(1, T + 1, device=text_mask.device), 0).max().clamp_min(1)
    # rows without a real token become the null text (all positions real) in encode_text
    row_full = text_mask | ~text_mask.any(dim=1, keepdim=True)  # (B, T)
    keep_idx = torch.arange(T, device=text_mask.device) < last
    keep, full = torch.stack([last, (row_full | ~keep_idx).all().long()]).tolist()
    return text[:, :keep], text_mask[:, :keep], not full


def _linear_weights(*modules: nn.Module) -> int:
    """Weights that take part in matmuls (2 FLOPs each per row)."""
    return sum(m.weight.numel() for mod in modules for m in mod.modules() if isinstance(m, nn.Linear))


class Variant(nn.Module):
    """A text-to-image autoregressive model: tokens and text -> loss; text -> tokens.

    Attributes: `name`, `token_kind` ("vq" | "kl", must match the tokenizer), `seq_len`, `defaults`
    (cfg_scale, temperature, steps, head_steps: the paper's settings for this variant), `config` (the keyword
    arguments of `build_variant` that rebuild this model), `last_sample_stats` (see variants/orders.py).
    `forward` is `loss`, so wrappers such as DDP or FSDP see the training computation through `__call__`.
    """

    def __init__(self, name: str, *, order: nn.Module, head: nn.Module, backbone: Backbone, vocab_size: int,
                 token_dim: int, defaults: dict, config: dict, text_dropout: float = 0.1, text_len: int = 32):
        super().__init__()
        self.name, self.token_kind = name, head.token_kind
        self.seq_len, self.vocab_size, self.token_dim = backbone.seq_len, vocab_size, token_dim
        self.text_dim, self.text_len, self.text_dropout = backbone.text_proj.in_features, text_len, text_dropout
        width = backbone.width
        self.embed = nn.Embedding(vocab_size, width) if self.token_kind == "vq" else nn.Linear(token_dim, width)
        self.backbone, self.order, self.head = backbone, order, head
        self.defaults, self.config = dict(defaults), dict(config)
        self.last_sample_stats: dict = {}
        self._init_weights()

    def _init_weights(self) -> None:
        """MAR's init for everything but the head (which initialises itself: zero adaLN and output)."""
        for module in (self.embed, self.backbone, self.order):
            for m in module.modules():
                if isinstance(m, nn.Linear):
                    nn.init.xavier_uniform_(m.weight)
                    nn.init.zeros_(m.bias)
                elif isinstance(m, nn.Embedding):
                    nn.init.normal_(m.weight, std=0.02)
        for p in (self.backbone.pos_embed, self.backbone.null_text, *self.order.parameters()):
            nn.init.normal_(p, std=0.02)

    # ---- training --------------------------------------------------------------------------------------------

    def forward(self, tokens: torch.Tensor, text: torch.Tensor, text_mask: torch.Tensor,
                generator: torch.Generator | None = None, validation: bool = False) -> torch.Tensor:
        """Scalar training loss of this variant (cross-entropy in nats, or eps-MSE) on predicted positions.

        tokens: (B, L) int codes or (B, L, C) latents; text (B, T, D); text_mask (B, T) bool, True = real.
        Every random draw (text dropout in train mode, order, mask ratio, timesteps, noise) comes from
        `generator`, so a fixed generator gives a deterministic validation loss. No host synchronisation.
        `validation`: the same loss's low-variance estimate (mask ratios on a fixed grid of quantiles, stratified
        diffusion timesteps; see the orders' and heads' `validation`), what eval.loss measures.
        """
        tokens, text = self._check(tokens, text, text_mask)
        z, weight = self.outputs(tokens, text, text_mask, generator, validation)
        target = tokens.flatten(0, 1)
        return self.head.loss(z.flatten(0, 1), target, None if weight is None else weight.flatten(), generator,
                              validation=validation)

    loss = forward

    def outputs(self, tokens: torch.Tensor, text: torch.Tensor, text_mask: torch.Tensor,
                generator: torch.Generator | None = None,
                validation: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Backbone outputs z (B, L, W) and the loss weight over positions (None = all count)."""
        drop = None
        if self.training and self.text_dropout > 0:
            drop = rng.uniform((tokens.shape[0],), generator, tokens.device) < self.text_dropout
        ctx, mask = self.backbone.encode_text(text, text_mask, drop)
        return self.order.outputs(self.backbone, self.embed(tokens), ctx, mask, generator, validation)

    def _check(self, tokens: torch.Tensor, text: torch.Tensor, text_mask: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Shape checks (no device sync) and dtype casts: int codes -> int64, latents and text -> param dtype."""
        dtype = self.backbone.text_proj.weight.dtype
        if self.token_kind == "vq":
            if tokens.dim() != 2 or tokens.is_floating_point():
                raise ValueError(f"{self.name}: tokens must be (B, L) integer codes, got {tuple(tokens.shape)} "
                                 f"{tokens.dtype}")
            tokens = tokens.long()
        else:
            if tokens.dim() != 3 or tokens.shape[-1] != self.token_dim:
                raise ValueError(f"{self.name}: tokens must be (B, L, {self.token_dim}) latents, got "
                                 f"{tuple(tokens.shape)}")
            tokens = tokens.to(dtype)
        if tokens.shape[1] != self.seq_len:
            raise ValueError(f"{self.name}: tokens have length {tokens.shape[1]}, the model seq_len is {self.seq_len}")
        self._check_text(text, text_mask, tokens.shape[0])
        return tokens, text.to(dtype)

    def _check_text(self, text: torch.Tensor, text_mask: torch.Tensor, batch: int | None = None) -> None:
        if text.dim() != 3 or text.shape[-1] != self.text_dim:
            raise ValueError(f"{self.name}: text must be (B, T, {self.text_dim}), got {tuple(text.shape)}")
        if text_mask.shape != text.shape[:2] or text_mask.dtype != torch.bool:
            raise ValueError(f"{self.name}: text_mask must be bool {tuple(text.shape[:2])}, got "
                             f"{text_mask.dtype} {tuple(text_mask.shape)}")
        if batch is not None and text.shape[0] != batch:
            raise ValueError(f"{self.name}: text batch {text.shape[0]} != tokens batch {batch}")

    # ---- sampling --------------------------------------------------------------------------------------------

    @torch.no_grad()
    def sample(self, text: torch.Tensor, text_mask: torch.Tensor, *, cfg_scale: float | None = None,
               temperature: float | None = None, steps: int | None = None, head_steps: int | None = None,
               generator: torch.Generator | None = None, kv_cache: bool = True,
               x0_clip: float | None = None, head_solver: str | None = None,
               reveal: str | None = None) -> torch.Tensor:
        """Tokens for each caption, in the tokenizer's layout: (B, L) int64 codes or (B, L, C) latents.

        None = the variant's paper default (`self.defaults`). cfg_scale 1.0 runs no null branch; any other
        value doubles the batch (cond + null text) in every backbone pass. `steps`: reveal steps of random
        order (raster order ignores it: always L steps, as the stats say). `head_steps`: diffusion head steps (ignored by codes).
        `x0_clip`: bound on the diffusion head's predicted x0 at every step (None: the variant's default,
        itself None = MAR's unclipped sampler; ignored by codes). `head_solver`: the diffusion head's sampler,
        ddpm (MAR), ddim or dpm++ (None: the variant's default; ignored by codes). `reveal`: which positions
        each random-order step writes, random (MAR, Fluid) or confidence (MaskGIT; codes only); None: the
        variant's default; raster order ignores it.
        `kv_cache=False`: raster order recomputes the whole prefix each step (reference / benchmark).
        Statistics of the run land in `self.last_sample_stats`.
        """
        self._check_text(text, text_mask)
        d = self.defaults
        cfg = float(d["cfg_scale"] if cfg_scale is None else cfg_scale)
        temperature = float(d["temperature"] if temperature is None else temperature)
        steps = self.order.check_steps(steps)
        head_steps = int(d["head_steps"] if head_steps is None else head_steps)
        x0_clip = d.get("x0_clip") if x0_clip is None else float(x0_clip)
        if x0_clip is not None and not x0_clip > 0:
            raise ValueError(f"{self.name}: x0_clip must be > 0 (or None for no clipping), got {x0_clip}")
        head_solver = d.get("head_solver") if head_solver is None else head_solver
        if self.token_kind == "kl" and head_solver not in SOLVERS:
            raise ValueError(f"{self.name}: head_solver must be one of {', '.join(SOLVERS)}, got {head_solver!r}")
        reveal = d.get("reveal") if reveal is None else reveal
        if reveal is not None and reveal not in REVEALS:
            raise ValueError(f"{self.name}: reveal must be one of {', '.join(REVEALS)}, got {reveal!r}")
        if reveal == "confidence" and self.token_kind != "vq":
            raise ValueError(f"{self.name}: reveal 'confidence' needs code probabilities (a vq variant); "
                             f"a diffusion head has none")
        guided = cfg != 1.0
        text, text_mask, padded = trim_text(text.to(self.backbone.text_proj.weight.dtype), text_mask)
        encode = self.backbone.guided_text if guided else self.backbone.encode_text
        ctx, mask = encode(text, text_mask)
        tokens, stats = self.order.sample(self, ctx, mask if padded else None, cfg_scale=cfg if guided else None,
                                          temperature=temperature, steps=steps, head_steps=head_steps,
                                          generator=generator, kv_cache=kv_cache, x0_clip=x0_clip,
                                          head_solver=head_solver or "ddpm", reveal=reveal or "random")
        self.last_sample_stats = stats | {"steps": steps, "head_steps": head_steps, "cfg_scale": cfg,
                                          "temperature": temperature, "x0_clip": x0_clip,
                                          "head_solver": head_solver, "reveal": reveal}
        return tokens

    def random_tokens(self, batch: int, generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
        """Random tokens in the tokenizer's layout: uniform codes or standard-normal latents (benchmarks)."""
        if self.token_kind == "vq":
            return rng.integers(self.vocab_size, (batch, self.seq_len), generator, device)
        return rng.normal((batch, self.seq_len, self.token_dim), generator, device)

    def empty_tokens(self, batch: int, device: torch.device) -> torch.Tensor:
        """A zero token buffer in the tokenizer's layout (code 0 / zero latent)."""
        if self.token_kind == "vq":
            return torch.zeros(batch, self.seq_len, dtype=torch.int64, device=device)
        return torch.zeros(batch, self.seq_len, self.token_dim, device=device)

    def blocks(self) -> list[nn.Module]:
        """The repeated blocks (aligner, backbone, diffusion head), in call order: the units for FSDP2's
        per-block fully_shard and for activation checkpointing. Each does all its work inside forward."""
        return [m for m in self.modules() if isinstance(m, (AlignerBlock, Block, AdaLNBlock))]

    # ---- accounting ------------------------------------------------------------------------------------------

    def param_group(self, name: str) -> str:
        """Which of backbone / aligner / head / embeddings a parameter (by its name) belongs to."""
        if name.startswith("head."):
            return "head"
        if name.startswith(("embed.", "order.")) or name in ("backbone.pos_embed", "backbone.null_text"):
            return "embeddings"
        if name.startswith(("backbone.text_proj.", "backbone.aligner")):
            return "aligner"
        return "backbone"

    def param_counts(self) -> dict:
        """Parameter counts: total, backbone, aligner, head, embeddings (works on the meta device)."""
        counts = dict.fromkeys(("backbone", "aligner", "head", "embeddings"), 0)
        for name, p in self.named_parameters():
            counts[self.param_group(name)] += p.numel()
        return {"total": sum(counts.values()), **counts}

    def no_weight_decay(self, name: str) -> bool:
        """True for biases, norms, embeddings (token, position, start/mask, null text, the latent input
        projection) and the whole diffusion head: MAR's recipe (LTH14/mar, util/misc.py add_weight_decay)."""
        p = self.get_parameter(name)
        group = self.param_group(name)
        return p.ndim < 2 or group == "embeddings" or (group == "head" and not self.head.decay_weights)

    def param_groups(self, weight_decay: float) -> list[dict]:
        """AdamW parameter groups: [{params, weight_decay}, {params, weight_decay: 0.0}]."""
        named = [(n, p) for n, p in self.named_parameters() if p.requires_grad]
        return [{"params": [p for n, p in named if not self.no_weight_decay(n)], "weight_decay": weight_decay},
                {"params": [p for n, p in named if self.no_weight_decay(n)], "weight_decay": 0.0}]

    def _pass_flops(self, queries: int, keys: int, text_kv: bool) -> float:
        """Forward FLOPs of one backbone pass of `queries` positions attending to `keys` positions."""
        bb, T, W = self.backbone, self.text_len, self.backbone.width
        cross_kv = sum(b.cross.kv.weight.numel() for b in bb.blocks)  # applied to the T text rows
        per_row = _linear_weights(bb.blocks) - cross_kv
        attention = len(bb.blocks) * 4 * W * (queries * keys + queries * T)  # QK^T and AV, self + cross
        return 2.0 * queries * per_row + attention + (2.0 * T * cross_kv if text_kv else 0.0)

    def _text_flops(self) -> float:
        bb, T = self.backbone, self.text_len
        return 2.0 * T * _linear_weights(bb.text_proj, bb.aligner) + len(bb.aligner) * 4 * bb.width * T * T

    def train_flops_per_image(self) -> float:
        """Forward + backward = 3 x forward matmul FLOPs per training image (attention counted dense, also
        when causal), the head counted on all L positions x diffusion_batch_mul as it is computed."""
        L = self.seq_len
        forward = (self._text_flops() + self._pass_flops(L, L, True) + 2.0 * L * _linear_weights(self.embed)
                   + 2.0 * L * self.head.batch_mul * _linear_weights(self.head))
        return 3.0 * forward

    def sampling_cost(self, steps: int | None = None, cfg_scale: float | None = None,
                      head_steps: int | None = None, kv_cache: bool = True) -> dict:
        """Per image: backbone forward passes (x2 per image when guided), head evaluations, forward FLOPs."""
        steps = self.order.check_steps(steps)
        cfg = float(self.defaults["cfg_scale"] if cfg_scale is None else cfg_scale)
        head_steps = int(self.defaults["head_steps"] if head_steps is None else head_steps)
        if self.token_kind == "vq":
            head_steps = 0  # a categorical head samples in one evaluation; `sample` ignores head_steps too
        rows = 2 if cfg != 1.0 else 1
        passes = self.order.pass_shapes(steps, kv_cache)
        backbone = sum(self._pass_flops(q, k, t) for q, k, t in passes)
        head_evals = self.seq_len * max(head_steps, 1) * rows
        flops = (self._text_flops() + rows * backbone + 2.0 * head_evals * _linear_weights(self.head)
                 + 2.0 * len(passes) * self.seq_len * _linear_weights(self.embed))
        return {"forward_passes": len(passes), "forward_passes_per_image": len(passes) * rows,
                "batch_doubled": rows == 2, "head_steps": head_steps, "head_evals_per_image": head_evals,
                "flops": flops}
