"""Block-sparse weight matmul in Triton (CUDA; tested on the CPU with TRITON_INTERPRET=1).

Two kernels, no atomics:
  * ``_bsmm_kernel``: one program per (tile of tokens, output block j) walks the blocks listed for j
    and accumulates x[tile, i-block] @ w[k] in fp32. With the transposed lists (input block i, the
    output blocks it feeds) and W^T it computes dX: dy[tile, j-block] @ w[k]^T.
  * ``_bsmm_dw_kernel``: one program per (listed block k, share of the tokens) computes
    x[:, i-block]^T @ dy[:, j-block]: only the listed blocks of dW. When there are too few blocks to
    fill the GPU the tokens are split and torch adds the partial sums (deterministic).
Blocks of 8 run on 16-wide tiles (tl.dot's minimum), masked. Offsets that multiply a token or a
block index by a stride are int64.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_attention import _dot

MIN_TILE = 16  # tl.dot's smallest dimension
DW_TOKENS = 64  # tokens per step of the dW kernel


@triton.jit
def _bsmm_kernel(A, W, C, ptr, other, wid, T, s_a, s_c,
                 TRANS_W: tl.constexpr, BLOCK: tl.constexpr, TILE: tl.constexpr, BM: tl.constexpr,
                 PRECISION: tl.constexpr):
    """C[:, j-block] = sum over n in ptr[j]:ptr[j+1] of A[:, other[n]-block] @ W[wid[n]] (W^T if TRANS_W)."""
    j = tl.program_id(1)
    rows = (tl.program_id(0) * BM + tl.arange(0, BM)).to(tl.int64)
    row_ok = rows < T
    offs = tl.arange(0, TILE)
    feat_ok = offs < BLOCK
    if TRANS_W:  # tile[d, e] = w[e, d]
        w_off = offs[None, :] * BLOCK + offs[:, None]
    else:
        w_off = offs[:, None] * BLOCK + offs[None, :]
    w_mask = feat_ok[:, None] & feat_ok[None, :]
    a_mask = row_ok[:, None] & feat_ok[None, :]
    acc = tl.zeros([BM, TILE], dtype=tl.float32)
    start = tl.load(ptr + j)
    end = tl.load(ptr + j + 1)
    for n in range(start, end):
        i = tl.load(other + n)
        k = tl.load(wid + n).to(tl.int64)
        a = tl.load(A + rows[:, None] * s_a + (i * BLOCK + offs)[None, :], mask=a_mask, other=0.0)
        w = tl.load(W + k * (BLOCK * BLOCK) + w_off, mask=w_mask, other=0.0)
        acc += _dot(a, w, PRECISION)
    tl.store(C + rows[:, None] * s_c + (j * BLOCK + offs)[None, :], acc.to(C.dtype.element_ty), mask=a_mask)


@triton.jit
def _bsmm_dw_kernel(X, DY, DW, rows, cols, T, s_x, s_dy, tokens_per_split, nnz,
                    BLOCK: tl.constexpr, TILE: tl.constexpr, BT: tl.constexpr, PRECISION: tl.constexpr):
    """DW[split, k] = X[share, rows[k]-block]^T @ DY[share, cols[k]-block] over the split's share of tokens."""
    k = tl.program_id(0)
    split = tl.program_id(1)
    i = tl.load(rows + k)
    j = tl.load(cols + k)
    offs = tl.arange(0, TILE)
    feat_ok = offs < BLOCK
    acc = tl.zeros([TILE, TILE], dtype=tl.float32)
    first = split * tokens_per_split
    last = tl.minimum(first + tokens_per_split, T)
    for t in range(first, last, BT):
        toks = (t + tl.arange(0, BT)).to(tl.int64)
        mask = (toks < last)[:, None] & feat_ok[None, :]
        xa = tl.load(X + toks[:, None] * s_x + (i * BLOCK + offs)[None, :], mask=mask, other=0.0)
        g = tl.load(DY + toks[:, None] * s_dy + (j * BLOCK + offs)[None, :], mask=mask, other=0.0)
        acc += _dot(tl.trans(xa), g, PRECISION)
    out = DW + (split * nnz + k).to(tl.int64) * (BLOCK * BLOCK) + offs[:, None] * BLOCK + offs[None, :]
    tl.store(out, acc.to(DW.dtype.element_ty), mask=feat_ok[:, None] & feat_ok[None, :])


