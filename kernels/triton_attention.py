"""Fused block-sparse FlashAttention in Triton (CUDA; tested on the CPU with TRITON_INTERPRET=1).

One program per (tile of a query block, head, batch element) walks the layout's
key-block lists: the full blocks first with no mask, then the partial ones with
the pattern's element predicate. The forward saves the log-sum-exp; the backward
recomputes the probabilities in two passes without atomics: dK/dV per key block
(walking the transposed lists) and dQ per query block. Rows are mapped from the
physical (block) order to the original order by pointer arithmetic, so the
strided pattern reads the [R, l] transposed view of q/k/v in place, without a copy.

How a pass launches (compute tiles, warps, stages) comes from one table,
``CONFIGS``, with fallbacks where a launch does not fit the GPU; whether the
kernels are compiled or interpreted is fixed when this module is imported
(``launch_mode``).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

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
    """tl.dot; PRECISION 0: native (16-bit inputs on the GPU), 1: exact fp32 ("ieee", CUDA cores), 2: upcast
    16-bit inputs to fp32 first (Triton's interpreter has no bf16 dot; bf16 products are exact in fp32),
    3: fp32 as three tf32 products ("tf32x3", tensor cores; about fp32's accuracy)."""
    if PRECISION == 2:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    if PRECISION == 0:
        out = tl.dot(a, b)
    elif PRECISION == 3:
        out = tl.dot(a, b, input_precision="tf32x3")
    else:
        out = tl.dot(a, b, input_precision="ieee")
    return out


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
def _tile(t, N, R, L, s_n, s_d, offs_d, PERMUTED: tl.constexpr, OFF64: tl.constexpr):
    """Physical rows t of one (batch, head) slice -> (original positions, valid, element offsets [len(t), D]), the
    offsets in int64 when they can pass 2^31 (OFF64)."""
    pos, valid = _rows(t, N, R, L, PERMUTED)
    rows = pos
    if OFF64:
        rows = rows.to(tl.int64)
    return pos, valid, (rows * s_n)[:, None] + offs_d[None, :] * s_d


@triton.jit
def _load_pair(A, B, offs, valid):
    """A and B at the element offsets of one tile (zero in the rows that are not valid)."""
    return tl.load(A + offs, mask=valid[:, None], other=0.0), tl.load(B + offs, mask=valid[:, None], other=0.0)


@triton.jit
def _walk_step(idx_ptr, it, BLOCK: tl.constexpr, STEP: tl.constexpr):
    """The STEP physical rows of step ``it`` of a walk: part it % (BLOCK // STEP) of listed block it // (BLOCK //
    STEP)."""
    blk = tl.load(idx_ptr + it // (BLOCK // STEP))
    return blk * BLOCK + (it % (BLOCK // STEP)) * STEP + tl.arange(0, STEP)


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


# The three kernels share one scheme. A program owns OWN rows of one layout block (pid 0 counts the tiles:
# block pid // (BLOCK // OWN)); pid 1 is the head, pid 2 the batch element. It walks the listed blocks of its
# block's row of the table (full ones without a mask, then partial ones with the predicate) STEP rows at a
# time: one flat loop over (listed block, step) pairs, so that Triton pipelines it as one loop. Head h reads
# table head th = h % HT (HT = 1: a layout shared by every head). Per-slice offsets are int32 unless OFF64.


@triton.jit
def _fwd_walk(acc, m_i, l_i, q, i, th, K, V, off_ptr, idx_ptr, s_n, s_d, N, R, L, WINDOW, C, NSUB, qk_scale, offs_d,
              KIND: tl.constexpr, PERMUTED: tl.constexpr, MASKED: tl.constexpr, BLOCK: tl.constexpr,
              STEP: tl.constexpr, PRECISION: tl.constexpr, OFF64: tl.constexpr):
    start = tl.load(off_ptr)
    end = tl.load(off_ptr + 1)
    for it in range(start * (BLOCK // STEP), end * (BLOCK // STEP)):
        j, valid_k, cols = _tile(_walk_step(idx_ptr, it, BLOCK, STEP), N, R, L, s_n, s_d, offs_d, PERMUTED, OFF64)
        k, v = _load_pair(K, V, cols, valid_k)
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
                OWN: tl.constexpr, STEP: tl.constexpr, PRECISION: tl.constexpr, OFF64: tl.constexpr):
    pid = tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2)
    qb = pid // (BLOCK // OWN)
    th = h % HT
    base = b.to(tl.int64) * s_b + h.to(tl.int64) * s_h
    Q, K, V, O = Q + base, K + base, V + base, O + base
    LSE = LSE + (b.to(tl.int64) * H + h) * N
    offs_d = tl.arange(0, D)
    i, valid_q, rows = _tile(pid * OWN + tl.arange(0, OWN), N, R, L, s_n, s_d, offs_d, PERMUTED, OFF64)
    q = tl.load(Q + rows, mask=valid_q[:, None], other=0.0)
    m_i = tl.full([OWN], float("-inf"), tl.float32)
    l_i = tl.zeros([OWN], tl.float32)
    acc = tl.zeros([OWN, D], tl.float32)
    tab = th * s_off_h + qb
    acc, m_i, l_i = _fwd_walk(acc, m_i, l_i, q, i, th, K, V, full_off + tab, full_idx + th * s_full_h,
                              s_n, s_d, N, R, L, WINDOW, C, NSUB, qk_scale, offs_d,
                              KIND, PERMUTED, False, BLOCK, STEP, PRECISION, OFF64)
    acc, m_i, l_i = _fwd_walk(acc, m_i, l_i, q, i, th, K, V, part_off + tab, part_idx + th * s_part_h,
                              s_n, s_d, N, R, L, WINDOW, C, NSUB, qk_scale, offs_d,
                              KIND, PERMUTED, True, BLOCK, STEP, PRECISION, OFF64)
    l_i = tl.where(l_i == 0.0, 1.0, l_i)
    o = acc / l_i[:, None]
    tl.store(O + rows, o.to(O.dtype.element_ty), mask=valid_q[:, None])
    tl.store(LSE + i, m_i + tl.math.log2(l_i), mask=valid_q)


@triton.jit
def _bwd_kv_walk(dk, dv, k, v, j, th, Q, DO, LSE, DELTA, off_ptr, idx_ptr, s_n, s_d, N, R, L, WINDOW, C, NSUB,
                 qk_scale, offs_d,
                 KIND: tl.constexpr, PERMUTED: tl.constexpr, MASKED: tl.constexpr, BLOCK: tl.constexpr,
                 STEP: tl.constexpr, PRECISION: tl.constexpr, OFF64: tl.constexpr):
    start = tl.load(off_ptr)
    end = tl.load(off_ptr + 1)
    for it in range(start * (BLOCK // STEP), end * (BLOCK // STEP)):
        i, valid_q, rows = _tile(_walk_step(idx_ptr, it, BLOCK, STEP), N, R, L, s_n, s_d, offs_d, PERMUTED, OFF64)
        q, do = _load_pair(Q, DO, rows, valid_q)
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
                   OWN: tl.constexpr, STEP: tl.constexpr, PRECISION: tl.constexpr, OFF64: tl.constexpr):
    pid = tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2)
    kb = pid // (BLOCK // OWN)
    th = h % HT
    base = b.to(tl.int64) * s_b + h.to(tl.int64) * s_h
    Q, K, V, DO, DK, DV = Q + base, K + base, V + base, DO + base, DK + base, DV + base
    row0 = (b.to(tl.int64) * H + h) * N
    LSE, DELTA = LSE + row0, DELTA + row0
    offs_d = tl.arange(0, D)
    j, valid_k, cols = _tile(pid * OWN + tl.arange(0, OWN), N, R, L, s_n, s_d, offs_d, PERMUTED, OFF64)
    k, v = _load_pair(K, V, cols, valid_k)
    dk = tl.zeros([OWN, D], tl.float32)
    dv = tl.zeros([OWN, D], tl.float32)
    tab = th * s_off_h + kb
    dk, dv = _bwd_kv_walk(dk, dv, k, v, j, th, Q, DO, LSE, DELTA, full_off + tab, full_idx + th * s_full_h,
                          s_n, s_d, N, R, L, WINDOW, C, NSUB, qk_scale, offs_d,
                          KIND, PERMUTED, False, BLOCK, STEP, PRECISION, OFF64)
    dk, dv = _bwd_kv_walk(dk, dv, k, v, j, th, Q, DO, LSE, DELTA, part_off + tab, part_idx + th * s_part_h,
                          s_n, s_d, N, R, L, WINDOW, C, NSUB, qk_scale, offs_d,
                          KIND, PERMUTED, True, BLOCK, STEP, PRECISION, OFF64)
    tl.store(DK + cols, (dk * sm_scale).to(DK.dtype.element_ty), mask=valid_k[:, None])
    tl.store(DV + cols, dv.to(DV.dtype.element_ty), mask=valid_k[:, None])


@triton.jit
def _bwd_q_walk(dq, q, do, lse, delta, i, th, K, V, off_ptr, idx_ptr, s_n, s_d, N, R, L, WINDOW, C, NSUB,
                qk_scale, offs_d,
                KIND: tl.constexpr, PERMUTED: tl.constexpr, MASKED: tl.constexpr, BLOCK: tl.constexpr,
                STEP: tl.constexpr, PRECISION: tl.constexpr, OFF64: tl.constexpr):
    start = tl.load(off_ptr)
    end = tl.load(off_ptr + 1)
    for it in range(start * (BLOCK // STEP), end * (BLOCK // STEP)):
        j, valid_k, cols = _tile(_walk_step(idx_ptr, it, BLOCK, STEP), N, R, L, s_n, s_d, offs_d, PERMUTED, OFF64)
        k, v = _load_pair(K, V, cols, valid_k)
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
                  OWN: tl.constexpr, STEP: tl.constexpr, PRECISION: tl.constexpr, OFF64: tl.constexpr):
    pid = tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2)
    qb = pid // (BLOCK // OWN)
    th = h % HT
    base = b.to(tl.int64) * s_b + h.to(tl.int64) * s_h
    Q, K, V, DO, DQ = Q + base, K + base, V + base, DO + base, DQ + base
    row0 = (b.to(tl.int64) * H + h) * N
    LSE, DELTA = LSE + row0, DELTA + row0
    offs_d = tl.arange(0, D)
    i, valid_q, rows = _tile(pid * OWN + tl.arange(0, OWN), N, R, L, s_n, s_d, offs_d, PERMUTED, OFF64)
    q, do = _load_pair(Q, DO, rows, valid_q)
    lse = tl.load(LSE + i, mask=valid_q, other=float("inf"))
    delta = tl.load(DELTA + i, mask=valid_q, other=0.0)
    dq = tl.zeros([OWN, D], tl.float32)
    tab = th * s_off_h + qb
    dq = _bwd_q_walk(dq, q, do, lse, delta, i, th, K, V, full_off + tab, full_idx + th * s_full_h,
                     s_n, s_d, N, R, L, WINDOW, C, NSUB, qk_scale, offs_d,
                     KIND, PERMUTED, False, BLOCK, STEP, PRECISION, OFF64)
    dq = _bwd_q_walk(dq, q, do, lse, delta, i, th, K, V, part_off + tab, part_idx + th * s_part_h,
                     s_n, s_d, N, R, L, WINDOW, C, NSUB, qk_scale, offs_d,
                     KIND, PERMUTED, True, BLOCK, STEP, PRECISION, OFF64)
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


# --- compute tiles, warps and stages: one table ---------------------------------------------------------------


@dataclass(frozen=True)
class Config:
    """How one kernel launches: each program owns ``own`` rows of a layout block (queries in the forward and dQ
    passes, keys in the dK/dV pass) and walks the listed blocks ``step`` rows at a time; ``warps`` and
    ``stages`` are Triton's num_warps and num_stages. ``own`` and ``step`` divide the layout block."""

    own: int
    step: int
    warps: int
    stages: int


PASSES = ("fwd", "dkv", "dq")
MIN_TILE = 16  # tl.dot's smallest dimension
# (pass, layout block) -> the first config to try for 16-bit inputs with D <= 64 and with D = 128, and for fp32
# inputs with D <= 64 and with D = 128 (fp32 "ieee" dots run on CUDA cores and hold their operands in registers,
# "tf32x3" ones take three tensor-core products: smaller tiles, more warps). ``configs`` appends fallbacks (fewer
# stages, then smaller tiles) for where a launch does not fit. Chosen for H100/H200 (227 KB of shared memory per
# block, 64K registers per SM, at most 255 per thread) from Triton 3.6's sm_90a compile of each candidate
# (``python -m bench.gpu_check resources --offline 90``): no spills (fp32: with either precision), wgmma at
# blocks 64 and 128 in 16 bits. Not yet timed on a GPU; bench/gpu_check.sh reports what each one launched with.
CONFIGS: dict[tuple[str, int], tuple[Config, Config, Config, Config]] = {
    # pass  block    16-bit, D <= 64         16-bit, D = 128         fp32, D <= 64          fp32, D = 128
    ("fwd", 16):  (Config(16, 16, 2, 3),  Config(16, 16, 4, 3),  Config(16, 16, 2, 2), Config(16, 16, 4, 2)),
    ("fwd", 32):  (Config(32, 32, 4, 3),  Config(32, 32, 4, 3),  Config(32, 32, 8, 2), Config(32, 16, 8, 2)),
    ("fwd", 64):  (Config(64, 64, 4, 3),  Config(64, 64, 4, 2),  Config(64, 32, 8, 2), Config(32, 16, 8, 2)),
    ("fwd", 128): (Config(128, 64, 8, 3), Config(128, 64, 8, 3), Config(64, 32, 8, 2), Config(32, 16, 8, 2)),
    ("dkv", 16):  (Config(16, 16, 2, 3),  Config(16, 16, 4, 3),  Config(16, 16, 2, 2), Config(16, 16, 4, 2)),
    ("dkv", 32):  (Config(32, 32, 4, 3),  Config(32, 32, 4, 3),  Config(32, 32, 8, 2), Config(16, 16, 4, 2)),
    ("dkv", 64):  (Config(64, 32, 4, 3),  Config(64, 32, 8, 3),  Config(32, 32, 8, 2), Config(16, 16, 4, 2)),
    ("dkv", 128): (Config(128, 32, 8, 3), Config(64, 32, 8, 3),  Config(32, 32, 8, 2), Config(16, 16, 4, 2)),
    ("dq", 16):   (Config(16, 16, 2, 3),  Config(16, 16, 4, 3),  Config(16, 16, 2, 2), Config(16, 16, 4, 2)),
    ("dq", 32):   (Config(32, 32, 4, 3),  Config(32, 32, 4, 3),  Config(32, 32, 8, 2), Config(16, 16, 4, 2)),
    ("dq", 64):   (Config(64, 64, 4, 3),  Config(64, 32, 4, 3),  Config(64, 32, 8, 2), Config(16, 16, 4, 2)),
    ("dq", 128):  (Config(128, 64, 8, 3), Config(128, 32, 8, 3), Config(64, 32, 8, 2), Config(16, 16, 4, 2)),
}


def configs(kernel_pass: str, block: int, d: int, dtype: torch.dtype) -> tuple[Config, ...]:
    """The configs to try, in order: the table's, then the same with fewer stages, then ever smaller tiles
    (the larger of own and step halved first) down to 16 x 16."""
    first = CONFIGS[(kernel_pass, block)][(2 if dtype == torch.float32 else 0) + (d > 64)]
    chain = [replace(first, stages=s) for s in range(first.stages, 0, -1)]
    own, step = first.own, first.step
    while max(own, step) > MIN_TILE:
        if step >= own:
            step //= 2
        else:
            own //= 2
        chain += [Config(own, step, min(first.warps, 4), s) for s in (2, 1)]
    return tuple(dict.fromkeys(chain))


# Errors that mean "this config does not fit the GPU" (raised before anything runs): try the next one.
# OutOfResources: shared memory or threads, checked when the compiled kernel is first loaded; PTXASError:
# ptxas refused the kernel; a launch refused with "too many resources requested".
_DOES_NOT_FIT = (triton.runtime.errors.OutOfResources, triton.runtime.errors.PTXASError)
_CHOSEN: dict[tuple, Config] = {}  # launch key -> the config that launched
COMPILED: dict[tuple, tuple[Config, object]] = {}  # launch key -> (config, Triton's compiled kernel), GPU only


def _does_not_fit(exc: BaseException) -> bool:
    if isinstance(exc, _DOES_NOT_FIT):
        return True
    return isinstance(exc, RuntimeError) and "too many resources requested" in str(exc)


def launch_options(cfg: Config) -> dict:
    """The keywords a kernel launch takes for ``cfg``."""
    return dict(OWN=cfg.own, STEP=cfg.step, num_warps=cfg.warps, num_stages=cfg.stages)


def _launch(kernel_pass: str, kernel, args: list, meta: dict, layout: Layout, q: torch.Tensor, mode: str) -> None:
    """Launch ``kernel`` with the first config of ``configs`` that fits (remembered per launch key)."""
    B, H, N, D = q.shape
    key = (kernel_pass, meta["KIND"], meta["PERMUTED"], layout.block, D, str(q.dtype).removeprefix("torch."),
           meta["PRECISION"], meta["OFF64"], str(q.device))
    chain = (_CHOSEN[key],) if key in _CHOSEN else configs(kernel_pass, layout.block, D, q.dtype)
    failures = []
    for cfg in chain:
        grid = (layout.num_blocks * (layout.block // cfg.own), H, B)
        try:
            compiled = kernel[grid](*args, **meta, **launch_options(cfg))
        except Exception as exc:
            if not _does_not_fit(exc):
                raise
            failures.append(f"{cfg}: {type(exc).__name__}: {exc}")
            continue
        _CHOSEN[key] = cfg
        if mode == "compiled":
            COMPILED[key] = (cfg, compiled)
        return
    raise RuntimeError(f"no config of the {kernel_pass} kernel fits this GPU at block {layout.block}, D={D}, "
                       f"{q.dtype}: " + "; ".join(failures))


INT32_LIMIT = 2**31


def check_grid(B: int, H: int) -> None:
    """The grid is (tiles, H, B): CUDA allows 65,535 on its second and third axes."""
    for name, value in (("batch B", B), ("heads H", H)):
        if value > 65535:
            raise ValueError(f"backend='triton' launches one program per (tile, head, batch element): {name} must "
                             f"be <= 65,535 (CUDA's grid limit), got {value:,}; split the call")


FP32_PRECISIONS = {"ieee": 1, "tf32x3": 3}  # fp32 inputs: the PRECISION code of each choice


def _precision(dtype: torch.dtype, mode: str, fp32_precision: str) -> int:
    if dtype == torch.float32:
        return FP32_PRECISIONS[fp32_precision]
    return 2 if mode == "interpreted" else 0


def _launch_args(layout: Layout, full, part, q: torch.Tensor, mode: str,
                 fp32_precision: str = "ieee") -> tuple[list, dict]:
    """Table pointers/strides, shape scalars and constexprs shared by the three kernels."""
    B, H, N, D = q.shape
    nsub = layout.pattern.subblocks if isinstance(layout.pattern, Fixed) else 1
    # head h reads table head h % table_heads: its own lists, or head 0's (with head 0's summary columns)
    # when the layout is shared, as the reference and the CPU path read it
    args = [full.offsets, full.index, part.offsets, part.index,
            full.offsets.stride(0), full.index.stride(0), part.index.stride(0),
            q.stride(0), q.stride(1), q.stride(2), q.stride(3), H, layout.table_heads, N, layout.rows,
            layout.stride or 1, layout.window or 0, layout.summary or 1, nsub]
    # the largest row offset within a slice: padding rows map to N + t, t < num_blocks * block
    largest = (N + layout.num_blocks * layout.block) * q.stride(2) + D * q.stride(3)
    meta = dict(KIND=layout.pattern.code, PERMUTED=layout.permuted, BLOCK=layout.block, D=D,
                PRECISION=_precision(q.dtype, mode, fp32_precision),
                OFF64=largest >= INT32_LIMIT)
    return args, meta


def pass_call(kernel_pass: str, layout: Layout, mode: str, scale: float, q, k, v, o, lse, do=None, delta=None,
              dq=None, dk=None, dv=None, fp32_precision: str = "ieee") -> tuple[object, list, dict]:
    """(kernel, positional arguments, constexpr keywords) of one pass ("fwd", "dkv" or "dq"); the config's
    keywords (``launch_options``) come on top. Tensors are contiguous [B, H, N, D] (lse, delta [B * H, N])."""
    kv_full, kv_part, q_full, q_part = layout.tables(q.device)
    if kernel_pass == "fwd":
        kernel, tensors, tables = _fwd_kernel, (q, k, v, o, lse, scale * LOG2E), (kv_full, kv_part)
    elif kernel_pass == "dkv":
        kernel, tables = _bwd_kv_kernel, (q_full, q_part)
        tensors = (q, k, v, do, dk, dv, lse, delta, scale * LOG2E, scale)
    elif kernel_pass == "dq":
        kernel, tables = _bwd_q_kernel, (kv_full, kv_part)
        tensors = (q, k, v, do, dq, lse, delta, scale * LOG2E, scale)
    else:
        raise ValueError(f"kernel_pass must be one of {PASSES}, got {kernel_pass!r}")
    args, meta = _launch_args(layout, *tables, q, mode, fp32_precision)
    return kernel, [*tensors, *args], meta


class TritonAttention(torch.autograd.Function):
    """Autograd wrapper: forward and backward kernels over one layout."""

    @staticmethod
    def forward(ctx, q, k, v, layout: Layout, scale: float, fp32_precision: str):
        q, k, v = (t.contiguous() for t in (q, k, v))
        B, H, N, D = q.shape
        mode = launch_mode(q.device)
        o = torch.empty_like(q)
        lse = torch.empty(B * H, N, device=q.device, dtype=torch.float32)
        call = pass_call("fwd", layout, mode, scale, q, k, v, o, lse, fp32_precision=fp32_precision)
        _launch("fwd", *call, layout, q, mode)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.layout, ctx.scale, ctx.fp32_precision = layout, scale, fp32_precision
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse = ctx.saved_tensors
        layout, scale = ctx.layout, ctx.scale
        do = do.contiguous()
        B, H, N, D = q.shape
        mode = launch_mode(q.device)
        delta = (o.float() * do.float()).sum(-1).reshape(B * H, N)
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        for kernel_pass in ("dkv", "dq"):
            call = pass_call(kernel_pass, layout, mode, scale, q, k, v, o, lse, do, delta, dq, dk, dv,
                             ctx.fp32_precision)
            _launch(kernel_pass, *call, layout, q, mode)
        return dq, dk, dv, None, None, None


def triton_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: Layout, scale: float,
                     fp32_precision: str = "ieee") -> torch.Tensor:
    """[B, H, N, D] -> [B, H, N, D]; inputs already validated by ``kernels.attention``. ``fp32_precision``:
    how fp32 inputs are multiplied, "ieee" (exact fp32) or "tf32x3" (tensor cores, about as accurate)."""
    check_grid(q.shape[0], q.shape[1])
    return TritonAttention.apply(q, k, v, layout, scale, fp32_precision)
