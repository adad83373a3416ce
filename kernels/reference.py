"""Dense masked softmax attention: the definition the fast paths are tested against (tests only)."""

from __future__ import annotations

import torch

from .layout import Layout


def pattern_mask(layout: Layout, heads: int) -> torch.Tensor:
    """[heads or 1, N, N] bool from the pattern's predicate on every (i, j) pair."""
    pos = torch.arange(layout.seq_len)
    head = torch.arange(heads)[:, None, None] if layout.table_heads > 1 else torch.zeros(1, 1, 1, dtype=torch.long)
    return layout.allowed(pos[None, :, None], pos[None, None, :], head)


def reference_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: Layout,
                        scale: float) -> torch.Tensor:
    """[B, H, N, D] -> [B, H, N, D], computed in float32 through an N x N score matrix."""
    mask = pattern_mask(layout, q.shape[1]).to(q.device)
    s = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale
    s = s.masked_fill(~mask, float("-inf"))
    return torch.matmul(torch.softmax(s, -1), v.float()).to(q.dtype)
