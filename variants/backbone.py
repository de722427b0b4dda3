"""The transformer shared by all four variants: a text aligner, then pre-norm blocks of self-attention,
cross-attention to the text and an MLP. Causal or bidirectional per call; single-token decoding with a
pre-allocated KV cache for raster order.

Text conditioning: the frozen encoder's output (B, T, D) -> Linear(D, W) -> `aligner_blocks` pre-norm
self-attention blocks (padding masked) -> LayerNorm. The unconditional branch (guidance, and text dropout in
training) replaces a sample's aligned text by one learned null token repeated T times with an all-true mask:
attention over T identical keys equals attention to that single token, so the null branch does not depend on
T and batches mix conditional and null rows without reshaping.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


class SelfAttention(nn.Module):
    """Multi-head self-attention through SDPA; optional key padding mask, causal flag or KV cache."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        if width % heads:
            raise ValueError(f"width {width} is not divisible by heads {heads}")
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor, *, causal: bool = False, key_mask: torch.Tensor | None = None,
                cache: "LayerCache | None" = None, pos: int = 0, queries: torch.Tensor | None = None,
                bias: torch.Tensor | None = None) -> torch.Tensor:
        """`queries` (B, n) positions: outputs (B, n, W) there only, keys and values from every position
        (bidirectional attention only). `bias` (H, L, L): added to the attention logits of query position i
        and key position j (`grid_bias`), whichever of the paths below runs."""
        B, N, W = x.shape
        if queries is None:
            q, k, v = self.qkv(x).view(B, N, 3, self.heads, W // self.heads).permute(2, 0, 3, 1, 4)  # (B, H, N, hd)
        else:
            if causal or cache is not None:
                raise ValueError("query positions are for bidirectional attention without a KV cache")
            (wq, wkv), (bq, bkv) = self.qkv.weight.split([W, 2 * W]), self.qkv.bias.split([W, 2 * W])
            k, v = F.linear(x, wkv, bkv).view(B, N, 2, self.heads, W // self.heads).permute(2, 0, 3, 1, 4)
            N = queries.shape[1]
            xq = x.gather(1, queries[..., None].expand(-1, -1, W))  # (B, n, W)
            q = F.linear(xq, wq, bq).view(B, N, self.heads, W // self.heads).transpose(1, 2)  # (B, H, n, hd)
        if cache is not None:
            if cache.k is None:  # allocated once for the whole sequence, on the first decode step
                cache.k = k.new_empty(B, self.heads, cache.seq_len, W // self.heads)
                cache.v = torch.empty_like(cache.k)
            cache.k[:, :, pos:pos + N] = k
            cache.v[:, :, pos:pos + N] = v
            k, v = cache.k[:, :, :pos + N], cache.v[:, :, :pos + N]
            # SDPA's is_causal aligns top-left: a single new query would see only key 0. The query is the
            # latest position, so it may see every cached key: no mask at all.
            causal = False
        mask = None if key_mask is None else key_mask[:, None, None, :]  # (B, 1, 1, N)
        if bias is not None:
            if key_mask is not None:
                raise ValueError("a position bias is for the image tokens, not padded text")
            mask = self._bias_rows(bias, k.shape[2], cache=cache, pos=pos, queries=queries,
                                   n=N, causal=causal).to(q.dtype)
            causal = False  # in the mask
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)  # (B, H, N, hd)
        return self.proj(y.transpose(1, 2).reshape(B, N, W))

    @staticmethod
    def _bias_rows(bias: torch.Tensor, keys: int, *, cache, pos: int, queries: torch.Tensor | None, n: int,
                   causal: bool) -> torch.Tensor:
        """The rows of `bias` (H, L, L) for this call's queries, over its `keys` key positions 0..keys-1."""
        if queries is not None:
            return bias[:, queries, :keys].transpose(0, 1)  # (B, H, n, keys)
        if cache is not None:
            return bias[None, :, pos:pos + n, :keys]  # (1, H, n, keys): the queries at pos..pos+n-1
        rows = bias[None, :, :n, :keys]  # (1, H, n, n)
        if causal:
            rows = rows.masked_fill(torch.ones(n, keys, dtype=torch.bool, device=bias.device).triu(1), float("-inf"))
        return rows


def grid_bias(seq_len: int, heads: int, slope: float) -> torch.Tensor:
    """A fixed 2D distance bias on the square token grid (ALiBi, Press et al. 2022, on the image plane):
    -m_h * |p_i - p_j| with p the (row, column) of a position, |.| Euclidean, m_h = slope * 2^-h for head h.
    Head 0 favours its neighbours at once, the later heads less and less (the last nearly global), and q . k
    can still override it. Not in MAR or Fluid (learned absolute positions only): an inductive bias for
    models trained briefly, where random order does not learn position-based attention (docs/recipe.md)."""
    side = math.isqrt(seq_len)
    if side * side != seq_len:
        raise ValueError(f"grid_bias needs a square token grid, got {seq_len} tokens")
    r = torch.arange(seq_len)
    y, x = (r // side).double(), (r % side).double()
    dist = ((y[:, None] - y[None]) ** 2 + (x[:, None] - x[None]) ** 2).sqrt()  # (L, L)
    m = slope * 2.0 ** -torch.arange(heads, dtype=torch.float64)
    return (-m[:, None, None] * dist).float()  # (H, L, L)


class CrossAttention(nn.Module):
    """Image queries attend to the aligned text; padded text positions are masked out."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(width, width)
        self.kv = nn.Linear(width, 2 * width)
        self.proj = nn.Linear(width, width)

    def text_kv(self, ctx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        B, T, W = ctx.shape
        k, v = self.kv(ctx).view(B, T, 2, self.heads, W // self.heads).permute(2, 0, 3, 1, 4)  # (B, H, T, hd)
        return k, v

    def forward(self, x: torch.Tensor, kv: tuple[torch.Tensor, torch.Tensor],
                text_mask: torch.Tensor | None) -> torch.Tensor:
        """`text_mask` None: every text position is real (SDPA without a mask is ~1.5x faster on a CPU)."""
        B, N, W = x.shape
        q = self.q(x).view(B, N, self.heads, W // self.heads).transpose(1, 2)  # (B, H, N, hd)
        mask = None if text_mask is None else text_mask[:, None, None, :]  # (B, 1, 1, T)
        y = F.scaled_dot_product_attention(q, kv[0], kv[1], attn_mask=mask)
        return self.proj(y.transpose(1, 2).reshape(B, N, W))


class MLP(nn.Module):
    """Linear-GELU-Linear."""

    def __init__(self, width: int, ratio: float):
        super().__init__()
        self.fc1 = nn.Linear(width, int(width * ratio))
        self.fc2 = nn.Linear(int(width * ratio), width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class AlignerBlock(nn.Module):
    """Pre-norm self-attention + MLP over the text tokens (the trainable text aligner)."""

    def __init__(self, width: int, heads: int, mlp_ratio: float):
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(width), SelfAttention(width, heads)
        self.norm2, self.mlp = nn.LayerNorm(width), MLP(width, mlp_ratio)

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), key_mask=key_mask)
        return x + self.mlp(self.norm2(x))


class Block(nn.Module):
    """Pre-norm self-attention, cross-attention to the text, MLP."""

    def __init__(self, width: int, heads: int, mlp_ratio: float):
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(width), SelfAttention(width, heads)
        self.norm2, self.cross = nn.LayerNorm(width), CrossAttention(width, heads)
        self.norm3, self.mlp = nn.LayerNorm(width), MLP(width, mlp_ratio)

    def forward(self, x: torch.Tensor, ctx: torch.Tensor, text_mask: torch.Tensor | None, *, causal: bool = False,
                cache: "LayerCache | None" = None, pos: int = 0,
                text_kv: tuple[torch.Tensor, torch.Tensor] | None = None,
                positions: torch.Tensor | None = None, bias: torch.Tensor | None = None) -> torch.Tensor:
        """`positions` (B, n): return only those positions' outputs (B, n, W) (the last block of a pass whose
        other outputs nobody reads). `bias`: the self-attention's position bias (H, L, L) or None."""
        # The text K/V is computed inside forward (FSDP2 unshards a block's weights only around its forward);
        # when decoding, once per sample, on the first step; `text_kv` given: computed once by the caller
        # (random-order sampling, whose passes all see the same text).
        if text_kv is None and cache is None:
            text_kv = self.cross.text_kv(ctx)
        elif text_kv is None:
            if cache.text_kv is None:
                cache.text_kv = self.cross.text_kv(ctx)
            text_kv = cache.text_kv
        if positions is None:
            x = x + self.attn(self.norm1(x), causal=causal, cache=cache, pos=pos, bias=bias)
        else:  # only these positions' outputs are wanted: every later operation is per position
            x = x.gather(1, positions[..., None].expand(-1, -1, x.shape[-1])) + self.attn(
                self.norm1(x), causal=causal, cache=cache, pos=pos, queries=positions, bias=bias)
        x = x + self.cross(self.norm2(x), text_kv, text_mask)
        return x + self.mlp(self.norm3(x))


@dataclass
class LayerCache:
    """One block's decode state: text K/V computed once, self-attention K/V filled position by position."""
    seq_len: int
    text_kv: tuple[torch.Tensor, torch.Tensor] | None = None
    k: torch.Tensor | None = None
    v: torch.Tensor | None = None


@dataclass
class KVCache:
    """Decode state of the whole stack for one batch of samples."""
    layers: list[LayerCache]
    ctx: torch.Tensor
    text_mask: torch.Tensor | None
    length: int = 0  # positions written so far


class Backbone(nn.Module):
    """Text aligner + learned positions + `blocks` transformer blocks + final LayerNorm."""

    def __init__(self, *, seq_len: int, width: int, blocks: int, heads: int, text_dim: int, aligner_blocks: int,
                 mlp_ratio: float = 4.0, grid_bias_slope: float = 0.0):
        super().__init__()
        self.seq_len, self.width = seq_len, width
        self.text_proj = nn.Linear(text_dim, width)
        self.aligner = nn.ModuleList(AlignerBlock(width, heads, mlp_ratio) for _ in range(aligner_blocks))
        self.aligner_norm = nn.LayerNorm(width)
        self.null_text = nn.Parameter(torch.zeros(width))
        self.pos_embed = nn.Parameter(torch.zeros(1, seq_len, width))
        self.blocks = nn.ModuleList(Block(width, heads, mlp_ratio) for _ in range(blocks))
        self.norm = nn.LayerNorm(width)
        # grid_bias_slope > 0: every image self-attention adds grid_bias (fixed, so not in the state dict)
        self.register_buffer("attn_bias", grid_bias(seq_len, heads, grid_bias_slope) if grid_bias_slope > 0
                             else None, persistent=False)

    def encode_text(self, text: torch.Tensor, text_mask: torch.Tensor,
                    drop: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Aligned text (B, T, W) and its mask; rows where `drop` (B,) is True become the null text."""
        x = self.text_proj(text)  # (B, T, W)
        # A caption with no real token (empty after padding) would give NaN attention rows: such rows attend
        # to everything here and are replaced by the null text below, without a host sync.
        empty = ~text_mask.any(dim=1)  # (B,)
        key_mask = text_mask | empty[:, None]
        for block in self.aligner:
            x = block(x, key_mask)
        x = self.aligner_norm(x)
        drop = empty if drop is None else drop | empty
        null = self.null_text.to(x.dtype).expand_as(x)
        x = torch.where(drop[:, None, None], null, x)
        return x, torch.where(drop[:, None], torch.ones_like(text_mask), text_mask)

    def guided_text(self, text: torch.Tensor, text_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[conditional; null] text for a batch-doubled guided pass: (2B, T, W) and (2B, T)."""
        ctx, mask = self.encode_text(text, text_mask)
        null = self.null_text.to(ctx.dtype).expand_as(ctx)
        return torch.cat([ctx, null]), torch.cat([mask, torch.ones_like(mask)])

    def forward(self, x: torch.Tensor, ctx: torch.Tensor, text_mask: torch.Tensor | None, *, causal: bool,
                text_kv: list[tuple[torch.Tensor, torch.Tensor]] | None = None,
                positions: torch.Tensor | None = None) -> torch.Tensor:
        """x: embedded inputs (B, N, W) at positions 0..N-1 -> normalised outputs (B, N, W). `text_mask` None:
        no padding; `text_kv`: every block's text K/V from `text_kv(ctx)` (sampling; not under FSDP2);
        `positions` (B, n): only the outputs there, (B, n, W) (random-order sampling reads the revealed ones:
        the last block then computes its queries, cross-attention and MLP for those positions alone)."""
        x = x + self.pos_embed[:, : x.shape[1]]
        last = len(self.blocks) - 1
        for i, block in enumerate(self.blocks):
            x = block(x, ctx, text_mask, causal=causal, text_kv=None if text_kv is None else text_kv[i],
                      positions=positions if i == last else None, bias=self.attn_bias)
        if positions is not None and not self.blocks:
            x = x.gather(1, positions[..., None].expand(-1, -1, x.shape[-1]))
        return self.norm(x)

    def text_kv(self, ctx: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Every block's cross-attention K/V of the aligned text, for passes that all see the same text."""
        return [block.cross.text_kv(ctx) for block in self.blocks]

    def new_cache(self, ctx: torch.Tensor, text_mask: torch.Tensor | None) -> KVCache:
        """Decode state for raster sampling (buffers are allocated on the first decode step)."""
        return KVCache([LayerCache(self.seq_len) for _ in self.blocks], ctx, text_mask)

    def decode(self, x: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """One new input (B, 1, W) at position cache.length -> its output (B, 1, W); advances the cache."""
        pos = cache.length
        if pos >= self.seq_len:
            raise ValueError(f"KV cache is full: {self.seq_len} positions already decoded")
        x = x + self.pos_embed[:, pos:pos + 1]
        for block, layer in zip(self.blocks, cache.layers):
            x = block(x, cache.ctx, cache.text_mask, cache=layer, pos=pos, bias=self.attn_bias)
        cache.length = pos + 1
        return self.norm(x)
