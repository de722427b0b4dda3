"""The context diagnostic (eval/context.py): which tokens each order predicts from exactly k known, and that the
curve sees a model's use of context."""
from __future__ import annotations

import pytest
import torch

from eval.context import context_losses, known_counts
from variants.registry import build_variant

L, V, C, D, T = 16, 8, 4, 12, 3
SHAPES = dict(seq_len=L, vocab_size=V, token_dim=C, text_dim=D, steps=4, head_steps=4)

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def tiny(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_variant(name, "cpu-xs", **SHAPES).eval()


def tokens_for(v, n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if v.token_kind == "vq":
        return torch.randint(0, V, (n, L), generator=g)
    return torch.randn(n, L, C, generator=g)


def test_known_counts_are_fractions_of_the_tokens_capped_below_all():
    assert known_counts("0,0.125,0.5,1", 64) == [0, 8, 32, 63]
    assert known_counts("1, 0, 0", 16) == [0, 15]
    for bad in ("", "0,x", "0,1.5", "-0.1"):
        with pytest.raises(ValueError, match="fractions of the tokens"):
            known_counts(bad, 16)


@pytest.mark.parametrize("name", ["vq-random", "kl-random", "vq-raster", "kl-raster"])
@pytest.mark.parametrize("k", [0, 5, L - 1])
def test_predicted_positions_see_exactly_k_known_tokens(name, k):
    """A changed token moves the outputs at the predicted positions iff it is one of the k known ones."""
    v = tiny(name)
    tokens = tokens_for(v, 2)
    text, mask = torch.randn(2, T, D), torch.ones(2, T, dtype=torch.bool)
    ctx, text_mask = v.backbone.encode_text(text, mask)

    def outputs(t):
        return v.order.outputs_known(v.backbone, v.embed(t), ctx, text_mask, k, torch.Generator().manual_seed(3))

    with torch.no_grad():
        z, predicted = outputs(tokens)
        assert predicted.shape == (2, L) and predicted.dtype == torch.bool
        assert predicted.sum(1).tolist() == ([L - k] * 2 if "random" in name else [1, 1])
        if "raster" in name:
            assert predicted[:, k].all()
        for pos in range(L):
            changed = tokens.clone()
            changed[:, pos] = (changed[:, pos] + 1) % V if v.token_kind == "vq" else changed[:, pos] + 1.0
            z2, _ = outputs(changed)
            moved = (z2 - z).abs().amax(-1)[predicted.view(2, L)].view(2, -1).amax(-1) > 1e-6  # (2,) per sample
            known = ~predicted if "random" in name else torch.arange(L).expand(2, L) < k
            assert moved.tolist() == known[:, pos].tolist(), f"position {pos}"


class _Split:
    """A CachedSplit stand-in: fixed tokens and captions (`batch` as CachedSplit's, no kl draws needed)."""

    def __init__(self, tokens, text):
        self.tokens, self.text = tokens, text

    def __len__(self):
        return len(self.tokens)

    def batch(self, indices, generator=None):
        return dict(tokens=self.tokens[indices], text=self.text[indices],
                    text_mask=torch.ones(len(indices), T, dtype=torch.bool))


def test_the_curve_falls_for_a_model_that_uses_context_and_is_deterministic():
    """Images of one repeated code (random per image), captions of noise: the text says nothing, the other
    tokens say everything. A random-order model trained briefly predicts far better with tokens known; an
    untrained one does not."""
    g = torch.Generator().manual_seed(0)
    codes = torch.randint(0, V, (512, 1), generator=g).expand(512, L).clone()
    split = _Split(codes, torch.randn(512, T, D, generator=g))
    v = tiny("vq-random")
    fresh = context_losses(v, split, [0, 8, L - 1], size=128, batch_size=64, seed=0)
    assert abs(fresh[0] - fresh[-1]) < 0.05  # an untrained model: the same loss whatever is known
    v.train()
    opt = torch.optim.Adam(v.parameters(), lr=3e-3)
    for step in range(150):
        idx = torch.randint(0, 512, (64,), generator=g)
        b = split.batch(idx)
        loss = v.loss(b["tokens"], b["text"], b["text_mask"], generator=torch.Generator().manual_seed(step))
        opt.zero_grad()
        loss.backward()
        opt.step()
    v.eval()
    curve = context_losses(v, split, [0, 8, L - 1], size=128, batch_size=64, seed=0)
    assert curve == context_losses(v, split, [0, 8, L - 1], size=128, batch_size=64, seed=0)
    assert curve[0] > 1.5 and curve[-1] < 0.5 * curve[0], curve  # ln 8 = 2.08 with nothing known
