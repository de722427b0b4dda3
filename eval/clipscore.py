"""CLIP score: 100 * max(cos(image embedding, prompt embedding), 0) per image, averaged over images.

The definition of Hessel et al. (2021, arXiv 2104.08718, eq. 1) with w = 100: each image's cosine is clamped at
0 before the mean. torchmetrics' CLIPScore clamps the mean instead (`CLIPScore.compute`: max(100 * mean cos, 0)),
which differs as soon as one image scores below zero; the two agree otherwise. The model is an open_clip one;
weights come from a local file (`--clip-weights PATH`) or open_clip's own download into the Hugging Face cache.
The default, ViT-L/14 with OpenAI's weights, is torchmetrics' default model and the one
GenEval's colour classifier uses (`ViT-L-14-quickgelu`: open_clip's plain `ViT-L-14` has GELU, not OpenAI's
QuickGELU).
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Iterable, Sequence

import torch

from harness.errors import FluidbenchError

DEFAULT_MODEL = "ViT-L-14-quickgelu"
DEFAULT_PRETRAINED = "openai"


class ClipScorer:
    """An open_clip model with its image preprocessing and tokenizer, scoring image-prompt pairs."""

    def __init__(self, model: str = DEFAULT_MODEL, weights: str | Path | None = None,
                 device: str | torch.device = "cpu"):
        import open_clip

        pretrained = self._resolve(open_clip, model, weights)
        try:
            net, _, preprocess = open_clip.create_model_and_transforms(model, pretrained=pretrained, device=device)
        except RuntimeError as e:  # open_clip reports both a failed download and a bad state dict this way
            first = str(e).splitlines()[0][:300]
            if Path(str(pretrained)).is_file():
                raise FluidbenchError(f"--clip-weights {pretrained}: not an open_clip {model} checkpoint "
                                      f"({first})") from None
            raise FluidbenchError(f"CLIP weights for {model} ({pretrained}) are not in the Hugging Face cache and "
                                  f"the download failed; pass --clip-weights PATH, e.g. open_clip_pytorch_model.bin "
                                  f"from huggingface.co/{self._hub_id(open_clip, model, pretrained)}") from None
        self.net = net.eval().requires_grad_(False)
        self.preprocess = preprocess
        self.tokenizer = open_clip.get_tokenizer(model)
        self.model, self.pretrained = model, str(pretrained)

    @staticmethod
    def _resolve(open_clip, model: str, weights: str | Path | None) -> str:
        if model.startswith(("local-dir:", "hf-hub:")):
            return None  # the folder (or hub repo) holds config and weights together
        if open_clip.get_model_config(model) is None:
            raise FluidbenchError(f"--clip-model {model}: not an open_clip architecture "
                                  f"(e.g. {DEFAULT_MODEL}, ViT-B-32, or local-dir:/path/to/folder)")
        if weights is None:
            if not open_clip.get_pretrained_cfg(model, DEFAULT_PRETRAINED):
                raise FluidbenchError(f"--clip-weights: required for {model} (open_clip has no OpenAI weights for it)")
            return DEFAULT_PRETRAINED
        path = Path(weights)
        if path.is_file():
            return str(path)
        if open_clip.get_pretrained_cfg(model, str(weights)):
            return str(weights)  # a tag such as "laion2b_s32b_b82k": open_clip downloads it
        raise FluidbenchError(f"--clip-weights {weights}: no such file (expected an open_clip checkpoint for "
                              f"{model}, e.g. open_clip_pytorch_model.bin), and not a known pretrained tag")

    @staticmethod
    def _hub_id(open_clip, model: str, tag: str | None) -> str:
        cfg = open_clip.get_pretrained_cfg(model, tag or "") if tag else {}
        return cfg.get("hf_hub", "").rstrip("/") or "the model's release page"

    @torch.no_grad()
    def score(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        """uint8 images (B, 3, H, W) and B prompts -> (B,) CLIP scores, 100 * max(cos, 0)."""
        from torchvision.transforms.functional import to_pil_image

        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
            raise FluidbenchError(f"images of dtype {images.dtype} and shape {tuple(images.shape)}: "
                                  f"expected uint8 (B, 3, H, W)")
        if len(prompts) != len(images):
            raise FluidbenchError(f"{len(images)} images but {len(prompts)} prompts: expected one prompt per image")
        device = next(self.net.parameters()).device
        # open_clip's own evaluation transform (resize, centre crop, normalise) works on PIL images.
        pixels = torch.stack([self.preprocess(to_pil_image(image.cpu())) for image in images]).to(device)
        image_emb = self.net.encode_image(pixels).float()
        text_emb = self.net.encode_text(self.tokenizer(list(prompts)).to(device)).float()
        cos = torch.nn.functional.cosine_similarity(image_emb, text_emb, dim=-1)
        return 100 * cos.clamp(min=0)

    def protocol(self) -> dict:
        return {"metric": "clip_score", "model": self.model, "pretrained": self.pretrained,
                "definition": "100 * max(cos(image, text), 0), mean over images"}


def load_clip(model: str = DEFAULT_MODEL, weights: str | Path | None = None,
              device: str | torch.device = "cpu") -> ClipScorer:
    """An open_clip model for CLIP score: `weights` a local checkpoint file or tag; None = OpenAI's weights."""
    return ClipScorer(model, weights, device)


def clip_score(pairs: Iterable[tuple[torch.Tensor, Sequence[str]]], scorer: ClipScorer, *,
               progress: str | None = None, total: int | None = None) -> dict:
    """Mean CLIP score over batches of (uint8 images (B, 3, H, W), B prompts), with its protocol."""
    from tqdm import tqdm

    scores = []
    with tqdm(total=total, desc=progress, unit="img", disable=progress is None, file=sys.stderr) as bar:
        for images, prompts in pairs:
            scores.append(scorer.score(torch.as_tensor(images), prompts).cpu())
            bar.update(len(prompts))
    if not scores:
        raise FluidbenchError("CLIP score: no images given")
    s = torch.cat(scores).double()
    std = float(s.std()) if len(s) > 1 else 0.0
    return {"clip_score": float(s.mean()), "std": std, "n_images": len(s), **scorer.protocol()}
