"""Train our own small VQ or KL tokenizer (the embedded default: 32x32 images -> 8x8 tokens) in a few CPU minutes.

The recipe was found on a 2-core CPU budget (32x32 ShapesT2I, batch 64): diffusers' VQModel collapses to one code
with its defaults, so VQ uses `legacy=False` (commitment weight on the encoder term), a k-means codebook init from
encoder outputs and dead-code restarts from current encoder outputs; KL starts with the posterior's log-variance at
-10 (zeroed weights, bias -10) so early samples are not swamped by unit noise.

Training runs a fixed number of steps from a seed, with a cosine learning rate over them: on one thread count the
same data and config give the same tokenizer, so a sweep's tokenizers (and every result read through them) repeat.
A wall-clock budget (`time_budget_s`) is kept as an option for a quick look on an unknown machine: training then
stops at the step count or the budget, whichever comes first (but not before `min_steps`), the cosine following the
further of the two; what it trains depends on the machine's speed, so no shipped spec uses it.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from variants.tokenizers import KLTokenizer, Tokenizer, VQTokenizer, downsampling_factor


@dataclass
class TokenizerTrainConfig:
    """Every setting of a tokenizer training run; written to DIR/metrics.json beside the results."""

    kind: str = "kl"                      # "vq" | "kl"
    image_size: int = 32
    grid: int = 8                         # tokens per side
    patch: int = 1                        # kl: p x p latents per token
    # The encoder sees each token's pixel patch alone (variants/tokenizers.py, "local"): a token depends on its own
    # pixels only; the decoder sees the whole grid. Off: the encoder sees the whole image, as the published ones
    local: bool = False
    widths: tuple[int, ...] = (16, 32, 64)  # block_out_channels; len = log2(downsampling) + 1
    layers_per_block: int = 1
    latent_channels: int = 8              # kl latent channels; vq code dimension
    norm_groups: int = 8
    mid_attention: bool = False           # attention at 8x8 costs ~15% of a step; steps are what limits PSNR
    codebook_size: int = 512              # vq
    # At equal CPU time (~190 s) batch 8 / 16 / 32 reached KL 29.9 / 29.4 / 27.6 dB, VQ 28.4 / 26.8 / 26.1 dB
    batch_size: int = 8
    lr: float = 2e-3
    min_lr_ratio: float = 0.05
    warmup_steps: int = 50
    # the training length; per kind in KIND_DEFAULTS (what the former 240 s budget reached on one core)
    steps: int = 1800
    # Optional wall-clock budget (None = train exactly `steps`): the result then depends on the machine's speed
    time_budget_s: float | None = None
    # A floor under the budget: on an overloaded machine a budgeted run once got an 81-step tokenizer (18.5 dB VQ,
    # no scene read correctly), which capped every vq model's GenEval at 0; 500 steps of batch 8 take ~75 CPU-s.
    min_steps: int = 500
    mse_weight: float = 1.0               # reconstruction loss = L1 + mse_weight * MSE
    kl_weight: float = 1e-6
    commitment: float = 0.25
    restart_every: int = 20               # vq: re-seed codes unused for this many steps
    kmeans_iters: int = 10
    init_logvar: float = -10.0            # kl
    seed: int = 0
    threads: int = 0                      # torch threads during training; 0 = leave torch's default

    def __post_init__(self) -> None:
        if self.kind not in ("vq", "kl"):
            raise ValueError(f"kind must be 'vq' or 'kl', got {self.kind!r}")
        factor = downsampling_factor(self.image_size, self.grid, self.patch)
        if 2 ** (len(self.widths) - 1) != factor:
            raise ValueError(f"widths {self.widths}: need {int(math.log2(factor)) + 1} levels for "
                             f"{self.image_size} px -> {self.grid}x{self.grid} tokens (patch {self.patch})")
        if self.kind == "vq" and self.patch != 1:
            raise ValueError("patch must be 1 for vq (one code per latent position)")
        if self.local and self.patch != 1:
            raise ValueError("patch must be 1 for a local tokenizer (one latent per token)")
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        if self.time_budget_s is not None and not self.time_budget_s > 0:
            raise ValueError(f"time_budget_s must be > 0 (or None: no budget), got {self.time_budget_s}")


# Per-kind changes to the defaults above, tuned on ShapesT2I (README, "Tokenizers"): see default_config. The step
# counts are what the former 240 s budget reached with one thread each, side by side (VQ 1,783 steps, 29.3 dB;
# KL 1,881 steps, 32.7 dB), so the fixed-length tokenizers match the budgeted ones on an idle machine.
KIND_DEFAULTS: dict[str, dict] = {"kl": {"steps": 1900}, "vq": {"latent_channels": 4, "steps": 1800}}


def default_config(kind: str, **overrides) -> TokenizerTrainConfig:
    """The embedded default recipe for `kind`, with `overrides` (None values ignored) on top."""
    if kind not in KIND_DEFAULTS:
        raise ValueError(f"kind must be 'vq' or 'kl', got {kind!r}")
    return TokenizerTrainConfig(kind=kind, **{**KIND_DEFAULTS[kind],
                                              **{k: v for k, v in overrides.items() if v is not None}})


def build_tokenizer(cfg: TokenizerTrainConfig) -> Tokenizer:
    """A freshly initialised (seeded) tokenizer for `cfg`; its model is what train_tokenizer optimises."""
    from diffusers import AutoencoderKL, VQModel

    n = len(cfg.widths)
    common = dict(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * n,
                  up_block_types=["UpDecoderBlock2D"] * n, block_out_channels=list(cfg.widths),
                  layers_per_block=cfg.layers_per_block, latent_channels=cfg.latent_channels,
                  norm_num_groups=cfg.norm_groups, mid_block_add_attention=cfg.mid_attention,
                  sample_size=cfg.image_size)
    with torch.random.fork_rng():  # diffusers initialises from the global RNG
        torch.manual_seed(cfg.seed)
        if cfg.kind == "vq":
            model = VQModel(**common, num_vq_embeddings=cfg.codebook_size, vq_embed_dim=cfg.latent_channels)
            return VQTokenizer(model, image_size=cfg.image_size, local=cfg.local)
        model = AutoencoderKL(**common)
    with torch.no_grad():  # log-variance half of the moments starts at init_logvar: std ~ 0.007, not 1
        c = cfg.latent_channels
        model.quant_conv.weight[c:].zero_()
        model.quant_conv.bias[c:].fill_(cfg.init_logvar)
    return KLTokenizer(model, image_size=cfg.image_size, patch=cfg.patch, local=cfg.local)


def _to_model(batch: torch.Tensor) -> torch.Tensor:
    return batch.float() / 127.5 - 1  # uint8 (B, 3, H, W) -> [-1, 1]


def _reconstruction_loss(rec: torch.Tensor, x: torch.Tensor, mse_weight: float) -> torch.Tensor:
    return F.l1_loss(rec, x) + mse_weight * F.mse_loss(rec, x)


@torch.no_grad()
def _d2_sample(vectors: torch.Tensor, centres: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    """k row indices of `vectors`, drawn with probability proportional to the squared distance to the nearest centre
    (k-means++'s D^2 weighting, Arthur & Vassilvitskii 2007). Uniform draws put most codes on the dominant cluster:
    on ShapesT2I ~85% of token positions are plain background, and uniform seeding split it over ~470 of 512 codes
    that all decode to grey, so background tokens carried ~5.8 nats of noise (docs/recipe.md, section 8)."""
    d2 = torch.cdist(vectors, centres).amin(1).square()
    if not d2.sum() > 0:
        return torch.randint(len(vectors), (k,), generator=generator)
    return torch.multinomial(d2, k, replacement=k > int((d2 > 0).sum()), generator=generator)


def _kmeans(vectors: torch.Tensor, k: int, iters: int, generator: torch.Generator) -> torch.Tensor:
    """Lloyd k-means from k-means++ seeding; empty clusters re-seeded by D^2 sampling."""
    centres = vectors[torch.randint(len(vectors), (1,), generator=generator)].clone()
    while len(centres) < k:  # one centre at a time: each draw sees the centres chosen before it
        centres = torch.cat([centres, vectors[_d2_sample(vectors, centres, 1, generator)]])
    for _ in range(iters):
        assign = torch.cdist(vectors, centres).argmin(1)
        sums = torch.zeros_like(centres).index_add_(0, assign, vectors)
        counts = torch.bincount(assign, minlength=k).unsqueeze(1)
        empty = counts.squeeze(1) == 0
        centres = torch.where(empty.unsqueeze(1), centres, sums / counts.clamp(min=1))
        if empty.any():
            centres[empty] = vectors[_d2_sample(vectors, centres[~empty], int(empty.sum()), generator)]
    return centres


def _encoder_vectors(tokenizer: VQTokenizer, x: torch.Tensor) -> torch.Tensor:
    h = tokenizer.encoder_latents(x)  # (B, D, g, g)
    return h.permute(0, 2, 3, 1).reshape(-1, h.shape[1])  # (B*g*g, D)


def train_tokenizer(cfg: TokenizerTrainConfig, images: torch.Tensor,
                    log: Callable[[dict], None] | None = None) -> tuple[Tokenizer, dict]:
    """Train on uint8 images (N, 3, H, W); returns the frozen tokenizer and stats (steps, train_s, steps_per_s).

    For kl the latent normalisation (per-channel shift and scale) is estimated from the training images.
    """
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1:] != (3, cfg.image_size, cfg.image_size):
        raise ValueError(f"training images must be uint8 (N, 3, {cfg.image_size}, {cfg.image_size}), "
                         f"got {images.dtype} {tuple(images.shape)}")
    threads = torch.get_num_threads()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    try:
        tokenizer, stats = _train(cfg, images, log)
    finally:
        torch.set_num_threads(threads)
    if cfg.kind == "kl":
        _estimate_normalisation(tokenizer, images, torch.Generator().manual_seed(cfg.seed + 1))
    return tokenizer, stats


def _train(cfg: TokenizerTrainConfig, images: torch.Tensor, log) -> tuple[Tokenizer, dict]:
    tokenizer = build_tokenizer(cfg)  # before the clock starts: the first diffusers import can take seconds
    start, cpu_start = time.perf_counter(), time.process_time()
    gen = torch.Generator().manual_seed(cfg.seed)
    model = tokenizer.model
    model.requires_grad_(True).train()
    n = len(images)
    if cfg.kind == "vq":
        model.quantize.legacy = False  # diffusers' default puts the commitment weight on the codebook term
        model.quantize.beta = cfg.commitment
        with torch.no_grad():
            sample = images[torch.randperm(n, generator=gen)[:32 * cfg.codebook_size // cfg.grid ** 2]]  # ~32 per code
            vectors = _encoder_vectors(tokenizer, _to_model(sample))
            model.quantize.embedding.weight.copy_(_kmeans(vectors, cfg.codebook_size, cfg.kmeans_iters, gen))
        usage = torch.zeros(cfg.codebook_size, dtype=torch.long)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.99), weight_decay=0.0)
    step, elapsed, loss_ema, over_budget = 0, 0.0, None, False
    budget = cfg.time_budget_s
    while step < cfg.steps and (budget is None or elapsed < budget or step < cfg.min_steps):
        progress = step / cfg.steps
        if budget is not None:
            over_budget |= elapsed >= budget  # only min_steps keeps this step going
            time_progress = elapsed / budget
            if step < cfg.min_steps:  # the budget cannot end training before min_steps: anneal towards them
                time_progress = min(time_progress, step / cfg.min_steps)
            progress = min(1.0, max(progress, time_progress))
        lr = cfg.lr * min(1.0, (step + 1) / cfg.warmup_steps)
        lr *= cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
        for group in opt.param_groups:
            group["lr"] = lr
        x = _to_model(images[torch.randint(n, (cfg.batch_size,), generator=gen)])
        # a local tokenizer encodes the images' patches (encoder_input / latent_grid are identities otherwise)
        if cfg.kind == "kl":
            post = model.encode(tokenizer.encoder_input(x)).latent_dist
            mean, std = tokenizer.latent_grid(post.mean), tokenizer.latent_grid(post.std)
            z = mean + std * torch.randn(mean.shape, generator=gen)
            rec = model.decode(z).sample
            # the KL term per image, as the global one's (diffusers sums it over the latent positions)
            kl = post.kl().reshape(-1, tokenizer.seq_len).sum(1) if cfg.local else post.kl()
            loss = _reconstruction_loss(rec, x, cfg.mse_weight) + cfg.kl_weight * kl.mean()
        else:
            h = tokenizer.encoder_latents(x)  # (B, D, g, g)
            quant, vq_loss, (_, _, codes) = model.quantize(h)
            rec = model.decoder(model.post_quant_conv(quant))
            loss = _reconstruction_loss(rec, x, cfg.mse_weight) + vq_loss
            usage += torch.bincount(codes.reshape(-1), minlength=cfg.codebook_size)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        if cfg.kind == "vq" and step % cfg.restart_every == 0:
            _restart_dead_codes(model, h.detach(), usage, gen)
            usage.zero_()
        loss_ema = loss.item() if loss_ema is None else 0.98 * loss_ema + 0.02 * loss.item()
        elapsed = time.perf_counter() - start
        if log is not None and (step % 10 == 0 or step == 1):
            log(dict(step=step, loss=loss_ema, lr=lr, elapsed_s=elapsed))
    tokenizer.requires_grad_(False).eval()
    tokenizer._checksum = None
    # CPU seconds (all threads) beside wall seconds: on a shared machine they show what an idle one would do
    return tokenizer, dict(steps=step, train_s=elapsed, steps_per_s=step / max(elapsed, 1e-9), final_loss=loss_ema,
                           cpu_s=time.process_time() - cpu_start, over_budget=over_budget,
                           config=asdict(cfg))


@torch.no_grad()
def _restart_dead_codes(model, h: torch.Tensor, usage: torch.Tensor, gen: torch.Generator) -> None:
    """Codes no batch picked since the last restart move onto current encoder outputs (they drift, codes don't),
    drawn where the live codes quantise worst (D^2 sampling), not uniformly: uniform draws land ~85% on background."""
    dead = (usage == 0).nonzero().squeeze(1)
    if len(dead) == 0:
        return
    vectors = h.permute(0, 2, 3, 1).reshape(-1, h.shape[1])
    codebook = model.quantize.embedding.weight
    live = codebook[usage > 0]
    pick = _d2_sample(vectors, live, len(dead), gen) if len(live) else torch.randint(len(vectors), (len(dead),),
                                                                                        generator=gen)
    codebook[dead] = vectors[pick]


@torch.no_grad()
def _estimate_normalisation(tokenizer: KLTokenizer, images: torch.Tensor, gen: torch.Generator,
                            n: int = 2000) -> None:
    """Per-channel shift and scale so that the latents training sees, posterior draws mean + std * eps, have zero
    mean and unit std on the data (LDM's scale-by-std computes its factor on draws too). Normalising the means
    instead left a channel whose posterior is mostly noise at std 3.2 in the targets (embedded kl tokenizer,
    channel 1: means std 1.0, posterior std 3.0), which a sampler clipped at a few units cannot reproduce."""
    pick = torch.randperm(len(images), generator=gen)[:n]
    draws = []
    for batch in images[pick].split(256):
        mean, std = tokenizer._posterior(_to_model(batch))
        draws.append(mean + std * torch.randn(mean.shape, generator=gen))
    z = torch.cat(draws).transpose(0, 1).reshape(tokenizer.latent_channels, -1)  # (C, N*H*W)
    tokenizer.shift.copy_(z.mean(1))
    tokenizer.scale.copy_(1 / z.std(1).clamp(min=1e-6))
    tokenizer._checksum = None


@torch.no_grad()
def reconstruct(tokenizer: Tokenizer, images: torch.Tensor, batch_size: int = 250) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 (N, 3, H, W) -> (reconstructions uint8 (N, 3, H, W), tokens) through encode/decode."""
    recs, toks = [], []
    for batch in images.split(batch_size):
        tokens = tokenizer.encode(_to_model(batch))
        rec = tokenizer.decode(tokens)
        recs.append(((rec + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).cpu())
        toks.append(tokens.cpu())
    return torch.cat(recs), torch.cat(toks)


def psnr(original: torch.Tensor, reconstruction: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB of uint8 images (N, 3, H, W), on the [0, 255] scale (capped at 100 dB)."""
    mse = (original.float() - reconstruction.float()).pow(2).flatten(1).mean(1)
    return (10 * torch.log10(255.0 ** 2 / mse.clamp(min=255.0 ** 2 * 1e-10)))


def reconstruction_metrics(tokenizer: Tokenizer, images: torch.Tensor) -> tuple[dict, torch.Tensor]:
    """Mean per-image PSNR and, for vq, the fraction of the codebook used on `images`; plus the reconstructions."""
    recs, tokens = reconstruct(tokenizer, images)
    metrics = dict(psnr=float(psnr(images, recs).mean()), images=len(images))
    if tokenizer.kind == "vq":
        metrics["codebook_usage"] = float(torch.unique(tokens).numel() / tokenizer.vocab_size)
    return metrics, recs
