"""Frozen image tokenizers: VQ codes (diffusers VQModel) or normalised KL latents (diffusers AutoencoderKL).

`load_tokenizer(path)` opens a folder written by `fluidbench tokenizer train` or a published checkpoint:
a diffusers AutoencoderKL folder (SD-VAE), a diffusers VQModel folder (aMUSEd VQ-GAN) or MAR's KL-16 `.ckpt`
(LDM key names, mapped onto diffusers' AutoencoderKL). Tokens are laid out in raster order, (b, h, w) row-major;
a KL token groups a p x p patch of latents channel-major, (c, p, p), as MAR's `patchify` does.

A *local* tokenizer (`local=True`, ours only) runs its encoder on each token's f x f pixel patch alone (f the
downsampling): a token then depends on its own pixels and nothing else; the decoder still sees the whole token
grid. The published encoders, like our default, see the whole image (3x3 convolutions stacked, GroupNorm over
all positions), so a token of plain background also encodes what lies around it: on ShapesT2I the background
positions of our global VQ tokenizer used ~400 codes, ~5.5 nats, that all decode to grey (docs/recipe.md, 8).
"""
from __future__ import annotations

import hashlib
import json
import math
import re
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch
from torch import nn

FORMAT_VERSION = 1
PIXEL_RANGES = ("minus_one_one", "zero_one")  # the range the wrapped model expects its images in


