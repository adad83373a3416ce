"""Fused block-sparse FlashAttention in Triton (CUDA; tested on the CPU with TRITON_INTERPRET=1).

One program per (query block, batch * head) walks the layout's key-block lists:
the full blocks first with no mask, then the partial ones with the pattern's
element predicate. The forward saves the log-sum-exp; the backward recomputes
the probabilities in two passes without atomics: dK/dV per key block (walking
the transposed lists) and dQ per query block. Rows are mapped from the physical
(block) order to the original order by pointer arithmetic, so the strided
pattern reads the [R, l] transposed view of q/k/v in place, without a copy.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .layout import Layout
from .patterns import Fixed, Local, Strided

LOG2E = 1.4426950408889634

# the patterns' kind codes (kernels/patterns.py), as compile-time constants of the kernels
LOCAL: tl.constexpr = tl.constexpr(Local.code)
STRIDED: tl.constexpr = tl.constexpr(Strided.code)
FIXED: tl.constexpr = tl.constexpr(Fixed.code)


@triton.jit
def _dot(a, b, PRECISION: tl.constexpr):
    """tl.dot; PRECISION 0: native (tf32 for fp32 on GPU), 1: exact fp32, 2: upcast 16-bit inputs
    to fp32 first (Triton's interpreter has no bf16 dot; bf16 products are exact in fp32)."""
    if PRECISION == 2:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    if PRECISION == 0:
        return tl.dot(a, b)
    return tl.dot(a, b, input_precision="ieee")


@triton.jit
def _rows(t, N, R, L, PERMUTED: tl.constexpr):
    """Physical positions -> (original positions, valid)."""
    if PERMUTED:
        i = (t % R) * L + t // R
        valid = (t < R * L) & (i < N)
    else:
        i = t
        valid = t < N
    return tl.where(valid, i, N + t), valid


@triton.jit
def _allowed(i, j, th, WINDOW, L, C, NSUB, KIND: tl.constexpr):
    """The pattern's predicate (kernels/patterns.py ``allowed``) on original positions i [M, 1], j [1, N]
    for table head th (the layout's head: 0 for every head when the layout is shared)."""
    ok = j <= i
    if KIND == LOCAL:
        ok = ok & (j >= i - WINDOW)
    elif KIND == STRIDED:  # (i - j) % L == 0, from one remainder per row and one per column (not per score)
        ok = ok & ((i % L) == (j % L))
    elif KIND == FIXED:
        hi = L - (th % NSUB) * C
        col = j % L
        ok = ok & ((j // L == i // L) | ((col >= hi - C) & (col < hi)))
    return ok


@triton.jit
def _fwd_block_loop(acc, m_i, l_i, q, i, th, K, V, off_ptr, idx_ptr, s_kn, N, R, L, WINDOW, C, NSUB,
                    qk_scale, offs_n, offs_d, s_kd,
                    KIND: tl.constexpr, PERMUTED: tl.constexpr, MASKED: tl.constexpr,
                    BLOCK: tl.constexpr, PRECISION: tl.constexpr):
    start = tl.load(off_ptr)
    end = tl.load(off_ptr + 1)
    for n in range(start, end):
        kb = tl.load(idx_ptr + n)
        j, valid_k = _rows(kb * BLOCK + offs_n, N, R, L, PERMUTED)
        k = tl.load(K + j[:, None] * s_kn + offs_d[None, :] * s_kd, mask=valid_k[:, None], other=0.0)
        v = tl.load(V + j[:, None] * s_kn + offs_d[None, :] * s_kd, mask=valid_k[:, None], other=0.0)
        s = _dot(q, tl.trans(k), PRECISION) * qk_scale
        if MASKED:
            s = tl.where(_allowed(i[:, None], j[None, :], th, WINDOW, L, C, NSUB, KIND), s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        if MASKED:  # a row may have seen no key yet: keep m_i = -inf but subtract 0
            m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
        else:
            m_ref = m_new
        p = tl.math.exp2(s - m_ref[:, None])
        alpha = tl.math.exp2(m_i - m_ref)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, PRECISION)
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def _fwd_kernel(Q, K, V, O, LSE, qk_scale,
                full_off, full_idx, part_off, part_idx, s_off_h, s_full_h, s_part_h,
                s_b, s_h, s_n, s_d, H, HT, N, R, L, WINDOW, C, NSUB,
                KIND: tl.constexpr, PERMUTED: tl.constexpr, BLOCK: tl.constexpr, D: tl.constexpr,
                PRECISION: tl.constexpr):
    qb = tl.program_id(0)
    bh = tl.program_id(1)
    h = bh % H
    th = h % HT  # the head whose lists (and summary columns) apply: 0 when the layout is shared
    base = (bh // H) * s_b + h * s_h
    Q, K, V, O = Q + base, K + base, V + base, O + base
    offs_m = qb * BLOCK + tl.arange(0, BLOCK)
    offs_n = tl.arange(0, BLOCK)
    offs_d = tl.arange(0, D)
    i, valid_q = _rows(offs_m, N, R, L, PERMUTED)
    q = tl.load(Q + i[:, None] * s_n + offs_d[None, :] * s_d, mask=valid_q[:, None], other=0.0)
    m_i = tl.full([BLOCK], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK], tl.float32)
    acc = tl.zeros([BLOCK, D], tl.float32)
    tab = th * s_off_h + qb
    acc, m_i, l_i = _fwd_block_loop(acc, m_i, l_i, q, i, th, K, V, full_off + tab,
                                    full_idx + th * s_full_h, s_n, N, R, L, WINDOW, C, NSUB, qk_scale,
                                    offs_n, offs_d, s_d, KIND, PERMUTED, False, BLOCK, PRECISION)
    acc, m_i, l_i = _fwd_block_loop(acc, m_i, l_i, q, i, th, K, V, part_off + tab,
                                    part_idx + th * s_part_h, s_n, N, R, L, WINDOW, C, NSUB, qk_scale,
                                    offs_n, offs_d, s_d, KIND, PERMUTED, True, BLOCK, PRECISION)
    l_i = tl.where(l_i == 0.0, 1.0, l_i)
    o = acc / l_i[:, None]
    tl.store(O + i[:, None] * s_n + offs_d[None, :] * s_d, o.to(O.dtype.element_ty), mask=valid_q[:, None])
    tl.store(LSE + bh * N + i, m_i + tl.math.log2(l_i), mask=valid_q)


@triton.jit
def _bwd_kv_loop(dk, dv, k, v, j, th, Q, DO, LSE, DELTA, off_ptr, idx_ptr, s_n, s_d, N, R, L, WINDOW, C,
                 NSUB, qk_scale, offs_m, offs_d,
                 KIND: tl.constexpr, PERMUTED: tl.constexpr, MASKED: tl.constexpr,
                 BLOCK: tl.constexpr, PRECISION: tl.constexpr):
    start = tl.load(off_ptr)
    end = tl.load(off_ptr + 1)
    for n in range(start, end):
        qb = tl.load(idx_ptr + n)
        i, valid_q = _rows(qb * BLOCK + offs_m, N, R, L, PERMUTED)
        q = tl.load(Q + i[:, None] * s_n + offs_d[None, :] * s_d, mask=valid_q[:, None], other=0.0)
        do = tl.load(DO + i[:, None] * s_n + offs_d[None, :] * s_d, mask=valid_q[:, None], other=0.0)
        lse = tl.load(LSE + i, mask=valid_q, other=float("inf"))
        delta = tl.load(DELTA + i, mask=valid_q, other=0.0)
        # transposed scores: [keys, queries]
        st = _dot(k, tl.trans(q), PRECISION) * qk_scale
        pt = tl.math.exp2(st - lse[None, :])
        if MASKED:
            pt = tl.where(_allowed(i[None, :], j[:, None], th, WINDOW, L, C, NSUB, KIND), pt, 0.0)
        dv += _dot(pt.to(do.dtype), do, PRECISION)
        dpt = _dot(v, tl.trans(do), PRECISION)
        dst = pt * (dpt - delta[None, :])
        dk += _dot(dst.to(q.dtype), q, PRECISION)
    return dk, dv


@triton.jit
def _bwd_kv_kernel(Q, K, V, DO, DK, DV, LSE, DELTA, qk_scale, sm_scale,
                   full_off, full_idx, part_off, part_idx, s_off_h, s_full_h, s_part_h,
                   s_b, s_h, s_n, s_d, H, HT, N, R, L, WINDOW, C, NSUB,
                   KIND: tl.constexpr, PERMUTED: tl.constexpr, BLOCK: tl.constexpr, D: tl.constexpr,
                   PRECISION: tl.constexpr):
    kb = tl.program_id(0)
    bh = tl.program_id(1)
    h = bh % H
    th = h % HT  # the head whose lists (and summary columns) apply: 0 when the layout is shared
    base = (bh // H) * s_b + h * s_h
    Q, K, V, DO, DK, DV = Q + base, K + base, V + base, DO + base, DK + base, DV + base
    LSE, DELTA = LSE + bh * N, DELTA + bh * N
    offs_m = tl.arange(0, BLOCK)
    offs_d = tl.arange(0, D)
    j, valid_k = _rows(kb * BLOCK + tl.arange(0, BLOCK), N, R, L, PERMUTED)
    k = tl.load(K + j[:, None] * s_n + offs_d[None, :] * s_d, mask=valid_k[:, None], other=0.0)
    v = tl.load(V + j[:, None] * s_n + offs_d[None, :] * s_d, mask=valid_k[:, None], other=0.0)
    dk = tl.zeros([BLOCK, D], tl.float32)
    dv = tl.zeros([BLOCK, D], tl.float32)
    tab = th * s_off_h + kb
    dk, dv = _bwd_kv_loop(dk, dv, k, v, j, th, Q, DO, LSE, DELTA, full_off + tab,
                          full_idx + th * s_full_h, s_n, s_d, N, R, L, WINDOW, C, NSUB, qk_scale,
                          offs_m, offs_d, KIND, PERMUTED, False, BLOCK, PRECISION)
    dk, dv = _bwd_kv_loop(dk, dv, k, v, j, th, Q, DO, LSE, DELTA, part_off + tab,
                          part_idx + th * s_part_h, s_n, s_d, N, R, L, WINDOW, C, NSUB, qk_scale,
                          offs_m, offs_d, KIND, PERMUTED, True, BLOCK, PRECISION)
    out = j[:, None] * s_n + offs_d[None, :] * s_d
    tl.store(DK + out, (dk * sm_scale).to(DK.dtype.element_ty), mask=valid_k[:, None])
    tl.store(DV + out, dv.to(DV.dtype.element_ty), mask=valid_k[:, None])


@triton.jit
def _bwd_q_loop(dq, q, do, lse, delta, i, th, K, V, off_ptr, idx_ptr, s_n, s_d, N, R, L, WINDOW, C, NSUB,
                qk_scale, offs_n, offs_d,
                KIND: tl.constexpr, PERMUTED: tl.constexpr, MASKED: tl.constexpr,
                BLOCK: tl.constexpr, PRECISION: tl.constexpr):
    start = tl.load(off_ptr)
    end = tl.load(off_ptr + 1)
    for n in range(start, end):
        kb = tl.load(idx_ptr + n)
        j, valid_k = _rows(kb * BLOCK + offs_n, N, R, L, PERMUTED)
        k = tl.load(K + j[:, None] * s_n + offs_d[None, :] * s_d, mask=valid_k[:, None], other=0.0)
        v = tl.load(V + j[:, None] * s_n + offs_d[None, :] * s_d, mask=valid_k[:, None], other=0.0)
        s = _dot(q, tl.trans(k), PRECISION) * qk_scale
        p = tl.math.exp2(s - lse[:, None])
        if MASKED:
            p = tl.where(_allowed(i[:, None], j[None, :], th, WINDOW, L, C, NSUB, KIND), p, 0.0)
        dp = _dot(do, tl.trans(v), PRECISION)
        ds = p * (dp - delta[:, None])
        dq += _dot(ds.to(k.dtype), k, PRECISION)
    return dq


@triton.jit
def _bwd_q_kernel(Q, K, V, DO, DQ, LSE, DELTA, qk_scale, sm_scale,
                  full_off, full_idx, part_off, part_idx, s_off_h, s_full_h, s_part_h,
                  s_b, s_h, s_n, s_d, H, HT, N, R, L, WINDOW, C, NSUB,
                  KIND: tl.constexpr, PERMUTED: tl.constexpr, BLOCK: tl.constexpr, D: tl.constexpr,
                  PRECISION: tl.constexpr):
    qb = tl.program_id(0)
    bh = tl.program_id(1)
    h = bh % H
    th = h % HT  # the head whose lists (and summary columns) apply: 0 when the layout is shared
    base = (bh // H) * s_b + h * s_h
    Q, K, V, DO, DQ = Q + base, K + base, V + base, DO + base, DQ + base
    LSE, DELTA = LSE + bh * N, DELTA + bh * N
    offs_n = tl.arange(0, BLOCK)
    offs_d = tl.arange(0, D)
    i, valid_q = _rows(qb * BLOCK + tl.arange(0, BLOCK), N, R, L, PERMUTED)
    rows = i[:, None] * s_n + offs_d[None, :] * s_d
    q = tl.load(Q + rows, mask=valid_q[:, None], other=0.0)
    do = tl.load(DO + rows, mask=valid_q[:, None], other=0.0)
    lse = tl.load(LSE + i, mask=valid_q, other=float("inf"))
    delta = tl.load(DELTA + i, mask=valid_q, other=0.0)
    dq = tl.zeros([BLOCK, D], tl.float32)
    tab = th * s_off_h + qb
    dq = _bwd_q_loop(dq, q, do, lse, delta, i, th, K, V, full_off + tab, full_idx + th * s_full_h,
                     s_n, s_d, N, R, L, WINDOW, C, NSUB, qk_scale, offs_n, offs_d,
                     KIND, PERMUTED, False, BLOCK, PRECISION)
    dq = _bwd_q_loop(dq, q, do, lse, delta, i, th, K, V, part_off + tab, part_idx + th * s_part_h,
                     s_n, s_d, N, R, L, WINDOW, C, NSUB, qk_scale, offs_n, offs_d,
                     KIND, PERMUTED, True, BLOCK, PRECISION)
    tl.store(DQ + rows, (dq * sm_scale).to(DQ.dtype.element_ty), mask=valid_q[:, None])


# --- how the kernels run: decided once -------------------------------------------------------------------------
# @triton.jit decided, when this module was imported, whether the kernels above are compiled (a JITFunction) or
# run by Triton's interpreter (TRITON_INTERPRET=1 set at that moment); nothing later changes it. CUDA tensors
# need the compiled kernels and CPU tensors the interpreted ones: ``launch_mode`` says which applies or why
# neither does. Set TRITON_INTERPRET=1 before the first ``backend="triton"`` call (tests/conftest.py does so
# on a machine without CUDA) to run the kernels on the CPU.
INTERPRETED: bool = not isinstance(_fwd_kernel, triton.runtime.JITFunction)


def launch_mode(device: torch.device | str, interpreted: bool | None = None) -> str:
    """"compiled" (CUDA tensors, compiled kernels) or "interpreted" (CPU tensors, interpreted kernels) for
    tensors on ``device``; ValueError when this import's kernels cannot run there. ``interpreted`` defaults
    to how this module's kernels were made (``INTERPRETED``)."""
    device = torch.device(device)
    interpreted = INTERPRETED if interpreted is None else interpreted
    if device.type == "cuda" and not interpreted:
        return "compiled"
    if device.type == "cpu" and interpreted:
        return "interpreted"
    if device.type == "cuda":
        raise ValueError("backend='triton' needs compiled kernels for CUDA tensors, but kernels.triton_attention "
                         "was imported with TRITON_INTERPRET=1 (its kernels run in Triton's interpreter); unset "
                         "TRITON_INTERPRET before the first backend='triton' call")
    if device.type == "cpu":
        raise ValueError("backend='triton' needs CUDA tensors, or CPU tensors with TRITON_INTERPRET=1 set before "
                         "kernels.triton_attention is first imported (its kernels were made for the GPU)")
    raise ValueError(f"backend='triton' needs CUDA tensors (or CPU tensors in Triton's interpreter), got {device}")


def _launch_args(layout: Layout, full, part, q: torch.Tensor, mode: str) -> tuple[list, dict]:
    """Table pointers/strides, shape scalars and constexprs shared by the three kernels."""
    B, H, N, D = q.shape
    nsub = layout.pattern.subblocks if isinstance(layout.pattern, Fixed) else 1
    # head h reads table head h % table_heads: its own lists, or head 0's (with head 0's summary columns)
    # when the layout is shared, as the reference and the CPU path read it
    args = [full.offsets, full.index, part.offsets, part.index,
            full.offsets.stride(0), full.index.stride(0), part.index.stride(0),
            q.stride(0), q.stride(1), q.stride(2), q.stride(3), H, layout.table_heads, N, layout.rows,
            layout.stride or 1, layout.window or 0, layout.summary or 1, nsub]
    meta = dict(KIND=layout.pattern.code, PERMUTED=layout.permuted, BLOCK=layout.block, D=D,
                PRECISION=1 if q.dtype == torch.float32 else 2 if mode == "interpreted" else 0,
                num_warps=8 if layout.block * D >= 128 * 128 else 4)
    return args, meta


class TritonAttention(torch.autograd.Function):
    """Autograd wrapper: forward and backward kernels over one layout."""

    @staticmethod
    def forward(ctx, q, k, v, layout: Layout, scale: float):
        q, k, v = (t.contiguous() for t in (q, k, v))
        B, H, N, D = q.shape
        kv_full, kv_part, q_full, q_part = layout.tables(q.device)
        o = torch.empty_like(q)
        lse = torch.empty(B * H, N, device=q.device, dtype=torch.float32)
        args, meta = _launch_args(layout, kv_full, kv_part, q, launch_mode(q.device))
        grid = (layout.num_blocks, B * H)
        _fwd_kernel[grid](q, k, v, o, lse, scale * LOG2E, *args, **meta)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.layout, ctx.scale = layout, scale
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse = ctx.saved_tensors
        layout, scale = ctx.layout, ctx.scale
        do = do.contiguous()
        B, H, N, D = q.shape
        delta = (o.float() * do.float()).sum(-1).reshape(B * H, N)
        kv_full, kv_part, q_full, q_part = layout.tables(q.device)
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        grid = (layout.num_blocks, B * H)
        mode = launch_mode(q.device)
        args, meta = _launch_args(layout, q_full, q_part, q, mode)
        _bwd_kv_kernel[grid](q, k, v, do, dk, dv, lse, delta, scale * LOG2E, scale, *args, **meta)
        args, meta = _launch_args(layout, kv_full, kv_part, q, mode)
        _bwd_q_kernel[grid](q, k, v, do, dq, lse, delta, scale * LOG2E, scale, *args, **meta)
        return dq, dk, dv, None, None


def triton_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: Layout,
                     scale: float) -> torch.Tensor:
    """[B, H, N, D] -> [B, H, N, D]; inputs already validated by ``kernels.attention``."""
    return TritonAttention.apply(q, k, v, layout, scale)
