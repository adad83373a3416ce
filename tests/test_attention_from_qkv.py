"""attention_from_qkv: the qkv projection's output in, the output projection's input out; on the CPU the compiled band
kernels take it packed (PackedBand) and give the same bits as attention() on unpacked q, k, v."""

import pytest
import torch

from kernels import attention, attention_from_qkv, make_layout
from kernels.cpu_attention import runs_packed
from kernels.cpu_kernels import library

needs_kernels = pytest.mark.skipif(library() is None, reason="the compiled CPU kernels do not run here")

# (kind, keywords, N): whole layouts the compiled band runs in place (packed), and one it does not (N is not a
# multiple of the block: a copy into block order first, so the unpacked path)
CASES = [("local", {"window": 70}, 192, True), ("strided", {"stride": 32}, 1024, True),
         ("local", {"window": 70}, 200, False)]


def unpacked(qkv: torch.Tensor, heads: int, layout) -> torch.Tensor:
    """attention() on q, k, v unpacked from qkv, back in qkv's layout: what the model did before."""
    B, N, width = qkv.shape
    q, k, v = qkv.view(B, N, 3, heads, width // (3 * heads)).permute(2, 0, 3, 1, 4).unbind(0)
    return attention(q, k, v, layout).transpose(1, 2).reshape(B, N, width // 3)


def value_and_grad(fn, qkv: torch.Tensor, dy: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    qkv = qkv.clone().requires_grad_(True)
    y = fn(qkv)
    (grad,) = torch.autograd.grad(y, qkv, dy)
    return y, grad


@needs_kernels
@pytest.mark.parametrize("kind,kw,n,packed", CASES, ids=["local", "strided", "local-unaligned"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("d", [32, 64])
def test_packed_path_gives_the_bits_of_attention_on_unpacked_q_k_v(kind, kw, n, packed, dtype, d):
    heads, batch = 3, 2
    layout = make_layout(kind, n, 32, heads=heads, **kw)
    g = torch.Generator().manual_seed(1)
    qkv = torch.randn(batch, n, 3 * heads * d, generator=g).to(dtype)
    dy = torch.randn(batch, n, heads * d, generator=g).to(dtype)
    assert runs_packed(qkv, layout, heads) == packed
    y, grad = value_and_grad(lambda t: attention_from_qkv(t, heads, layout), qkv, dy)
    want_y, want_grad = value_and_grad(lambda t: unpacked(t, heads, layout), qkv, dy)
    assert y.dtype == grad.dtype == dtype and y.shape == (batch, n, heads * d)
    assert torch.equal(y, want_y)
    assert torch.equal(grad, want_grad)


@needs_kernels
def test_packed_path_under_autocast_takes_a_float32_gradient_and_matches_the_reference():
    """Under CPU bf16 autocast the projection gives bf16; a float32 gradient from downstream is taken as it is."""
    heads, n, d = 2, 1024, 32
    layout = make_layout("strided", n, 32, heads=heads, stride=32)
    g = torch.Generator().manual_seed(2)
    qkv = torch.randn(1, n, 3 * heads * d, generator=g).to(torch.bfloat16)
    dy = torch.randn(1, n, heads * d, generator=g)
    assert runs_packed(qkv, layout, heads)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, grad = value_and_grad(lambda t: attention_from_qkv(t, heads, layout).float(), qkv, dy)
    ref_y, ref_grad = value_and_grad(lambda t: unpacked(t.float(), heads, layout), qkv.float(), dy)
    assert grad.dtype == torch.bfloat16
    assert (y - ref_y).abs().max() <= 2e-2 * ref_y.abs().max()
    assert (grad.float() - ref_grad).abs().max() <= 2e-2 * ref_grad.abs().max()


def test_attention_from_qkv_names_bad_input():
    layout = make_layout("local", 64, 16, window=16)
    qkv = torch.zeros(1, 64, 3 * 2 * 32)
    for heads, match in ((0, "heads must be a positive integer"), (True, "heads must be a positive integer"),
                         (5, "3 x heads")):
        with pytest.raises(ValueError, match=match):
            attention_from_qkv(qkv, heads, layout)
    with pytest.raises(ValueError, match=r"qkv must be of shape \[B, N, 3 H D\]"):
        attention_from_qkv(qkv[0], 2, layout)
    with pytest.raises(ValueError, match="seq_len=64"):
        attention_from_qkv(torch.zeros(1, 32, 3 * 2 * 32), 2, layout)
    with pytest.raises(ValueError, match="head dim D must be one of"):
        attention_from_qkv(torch.zeros(1, 64, 3 * 2 * 16), 2, layout)
    with pytest.raises(ValueError, match="dtype"):
        attention_from_qkv(qkv.double(), 2, layout)


@needs_kernels
def test_packed_path_built_for_avx2_without_avx512_gives_the_same_bits(tmp_path, monkeypatch):
    """8-wide vectors and the generic bfloat16 rounding (no AVX512-BF16 instruction) in heads_copy."""
    from helpers import avx2_kernels

    heads, n, d = 2, 192, 32
    layout = make_layout("local", n, 32, heads=heads, window=70)
    g = torch.Generator().manual_seed(3)
    with avx2_kernels(tmp_path, monkeypatch):
        for dtype in (torch.float32, torch.bfloat16):
            qkv = torch.randn(2, n, 3 * heads * d, generator=g).to(dtype)
            dy = torch.randn(2, n, heads * d, generator=g).to(dtype)
            assert runs_packed(qkv, layout, heads)
            got = value_and_grad(lambda t: attention_from_qkv(t, heads, layout), qkv, dy)
            want = value_and_grad(lambda t: unpacked(t, heads, layout), qkv, dy)
            assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))