class Tokenizer(nn.Module):
    """Frozen image tokenizer: images (B, 3, H, W) in [-1, 1] <-> tokens, always in eval mode with no grads.

    kind: "vq" (codes (B, L) int64, vocab_size > 0) or "kl" (latents (B, L, token_dim) float, normalised).
    image_size: input resolution; grid: tokens per side; seq_len = grid * grid.
    """

    kind: str
    image_size: int
    grid: int
    seq_len: int
    vocab_size: int
    token_dim: int

    def __init__(self, model: nn.Module, *, image_size: int, grid: int, pixel_range: str, local: bool = False
                 ) -> None:
        super().__init__()
        if pixel_range not in PIXEL_RANGES:
            raise ValueError(f"pixel_range must be one of {PIXEL_RANGES}, got {pixel_range!r}")
        self.model = model
        self.image_size, self.grid, self.seq_len = image_size, grid, grid * grid
        self.pixel_range, self.local = pixel_range, local
        self._checksum: str | None = None
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> "Tokenizer":
        return super().train(False)  # frozen: a parent's .train() must not switch dropout/norm modes here

    def settings(self) -> dict:
        """Everything besides the weights that changes the tokens; part of the checksum."""
        settings = dict(kind=self.kind, image_size=self.image_size, grid=self.grid, pixel_range=self.pixel_range,
                        vocab_size=self.vocab_size, token_dim=self.token_dim)
        return dict(settings, local=True) if self.local else settings  # (absent: as before the option)

    @property
    def checksum(self) -> str:
        """sha256 over the weights and settings: the tokenizer's identity in cache keys and tokenizer.json."""
        if self._checksum is None:
            h = hashlib.sha256(json.dumps(self.settings(), sort_keys=True).encode())
            for name, t in sorted(self.model.state_dict().items()):
                h.update(name.encode())
                h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
            self._checksum = h.hexdigest()
        return self._checksum

    def _to_model(self, images: torch.Tensor) -> torch.Tensor:
        if images.ndim != 4 or images.shape[1] != 3 or images.shape[2:] != (self.image_size, self.image_size):
            raise ValueError(f"images must be (B, 3, {self.image_size}, {self.image_size}) in [-1, 1], "
                             f"got {tuple(images.shape)}")
        x = images.to(self.device, self.dtype)
        return (x + 1) / 2 if self.pixel_range == "zero_one" else x

    def _from_model(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float()
        x = x * 2 - 1 if self.pixel_range == "zero_one" else x
        return x.clamp(-1, 1)

    # A local tokenizer's encoder sees one token's patch at a time: these two move between the image layout
    # (B, 3, H, W) / latent grid (B, D, g, g) and the encoder's batch of patches (B*g*g, 3, f, f) / (B*g*g, D, 1, 1).
    # For a global tokenizer both are the identity. Training (variants/tokenizer_train.py) uses them too.
    def encoder_input(self, x: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, H, W), in the model's pixel range, as the encoder takes them."""
        return to_patches(x, self.grid) if self.local else x

    def latent_grid(self, h: torch.Tensor) -> torch.Tensor:
        """The encoder's latents -> (B, D, g, g)."""
        return from_patches(h, self.grid) if self.local else h

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """images (B, 3, H, W) in [-1, 1] -> vq: codes (B, L) int64; kl: normalised posterior mean (B, L, C)."""
        raise NotImplementedError

    def encode_moments(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """kl only: normalised posterior (mean, std), both (B, L, C); training draws mean + std * eps."""
        raise ValueError(f"encode_moments is defined for kl tokenizers only; this one is {self.kind!r}")

    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens in this tokenizer's layout -> images (B, 3, H, W) in [-1, 1]."""
        raise NotImplementedError


def to_patches(x: torch.Tensor, grid: int) -> torch.Tensor:
    """(B, C, g*f, g*f) -> (B*g*g, C, f, f), the patches in raster order within each image."""
    b, c, h, _ = x.shape
    f = h // grid
    return x.reshape(b, c, grid, f, grid, f).permute(0, 2, 4, 1, 3, 5).reshape(b * grid * grid, c, f, f)


def from_patches(x: torch.Tensor, grid: int) -> torch.Tensor:
    """The inverse of to_patches: (B*g*g, C, f, f) -> (B, C, g*f, g*f)."""
    n, c, f, _ = x.shape
    b = n // (grid * grid)
    return x.reshape(b, grid, grid, c, f, f).permute(0, 3, 1, 4, 2, 5).reshape(b, c, grid * f, grid * f)


class VQTokenizer(Tokenizer):
    """Discrete tokens: the codebook indices of a diffusers VQModel."""

    kind = "vq"

    def __init__(self, model: nn.Module, *, image_size: int, pixel_range: str = "minus_one_one",
                 local: bool = False) -> None:
        factor = 2 ** (len(model.config.block_out_channels) - 1)
        if image_size % factor:
            raise ValueError(f"image_size {image_size} is not a multiple of the VQModel's downsampling {factor}")
        super().__init__(model, image_size=image_size, grid=image_size // factor, pixel_range=pixel_range,
                         local=local)
        self.vocab_size, self.token_dim = model.config.num_vq_embeddings, 0

    def encoder_latents(self, x: torch.Tensor) -> torch.Tensor:
        """The encoder's latents before quantisation, (B, D, g, g), of images already in the model's pixel range
        (training calls this too, with gradients)."""
        return self.latent_grid(self.model.encode(self.encoder_input(x)).latents)

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        h = self.encoder_latents(self._to_model(images))
        codes = self.model.quantize(h)[2][2]  # flat in (b, h, w) order
        return codes.reshape(images.shape[0], self.seq_len).long()

    @torch.no_grad()
    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        if tokens.ndim != 2 or tokens.shape[1] != self.seq_len:
            raise ValueError(f"vq tokens must be (B, {self.seq_len}) int64, got {tuple(tokens.shape)}")
        b, dim = tokens.shape[0], self.model.quantize.vq_embed_dim
        shape = (b, self.grid, self.grid, dim)
        codes = tokens.to(self.device).long().reshape(-1)
        if self.model.config.lookup_from_codebook:  # aMUSEd: decode() itself looks the codes up
            out = self.model.decode(codes, force_not_quantize=True, shape=shape).sample
        else:
            quant = self.model.quantize.get_codebook_entry(codes, shape)  # (B, D, g, g)
            out = self.model.decode(quant, force_not_quantize=True).sample
        return self._from_model(out)


class KLTokenizer(Tokenizer):
    """Continuous tokens: p x p patches of a diffusers AutoencoderKL's latents, normalised by (shift, scale)."""

    kind = "kl"

    def __init__(self, model: nn.Module, *, image_size: int, patch: int = 1, scale: float | list[float] = 1.0,
                 shift: float | list[float] = 0.0, pixel_range: str = "minus_one_one", local: bool = False) -> None:
        factor = 2 ** (len(model.config.block_out_channels) - 1)
        if image_size % (factor * patch):
            raise ValueError(f"image_size {image_size} is not a multiple of downsampling {factor} x patch {patch}")
        if local and patch != 1:
            raise ValueError(f"a local kl tokenizer takes patch 1 (one latent per token), got {patch}")
        super().__init__(model, image_size=image_size, grid=image_size // (factor * patch), pixel_range=pixel_range,
                         local=local)
        self.patch, self.latent_channels = patch, model.config.latent_channels
        self.vocab_size, self.token_dim = 0, self.latent_channels * patch * patch
        c = self.latent_channels
        # z_normalised = (z - shift) * scale, per latent channel (a scalar is broadcast), as diffusers' configs do
        self.register_buffer("scale", torch.zeros(c) + torch.as_tensor(scale, dtype=torch.float32), persistent=False)
        self.register_buffer("shift", torch.zeros(c) + torch.as_tensor(shift, dtype=torch.float32), persistent=False)

    def settings(self) -> dict:
        return dict(super().settings(), patch=self.patch, scale=self.scale.tolist(), shift=self.shift.tolist())

    def patchify(self, z: torch.Tensor) -> torch.Tensor:
        b, c, h, w = z.shape
        p = self.patch
        z = z.reshape(b, c, h // p, p, w // p, p)
        return torch.einsum("nchpwq->nhwcpq", z).reshape(b, self.seq_len, self.token_dim)  # (B, L, C*p*p)

    def unpatchify(self, tokens: torch.Tensor) -> torch.Tensor:
        b, g, p, c = tokens.shape[0], self.grid, self.patch, self.latent_channels
        z = tokens.reshape(b, g, g, c, p, p)
        return torch.einsum("nhwcpq->nchpwq", z).reshape(b, c, g * p, g * p)  # (B, C, H', W')

    def _posterior(self, images: torch.Tensor):
        """The posterior's (mean, std), each (B, C, H', W')."""
        post = self.model.encode(self.encoder_input(self._to_model(images))).latent_dist
        return self.latent_grid(post.mean), self.latent_grid(post.std)

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        return self.encode_moments(images)[0]

    @torch.no_grad()
    def encode_moments(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        post_mean, post_std = self._posterior(images)
        scale, shift = self.scale.view(1, -1, 1, 1), self.shift.view(1, -1, 1, 1)
        mean = (post_mean.float() - shift) * scale
        std = post_std.float() * scale.abs()
        return self.patchify(mean), self.patchify(std)

    @torch.no_grad()
    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        if tokens.ndim != 3 or tokens.shape[1:] != (self.seq_len, self.token_dim):
            raise ValueError(f"kl tokens must be (B, {self.seq_len}, {self.token_dim}), got {tuple(tokens.shape)}")
        z = self.unpatchify(tokens.to(self.device).float())
        z = z / self.scale.view(1, -1, 1, 1) + self.shift.view(1, -1, 1, 1)
        return self._from_model(self.model.decode(z.to(self.dtype)).sample)


# ---------------------------------------------------------------------------------------------------------------
# Saving and loading

WHERE_FROM = (
    "expected one of: a folder written by `fluidbench tokenizer train` (tokenizer.json + model/); a diffusers "
    "AutoencoderKL or VQModel folder (config.json + diffusion_pytorch_model.safetensors, e.g. the Hugging Face repos "
    "stabilityai/sd-vae-ft-ema or amused/amused-256 subfolder vqvae); or MAR's KL-16 kl16.ckpt (linked from "
    "github.com/LTH14/mar, util/download.py, saved as pretrained_models/vae/kl16.ckpt)"
)


def save_tokenizer(tokenizer: Tokenizer, out: str | Path) -> None:
    """Write DIR/model/ (diffusers save_pretrained, safetensors) and DIR/tokenizer.json (settings + checksum)."""
    out = Path(out)
    tokenizer.model.save_pretrained(out / "model", safe_serialization=True)
    meta = dict(tokenizer.settings(), format_version=FORMAT_VERSION, seq_len=tokenizer.seq_len,
                model_class=type(tokenizer.model).__name__, checksum=tokenizer.checksum)
    (out / "tokenizer.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")  # written last


def load_tokenizer(path: str | Path, *, image_size: int | None = None, patch: int | None = None,
                   pixel_range: str | None = None, device: str | torch.device = "cpu") -> Tokenizer:
    """Open our tokenizer folder or a published checkpoint (see the module docstring); frozen, on `device`.

    image_size / patch / pixel_range override the defaults for published checkpoints (256 px; p = 2 for an f8
    AutoencoderKL so that 256 px gives 256 tokens, else 1; aMUSEd's VQ-GAN reads images in [0, 1]).
    """
    p = Path(path).expanduser()
    if (p / "tokenizer.json").is_file():
        with _reading(p):
            tok = _load_ours(p)
    elif p.is_dir() and not (p / "config.json").is_file():
        sub = next((p / s for s in ("vae", "vqvae") if (p / s / "config.json").is_file()), None)
        if sub is None:
            raise FileNotFoundError(f"{p} has neither tokenizer.json nor config.json (nor vae/ or vqvae/); "
                                    f"{WHERE_FROM}")
        tok = load_tokenizer(sub, image_size=image_size, patch=patch, pixel_range=pixel_range, device=device)
    elif p.is_dir():
        with _reading(p):
            tok = _load_diffusers(p, image_size or 256, patch, pixel_range)
    elif p.is_file() and p.suffix in (".ckpt", ".pt", ".pth"):
        with _reading(p):
            tok = _load_ldm_kl(p, image_size or 256, patch or 1, pixel_range or "minus_one_one")
    elif p.exists():
        raise ValueError(f"tokenizer path {p} is a file but not a .ckpt/.pt/.pth LDM checkpoint; {WHERE_FROM}")
    elif re.fullmatch(r"[\w.-]+/[\w.-]+", str(path)):  # a Hugging Face repo id: its cache, downloading if online
        return load_tokenizer(_hub_snapshot(str(path)), image_size=image_size, patch=patch,
                              pixel_range=pixel_range, device=device)
    else:
        raise FileNotFoundError(f"tokenizer path {p} does not exist; {WHERE_FROM}")
    return tok.to(device)


@contextmanager
def _reading(where: Path) -> Iterator[None]:
    """A damaged or foreign file (truncated safetensors, malformed JSON, a missing key, a pickle that
    weights_only refuses) becomes one ValueError naming `where`; each library raises its own types for these."""
    try:
        yield
    except (FileNotFoundError, ValueError):
        raise  # ours, already naming the file
    except Exception as e:  # noqa: BLE001 - json, safetensors, diffusers (OSError), torch (pickle, RuntimeError)
        detail = " ".join(str(e).split())[:200]
        raise ValueError(f"tokenizer {where}: cannot be read ({type(e).__name__}: {detail}); {WHERE_FROM}") from None


def _hub_snapshot(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download

    try:  # only the autoencoder of a pipeline repo, e.g. amused/amused-256's vqvae/
        return Path(snapshot_download(repo_id, allow_patterns=["config.json", "diffusion_pytorch_model.safetensors",
                                                               "vae/*", "vqvae/*"]))
    except Exception as e:  # offline, unknown repo, no access: one clear line
        raise FileNotFoundError(f"tokenizer path {repo_id} is not a local path, and the Hugging Face repo could not "
                                f"be fetched ({type(e).__name__}); {WHERE_FROM}") from None


# Without the optional `accelerate` package diffusers warns and falls back to this anyway; say it up front.
_NO_ACCELERATE = dict(low_cpu_mem_usage=False)


def _load_ours(folder: Path) -> Tokenizer:
    from diffusers import AutoencoderKL, VQModel

    meta = json.loads((folder / "tokenizer.json").read_text())
    missing = [k for k in ("kind", "image_size", "pixel_range", "checksum")
               if not isinstance(meta, dict) or k not in meta]
    if missing:
        raise ValueError(f"{folder / 'tokenizer.json'}: missing {', '.join(missing)} (written by save_tokenizer)")
    if not (folder / "model" / "config.json").is_file():
        raise FileNotFoundError(f"{folder / 'model' / 'config.json'} is missing: the tokenizer folder is incomplete")
    if meta["kind"] == "vq":
        model = VQModel.from_pretrained(folder / "model", **_NO_ACCELERATE)
        tok: Tokenizer = VQTokenizer(model, image_size=meta["image_size"], pixel_range=meta["pixel_range"],
                                     local=bool(meta.get("local", False)))
    elif meta["kind"] == "kl":
        model = AutoencoderKL.from_pretrained(folder / "model", **_NO_ACCELERATE)
        tok = KLTokenizer(model, image_size=meta["image_size"], patch=meta["patch"], scale=meta["scale"],
                          shift=meta["shift"], pixel_range=meta["pixel_range"], local=bool(meta.get("local", False)))
    else:
        raise ValueError(f"{folder / 'tokenizer.json'}: kind must be 'vq' or 'kl', got {meta['kind']!r}")
    if tok.checksum != meta["checksum"]:
        raise ValueError(f"{folder}: the weights in model/ do not match the checksum in tokenizer.json")
    return tok


def _load_diffusers(folder: Path, image_size: int, patch: int | None, pixel_range: str | None) -> Tokenizer:
    from diffusers import AutoencoderKL, VQModel

    config = json.loads((folder / "config.json").read_text())
    cls = config.get("_class_name")
    if cls == "VQModel":
        # aMUSEd's pipeline feeds the VQ-GAN images in [0, 1] (VaeImageProcessor(do_normalize=False))
        return VQTokenizer(VQModel.from_pretrained(folder, **_NO_ACCELERATE), image_size=image_size,
                           pixel_range=pixel_range or "zero_one")
    if cls == "AutoencoderKL":
        model = AutoencoderKL.from_pretrained(folder, **_NO_ACCELERATE)
        factor = 2 ** (len(model.config.block_out_channels) - 1)
        patch = patch or max(1, image_size // factor // 16)  # the paper's 16x16 grid: SD-VAE f8 at 256 -> p = 2
        return KLTokenizer(model, image_size=image_size, patch=patch, scale=model.config.scaling_factor,
                           shift=model.config.shift_factor or 0.0, pixel_range=pixel_range or "minus_one_one")
    raise ValueError(f"{folder / 'config.json'}: _class_name must be AutoencoderKL or VQModel, got {cls!r}")


# MAR multiplies its KL-16 latents by 0.2325 "to normalize the std of latent to be 1" (LTH14/mar, engine_mar.py)
MAR_KL16_SCALE = 0.2325


def _load_ldm_kl(path: Path, image_size: int, patch: int, pixel_range: str) -> Tokenizer:
    from diffusers import AutoencoderKL

    raw = torch.load(path, map_location="cpu", weights_only=True)
    sd = raw.get("model", raw.get("state_dict", raw)) if isinstance(raw, dict) else raw
    sd = {k.removeprefix("first_stage_model."): v for k, v in sd.items()}
    sd = {k: v for k, v in sd.items() if k.split(".")[0] in ("encoder", "decoder", "quant_conv", "post_quant_conv")}
    if "encoder.conv_in.weight" not in sd:
        raise ValueError(f"{path}: no LDM autoencoder weights (encoder.conv_in.weight) under 'model' or 'state_dict'")
    model = AutoencoderKL(**ldm_kl_config(sd))
    model.load_state_dict(ldm_to_diffusers(sd), strict=True)
    return KLTokenizer(model, image_size=image_size, patch=patch, scale=MAR_KL16_SCALE, pixel_range=pixel_range)


def ldm_kl_config(sd: dict[str, torch.Tensor]) -> dict:
    """diffusers AutoencoderKL arguments read off an LDM/MAR KL state dict's shapes and key names."""
    levels = 1 + max(int(m.group(1)) for k in sd if (m := re.match(r"encoder\.down\.(\d+)\.", k)))
    blocks = 1 + max(int(m.group(1)) for k in sd if (m := re.match(r"encoder\.down\.0\.block\.(\d+)\.", k)))
    widths = [sd[f"encoder.down.{i}.block.0.conv1.weight"].shape[0] for i in range(levels)]
    enc_attn = [any(k.startswith(f"encoder.down.{i}.attn.") for k in sd) for i in range(levels)]
    # LDM's decoder.up[i] works at the resolution of encoder.down[i]; diffusers lists up blocks lowest-res first
    dec_attn = [any(k.startswith(f"decoder.up.{i}.attn.") for k in sd) for i in reversed(range(levels))]
    return dict(
        in_channels=sd["encoder.conv_in.weight"].shape[1], out_channels=sd["decoder.conv_out.weight"].shape[0],
        down_block_types=["AttnDownEncoderBlock2D" if a else "DownEncoderBlock2D" for a in enc_attn],
        up_block_types=["AttnUpDecoderBlock2D" if a else "UpDecoderBlock2D" for a in dec_attn],
        block_out_channels=widths, layers_per_block=blocks, latent_channels=sd["post_quant_conv.weight"].shape[0],
        norm_num_groups=32, mid_block_add_attention="encoder.mid.attn_1.q.weight" in sd,
    )


_ATTN_NAMES = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}


def ldm_to_diffusers(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename LDM autoencoder keys (MAR's models/vae.py layout) to diffusers' AutoencoderKL names."""
    levels = 1 + max(int(m.group(1)) for k in sd if (m := re.match(r"encoder\.down\.(\d+)\.", k)))
    out = {}
    for key, value in sd.items():
        k = re.sub(r"^encoder\.down\.(\d+)\.block\.", r"encoder.down_blocks.\1.resnets.", key)
        k = re.sub(r"^encoder\.down\.(\d+)\.attn\.", r"encoder.down_blocks.\1.attentions.", k)
        k = re.sub(r"^encoder\.down\.(\d+)\.downsample\.", r"encoder.down_blocks.\1.downsamplers.0.", k)
        k = re.sub(r"^decoder\.up\.(\d+)\.(block|attn|upsample)\.",
                   lambda m: f"decoder.up_blocks.{levels - 1 - int(m.group(1))}."
                             f"{dict(block='resnets.', attn='attentions.', upsample='upsamplers.0.')[m.group(2)]}", k)
        k = re.sub(r"\.mid\.block_(\d)\.", lambda m: f".mid_block.resnets.{int(m.group(1)) - 1}.", k)
        k = k.replace(".mid.attn_1.", ".mid_block.attentions.0.").replace(".norm_out.", ".conv_norm_out.")
        k = k.replace(".nin_shortcut.", ".conv_shortcut.")
        if (m := re.match(r"(.*\.attentions\.\d+\.)(norm|q|k|v|proj_out)\.(weight|bias)$", k)):
            k = m.group(1) + _ATTN_NAMES[m.group(2)] + "." + m.group(3)
            if m.group(2) != "norm" and value.ndim == 4:
                value = value[:, :, 0, 0]  # LDM's 1x1 convs are diffusers' linear layers
        out[k] = value
    return out


def downsampling_factor(image_size: int, grid: int, patch: int = 1) -> int:
    """The autoencoder's spatial reduction for a token grid: image_size / (grid * patch), a power of two."""
    f = image_size // (grid * patch)
    if f * grid * patch != image_size or f < 1 or 2 ** int(math.log2(f)) != f:
        raise ValueError(f"image_size {image_size} / (grid {grid} x patch {patch}) must be a power of two")
    return f
