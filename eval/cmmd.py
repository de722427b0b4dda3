"""CMMD (Jayasumana et al. 2024, "Rethinking FID", arXiv 2401.09603): MMD between CLIP image embeddings.

The kernel and estimator are those of the authors' reference code (google-research, `cmmd/distance.py`): a
Gaussian RBF kernel with sigma = 10 on unit-normalised embeddings, the plain (biased) V-statistic mean k(x, x') +
mean k(y, y') - 2 mean k(x, y) over all pairs, diagonals included, times 1000. The embeddings are CLIP ViT-L/14
at 336 px with OpenAI's weights (`cmmd/embedding.py`), here through open_clip (`ViT-L-14-336-quickgelu`) and its
own evaluation transform. CMMD has no Gaussian assumption and no small-N bias in the way FID has.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import torch

from harness.errors import FluidbenchError

SIGMA, SCALE = 10.0, 1000.0  # cmmd/distance.py: _SIGMA, _SCALE
CMMD_MODEL = "ViT-L-14-336-quickgelu"


def mmd_rbf(x: torch.Tensor, y: torch.Tensor, sigma: float = SIGMA, scale: float = SCALE) -> float:
    """scale * (mean k(x, x') + mean k(y, y') - 2 mean k(x, y)), k(a, b) = exp(-|a - b|^2 / (2 sigma^2))."""
    x, y = x.double(), y.to(x.device).double()
    gamma = 1.0 / (2 * sigma ** 2)

    def mean_kernel(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        d2 = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2 * a @ b.T  # (A, B) squared distances
        return torch.exp(-gamma * d2).mean()

    return float(scale * (mean_kernel(x, x) + mean_kernel(y, y) - 2 * mean_kernel(x, y)))


class ClipImageFeatures:
    """Unit-normalised open_clip image embeddings of uint8 images, behind eval.fid's FeatureExtractor interface."""

    def __init__(self, model: str = CMMD_MODEL, weights: str | Path | None = None,
                 device: str | torch.device = "cpu"):
        from eval.clipscore import load_clip

        self.scorer = load_clip(model, weights, device=device)  # local file, open_clip's cache, or a one-line error
        self.name = f"clip-{model}"
        self.dim = int(self.scorer.net.visual.output_dim)
        source = self.scorer.pretrained
        # the weights' identity: a local file's sha256, else open_clip's tag (its cache holds one file per tag)
        self.checksum = _sha256(source) if Path(source).is_file() else hashlib.sha256(
            f"{model}:{source}".encode()).hexdigest()

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        from torchvision.transforms.functional import to_pil_image

        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
            raise FluidbenchError(f"images of dtype {images.dtype} and shape {tuple(images.shape)}: "
                                  f"expected uint8 (B, 3, H, W)")
        device = next(self.scorer.net.parameters()).device
        pixels = torch.stack([self.scorer.preprocess(to_pil_image(image.cpu())) for image in images]).to(device)
        emb = self.scorer.net.encode_image(pixels).float()
        return emb / emb.norm(dim=-1, keepdim=True)  # (B, dim), unit length as cmmd/embedding.py


def _sha256(path: str | Path) -> str:
    from harness.hashing import sha256_file

    return sha256_file(path)
