"""attention_decode(): one query against a KV cache equals that row of the full attention."""

import pytest
import torch

from kernels import attention, attention_decode, make_layout

PATTERNS = [
    ("all", {}),
    ("local", {"window": 9}),
    ("strided", {"stride": 7}),
    ("fixed", {"stride": 12, "summary": 3}),
    ("fixed", {"stride": 12, "summary": 3, "distinct_summaries": True}),
]


@pytest.mark.parametrize("kind,kw", PATTERNS, ids=["all", "local", "strided", "fixed", "fixed-distinct"])
def test_decode_equals_full_attention_at_every_position(kind, kw):
    n, heads = 61, 4
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, heads, n, 32, generator=g) for _ in range(3))
    layout = make_layout(kind, n, 16, heads=heads, **kw)
    full = attention(q, k, v, layout, backend="reference")
    k_cache = torch.cat([k, torch.randn(2, heads, 5, 32)], 2)  # longer cache: entries past pos unread
    v_cache = torch.cat([v, torch.randn(2, heads, 5, 32)], 2)
    for pos in range(n):
        # entries after pos hold garbage: decoding must not read them
        k_step, v_step = k_cache.clone(), v_cache.clone()
        k_step[:, :, pos + 1:] = 1e4
        v_step[:, :, pos + 1:] = float("nan")
        out = attention_decode(q[:, :, pos], k_step, v_step, pos, layout)
        torch.testing.assert_close(out, full[:, :, pos], rtol=1e-5, atol=1e-6, msg=f"pos {pos}")


def test_decode_reads_only_the_allowed_entries():
    """Poison every cache entry the pattern does not allow: the result must not change."""
    n = 50
    layout = make_layout("local", n, 16, window=6)
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(1, 1, n, 32, generator=g) for _ in range(3))
    pos = 40
    ref = attention_decode(q[:, :, pos], k, v, pos, layout)
    k2, v2 = k.clone(), v.clone()
    k2[:, :, : pos - 6] = float("nan")
    v2[:, :, : pos - 6] = float("nan")
    torch.testing.assert_close(attention_decode(q[:, :, pos], k2, v2, pos, layout), ref)


def test_decode_bad_inputs():
    layout = make_layout("strided", 32, 16, heads=2, stride=4)
    q = torch.randn(1, 2, 32)
    k = v = torch.randn(1, 2, 20, 32)
    with pytest.raises(ValueError, match="pos must be an int in \\[0, 32\\)"):
        attention_decode(q, k, v, 32, layout)
    with pytest.raises(ValueError, match="past the cache length"):
        attention_decode(q, k, v, 25, layout)
    with pytest.raises(ValueError, match="q_t must be \\[B, H, D\\]"):
        attention_decode(torch.randn(1, 3, 32), k, v, 3, layout)
    with pytest.raises(ValueError, match="same shape"):
        attention_decode(q, k, v[:, :, :10], 3, layout)
    with pytest.raises(ValueError, match="pos must be an int"):
        attention_decode(q, k, v, 2.0, layout)
