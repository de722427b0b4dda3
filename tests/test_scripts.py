"""The diagnostic scripts of docs/recipe.md compute what their tables say they do."""
from __future__ import annotations

import importlib.machinery
import importlib.util
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from variants.registry import build_variant

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

B, L, T, D, V = 3, 16, 5, 24, 32


def _script(name: str):
    path = Path(__file__).resolve().parent.parent / "scripts" / name
    loader = importlib.machinery.SourceFileLoader(name.replace("-", "_"), str(path))
    module = importlib.util.module_from_spec(importlib.util.spec_from_loader(loader.name, loader))
    loader.exec_module(module)
    return module


def _variant(name: str, **options):
    torch.manual_seed(0)
    v = build_variant(name, "cpu-xs", seq_len=L, vocab_size=V, token_dim=4, text_dim=D, **options).eval()
    with torch.no_grad():  # trained-looking weights: the zero-initialised positions and mask token would hide bugs
        for p in (v.backbone.pos_embed, *v.order.parameters()):
            p.normal_(std=0.5)
    return v


def _batch(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    text_mask = torch.ones(B, T, dtype=torch.bool)
    text_mask[0, 3:] = False
    return torch.randint(0, V, (B, L), generator=g), torch.randn(B, T, D, generator=g), text_mask


def test_object_loss_raster_is_the_validation_cross_entropy_per_position():
    v, (tokens, text, text_mask) = _variant("vq-raster"), _batch()
    ce = _script("object-loss").position_losses(v, tokens, text, text_mask)
    assert ce.shape == (B, L)
    with torch.no_grad():
        assert torch.allclose(ce.mean(), v.loss(tokens, text, text_mask, validation=True), atol=1e-5)


@pytest.mark.parametrize("grid_bias", [0.0, 1.0])
def test_object_loss_random_order_knows_every_other_token(grid_bias):
    """Leave one out: position j holds the mask token, all others their own tokens; recomputed with a full pass
    of the backbone (not the script's one-position path)."""
    v, (tokens, text, text_mask) = _variant("vq-random", grid_bias=grid_bias), _batch()
    ce = _script("object-loss").position_losses(v, tokens, text, text_mask)
    with torch.no_grad():
        ctx, mask = v.backbone.encode_text(text, text_mask)
        x = v.embed(tokens)
        for j in (0, 5, L - 1):
            inputs = x.clone()
            inputs[:, j] = v.order.mask_token
            z = v.backbone(inputs, ctx, mask, causal=False)[:, j]
            want = F.cross_entropy(v.head.proj(z), tokens[:, j], reduction="none")
            assert torch.allclose(ce[:, j], want, atol=1e-5)
        other = tokens.clone()
        other[:, 5] = (tokens[:, 5] + 1) % V
        moved = _script("object-loss").position_losses(v, other, text, text_mask)
        assert not torch.allclose(moved[:, 4], ce[:, 4])  # a neighbour's loss does see token 5


def test_sample_paint_counts_the_tokens_that_are_not_the_commonest_code():
    s = _script("sample-paint")
    tokens = torch.full((4, L), 7)
    tokens[0, :3] = 2  # 3 painted
    tokens[1, 5] = 0  # 1 painted
    tokens[3] = torch.arange(L)  # 15 painted (position 7 holds the background code)
    assert s.background_code(tokens) == 7
    assert s.paint(tokens, 7).tolist() == [3, 1, 0, 15]
    assert s.describe(s.paint(tokens, 7)).startswith("4.8 per image (median 1, blank 25%)")