# As for attention (kernels/triton_attention.py): @triton.jit made these kernels either compiled or run by the
# interpreter when this module was imported; the launch decision and the kernels' constants follow that, never the
# environment of a later call.
INTERPRETED: bool = not isinstance(_bsmm_kernel, triton.runtime.JITFunction)


def _meta(dtype: torch.dtype, block: int) -> dict:
    """Compile-time constants shared by the kernels: fp32 exact (no tf32); 16-bit inputs upcast under the
    interpreter (it has no bf16 dot), native on the GPU."""
    return dict(BLOCK=block, TILE=max(block, MIN_TILE),
                PRECISION=1 if dtype == torch.float32 else 2 if INTERPRETED else 0, num_warps=4)


def _token_tile(tokens: int) -> int:
    return max(MIN_TILE, min(64, triton.next_power_of_2(tokens)))


def _product(a: torch.Tensor, w: torch.Tensor, ptr: torch.Tensor, other: torch.Tensor, wid: torch.Tensor,
             out_blocks: int, trans_w: bool) -> torch.Tensor:
    """[T, *] -> [T, out_blocks * block] through the lists (ptr, other, wid), one program per (tile, block)."""
    T, block = a.shape[0], w.shape[1]
    c = a.new_empty(T, out_blocks * block)
    if T:
        bm = _token_tile(T)
        _bsmm_kernel[(triton.cdiv(T, bm), out_blocks)](a, w, c, ptr, other, wid, T, a.stride(0), c.stride(0),
                                                        TRANS_W=trans_w, BM=bm, **_meta(a.dtype, block))
    return c


def dw_splits(nnz: int, tokens: int, device: torch.device) -> int:
    """How many shares of the tokens the dW kernel splits into: enough programs for about four per SM,
    each share at least 4 x DW_TOKENS tokens. 1 off the GPU."""
    if device.type != "cuda":
        return 1
    wanted = 4 * torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(triton.cdiv(wanted, nnz), tokens // (4 * DW_TOKENS)))


def _weight_grad(x: torch.Tensor, dy: torch.Tensor, w: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor,
                 splits: int) -> torch.Tensor:
    """dW [nnz, b, b] of the listed blocks."""
    T, (nnz, block) = x.shape[0], w.shape[:2]
    if T == 0:
        return torch.zeros_like(w)
    if splits == 1:
        dw = torch.empty_like(w)
    else:
        dw = torch.empty(splits, nnz, block, block, device=w.device, dtype=torch.float32)
    per = triton.cdiv(triton.cdiv(T, splits), DW_TOKENS) * DW_TOKENS
    _bsmm_dw_kernel[(nnz, splits)](x, dy, dw, rows, cols, T, x.stride(0), dy.stride(0), per, nnz,
                                   BT=DW_TOKENS, **_meta(x.dtype, block))
    return dw if splits == 1 else dw.sum(0).to(w.dtype)


def forward(x: torch.Tensor, w: torch.Tensor, tables: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """x [T, in] @ W -> (y [T, out], x saved for the backward). tables: ``BlockSparseMatMul.device_tables``."""
    x, w = x.contiguous(), w.contiguous()
    col_ptr, col_rows, col_ids = tables[:3]
    return _product(x, w, col_ptr, col_rows, col_ids, col_ptr.numel() - 1, trans_w=False), x


def backward(dy: torch.Tensor, x: torch.Tensor, w: torch.Tensor, tables: tuple[torch.Tensor, ...], need_dx: bool,
             need_dw: bool) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """dy [T, out] -> (dx [T, in], dw [nnz, b, b]); None for a gradient not needed."""
    dy, w = dy.contiguous(), w.contiguous()
    _, _, _, row_ptr, row_cols, row_ids, rows, cols = tables
    dx = _product(dy, w, row_ptr, row_cols, row_ids, row_ptr.numel() - 1, trans_w=True) if need_dx else None
    dw = _weight_grad(x, dy, w, rows, cols, dw_splits(w.shape[0], x.shape[0], x.device)) if need_dw else None
    return dx, dw
