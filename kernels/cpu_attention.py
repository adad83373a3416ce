"""Block-sparse attention on the CPU in plain PyTorch: only the listed key blocks, batched matmuls.

The forward saves the log-sum-exp; the backward recomputes the probabilities (the compiled band keeps
them instead where they fit and fill their window: PROBS_KEEP_BYTES, PROBS_MIN_FILL), so memory stays
O(computed blocks), never N x N. Computes in float32 whatever the input dtype. Three schedules, picked per
layout:

* columns: strided layouts whose [R, l] view is whole and splits into whole blocks per
  column. Block-row u of all l columns is one bmm on a strided view of q/k/v: no copies.
* band: every query block r reads the key blocks [r - M + 1, r] (local, strided). In
  compiled C where kernels/cpu_kernels.py runs (:class:`CompiledBand`: float32 register
  tiles, one thread per (batch, head), in place when the layout is whole, strided ones
  included; :class:`PackedBand` takes a whole layout straight from the qkv projection's
  output, for ``kernels.attention_from_qkv``); else slot m of every row is the contiguous
  key slice shifted by m, one bmm on views: no gather, no scatter. Per (batch, head), in the
  layout's physical (block) order.
* gather: anything else (fixed, all). The listed key blocks of a chunk of rows are
  gathered into [rows, M * block] and the gradients scattered back with index_add.

Band and gather work in block order: a view of the input when that is the original
order and N is a multiple of the block, else one copy in and one out.
"""

from __future__ import annotations

import ctypes
import math
from dataclasses import dataclass

import torch

from . import cpu_kernels
from .layout import BlockTable, Layout

CHUNK_BYTES = 4 << 20  # scores of one chunk of query blocks: stays in cache
MASK_CACHE_BYTES = 64 << 20  # gather schedule: keep partial-block masks up to this size, else rebuild per chunk
# compiled band: keep the forward's probabilities for the backward up to this size per call where the rows read
# at least PROBS_MIN_FILL of their window on average (local layouts: all of it; a strided grid's columns about
# half, where recomputing them was as fast at 12,288 and faster at 65,536), else recompute them
PROBS_KEEP_BYTES = 1 << 30
PROBS_MIN_FILL = 0.75
# and hand finished ones to later forwards up to this size in all (fresh pages cost a fault each, which for tens of
# MB took as long as the softmax itself)
PROBS_POOL_BYTES = 512 << 20
_probs_pool: list[torch.Tensor] = []
MAX_BAND_SLOTS = 16  # wider bands (e.g. "all") use the gather schedule
NEG_INF = float("-inf")


# --- layout -> physical order -----------------------------------------------------------------


def _contiguous_float(x: torch.Tensor) -> torch.Tensor:
    """x as contiguous float32 in one copy (``.float().contiguous()`` makes two of a strided bf16 view)."""
    if x.dtype == torch.float32:
        return x.contiguous()  # .to() would return x itself, strides and all
    return x.to(torch.float32, memory_format=torch.contiguous_format)


def to_physical(x: torch.Tensor, layout: Layout) -> torch.Tensor:
    """[B, H, N, D] -> [B * H, QB, block, D] float32 in block order, zero padded.

    A view of x (no copy) when the order is the original one, N is a multiple of the
    block and x is contiguous float32.
    """
    B, H, N, D = x.shape
    b, n_blocks = layout.block, layout.num_blocks
    if not layout.permuted and N == n_blocks * b:
        return _contiguous_float(x).view(B * H, n_blocks, b, D)
    out = torch.empty((B * H, n_blocks, b, D))
    flat = out.view(B, H, -1, D)
    flat[:, :, layout.physical_len:].zero_()
    if layout.permuted:
        full, rest = divmod(N, layout.stride)
        cols = flat[:, :, : layout.physical_len].view(B, H, layout.stride, layout.rows, D)
        cols[:, :, :, :full].copy_(x[:, :, : full * layout.stride].view(B, H, full, layout.stride, D).transpose(2, 3))
        if rest:
            cols[:, :, :rest, full].copy_(x[:, :, full * layout.stride:])
            cols[:, :, rest:, full].zero_()
    else:
        flat[:, :, :N].copy_(x)
    return out


def from_physical(x: torch.Tensor, layout: Layout, shape: torch.Size, dtype: torch.dtype) -> torch.Tensor:
    """Inverse of :func:`to_physical`: [B * H, QB, block, D] -> ``shape`` [B, H, N, D] in ``dtype``."""
    B, H, N, D = shape
    if not layout.permuted and N == layout.num_blocks * layout.block:
        return x.view(shape).to(dtype)
    flat = x.view(B, H, -1, D)
    out = torch.empty(shape, dtype=dtype)
    if layout.permuted:
        full, rest = divmod(N, layout.stride)
        cols = flat[:, :, : layout.physical_len].view(B, H, layout.stride, layout.rows, D)
        out[:, :, : full * layout.stride].view(B, H, full, layout.stride, D).copy_(cols[:, :, :, :full].transpose(2, 3))
        if rest:
            out[:, :, full * layout.stride:].copy_(cols[:, :, :rest, full])
    else:
        out.copy_(flat[:, :, :N])
    return out


# --- plans ------------------------------------------------------------------------------------


def _listed(table: BlockTable) -> torch.Tensor:
    """All listed blocks of a CSR table, head by head, row by row."""
    return table.index[torch.arange(table.index.shape[1]) < table.offsets[:, -1:]].long()


def _entry_masks(layout: Layout, h: torch.Tensor, qb: torch.Tensor, kb: torch.Tensor) -> torch.Tensor:
    """[n, block, block] element masks of (head table, query block, key block) entries."""
    b = layout.block
    i, valid_q = layout.original_index(qb[:, None] * b + torch.arange(b))
    j, valid_k = layout.original_index(kb[:, None] * b + torch.arange(b))
    heads = h if layout.table_heads > 1 else torch.zeros_like(h)
    ok = layout.allowed(i[:, :, None], j[:, None, :], heads[:, None, None]) & valid_k[:, None, :]
    return ok | ~valid_q[:, :, None]  # padding rows read everything listed: keeps them finite


def _entries(layout: Layout) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Every listed (head table, query block, key block, kind) entry; kind 1 full, 2 partial."""
    ht, n = layout.table_heads, layout.num_blocks
    entries = []
    for table, kind in ((layout.kv_full, 1), (layout.kv_partial, 2)):
        counts = table.count.long().reshape(-1)
        h = torch.repeat_interleave(torch.arange(ht).repeat_interleave(n), counts)
        r = torch.repeat_interleave(torch.arange(n).repeat(ht), counts)
        entries.append((h, r, _listed(table), torch.full_like(h, kind)))
    return tuple(torch.cat(parts) for parts in zip(*entries, strict=True))


def _slots(layout: Layout, band: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Per (head table, query block, slot): the key block and its kind (0 padding, 1 full, 2 partial).

    band: slot m of row r holds key block r - (M - 1) + m; else the listed blocks left-packed.
    """
    ht, n = layout.table_heads, layout.num_blocks
    h, r, kb, kind = _entries(layout)
    if band:
        width = int((r - kb).max()) + 1
        slot = kb - r + width - 1
    else:
        order = torch.argsort((h * n + r) * n + kb)
        h, r, kb, kind = h[order], r[order], kb[order], kind[order]
        start = torch.searchsorted(h * n + r, h * n + r, right=False)
        slot = torch.arange(h.numel()) - start
        width = int(slot.max()) + 1
    index = torch.zeros(ht, n, width, dtype=torch.long)
    kinds = torch.zeros(ht, n, width, dtype=torch.long)
    index[h, r, slot], kinds[h, r, slot] = kb, kind
    return index, kinds


def _is_band(layout: Layout) -> bool:
    """True when each row r lists exactly the key blocks [first(r), r] and they fit MAX_BAND_SLOTS."""
    if layout.table_heads != 1:
        return False
    counts = (layout.kv_full.count + layout.kv_partial.count)[0].long()
    if int(counts.max()) > MAX_BAND_SLOTS:
        return False
    _, r, kb, _ = _entries(layout)
    rows = torch.arange(layout.num_blocks)
    lo = torch.full_like(rows, layout.num_blocks).scatter_reduce_(0, r, kb, "amin")
    hi = torch.full_like(rows, -1).scatter_reduce_(0, r, kb, "amax")
    return bool((hi == rows).all() and (hi - lo + 1 == counts).all())


@dataclass
class _Work:
    """Band schedule, one slot of one chunk: rows [a, e) of the chunk read key block row + slot - (M - 1)."""

    slot: int
    a: int
    e: int
    mask: torch.Tensor | None  # [e - a, block, block], False -> not read; None: all read


@dataclass
class _BandPlan:
    width: int  # M
    chunks: list[tuple[int, int]]
    work: list[list[_Work]]  # per chunk
    kinds: torch.Tensor  # [QB, M] int32, for the compiled kernels: 0 padding, 1 full, 2 partial
    mask_id: torch.Tensor  # [QB, M] int32: the row of ``masks`` of each partial slot
    masks: torch.Tensor  # [n distinct, block, block] float32: 0 where read, -inf where not (added to the scores)
    fill: float  # the share of the M slots the query blocks read, on average (PROBS_MIN_FILL)


@dataclass
class _GatherPlan:
    index: torch.Tensor  # [Ht, QB, M] key blocks, left-packed (0 on padding slots)
    kinds: torch.Tensor  # [Ht, QB, M] 0 padding, 1 full, 2 partial
    masks: torch.Tensor | None  # [n partial, block, block], kept when they fit MASK_CACHE_BYTES
    mask_row: torch.Tensor  # [Ht, QB, M] row of ``masks`` of each partial entry


def _chunk_rows(n_rows: int, row_bytes: int) -> list[tuple[int, int]]:
    step = max(1, CHUNK_BYTES // row_bytes)
    return [(r0, min(r0 + step, n_rows)) for r0 in range(0, n_rows, step)]


def _band_plan(layout: Layout) -> _BandPlan:
    index, kinds = _slots(layout, band=True)
    index, kinds = index[0], kinds[0]
    width, b = kinds.shape[1], layout.block
    r, m = torch.nonzero(kinds == 2, as_tuple=True)  # every partial slot's element mask, computed once
    read, inverse = torch.unique(_entry_masks(layout, torch.zeros_like(r), r, index[r, m]), dim=0, return_inverse=True)
    mask_id = torch.zeros(kinds.shape, dtype=torch.int32)  # equal masks share one id (a local layout has two)
    mask_id[r, m] = inverse.to(torch.int32)
    chunks = _chunk_rows(layout.num_blocks, width * b * b * 4)
    work = []
    for r0, r1 in chunks:
        items = []
        for m in range(width):
            k = kinds[r0:r1, m]
            used = torch.nonzero(k).flatten()
            if used.numel() == 0:
                continue
            a, e = int(used[0]), int(used[-1]) + 1
            k = k[a:e]
            mask = None
            if bool((k != 1).any()):
                mask = torch.ones(e - a, b, b, dtype=torch.bool)
                mask[k == 0] = False
                mask[k == 2] = read[mask_id[r0 + a + torch.nonzero(k == 2).flatten(), m].long()]
            items.append(_Work(m, a, e, mask))
        work.append(items)
    masks = torch.zeros(read.shape).masked_fill_(~read, NEG_INF)
    return _BandPlan(width, chunks, work, kinds.to(torch.int32).contiguous(), mask_id, masks,
                     float((kinds != 0).float().mean()))


def _plan(layout: Layout) -> _BandPlan | _GatherPlan:
    """The layout's CPU plan, built once and cached on the layout."""
    if "cpu_plan" not in layout._cache:
        if _is_band(layout):
            plan = _band_plan(layout)
        else:
            index, kinds = _slots(layout, band=False)
            h, r, m = torch.nonzero(kinds == 2, as_tuple=True)
            cached = h.numel() * layout.block**2 <= MASK_CACHE_BYTES
            masks = _entry_masks(layout, h, r, index[h, r, m]) if cached else None
            mask_row = torch.full_like(index, -1)
            mask_row[h, r, m] = torch.arange(h.numel())
            plan = _GatherPlan(index, kinds, masks, mask_row)
        layout._cache["cpu_plan"] = plan
    return layout._cache["cpu_plan"]


# --- band schedule ----------------------------------------------------------------------------


def _band_forward(plan: _BandPlan, qp, kp, vp, o, lse, scale: float):
    """qp/kp/vp/o: [BH, QB, b, D]; lse: [BH, QB, b]. Slot m of row r reads key block r + m - (M - 1);
    work items never cover rows where that is negative (those slots are padding)."""
    b, lag = qp.shape[2], plan.width - 1
    s = torch.empty(plan.width, max(r1 - r0 for r0, r1 in plan.chunks), b, b)
    for bh in range(qp.shape[0]):
        q, k, v = qp[bh], kp[bh], vp[bh]
        for (r0, r1), items in zip(plan.chunks, plan.work, strict=True):
            c = r1 - r0
            sc = s[:, :c]
            idle = set(range(plan.width))
            for w in items:
                idle.discard(w.slot)
                sc[w.slot, : w.a].fill_(NEG_INF)
                sc[w.slot, w.e:].fill_(NEG_INF)
                out = sc[w.slot, w.a:w.e]
                rows = slice(r0 + w.a, r0 + w.e)
                keys = slice(r0 + w.a + w.slot - lag, r0 + w.e + w.slot - lag)
                torch.baddbmm(out, q[rows], k[keys].transpose(1, 2), beta=0.0, alpha=scale, out=out)
                if w.mask is not None:
                    out.masked_fill_(~w.mask, NEG_INF)
            for m in idle:
                sc[m].fill_(NEG_INF)
            top = sc.amax(dim=(0, 3))  # [c, b]
            sc.sub_(top[None, :, :, None]).exp_()
            total = sc.sum(dim=(0, 3))
            oc = o[bh, r0:r1].zero_()
            for w in items:
                oc[w.a:w.e].baddbmm_(sc[w.slot, w.a:w.e], v[r0 + w.a + w.slot - lag:r0 + w.e + w.slot - lag])
            oc.div_(total[..., None])
            lse[bh, r0:r1] = total.log_().add_(top)


def _band_backward(plan: _BandPlan, qp, kp, vp, dop, lse, delta, dq, dk, dv, scale: float):
    """Streams slot by slot; dk/dv accumulate in place."""
    b, lag = qp.shape[2], plan.width - 1
    for bh in range(qp.shape[0]):
        q, k, v, do = qp[bh], kp[bh], vp[bh], dop[bh]
        for (r0, r1), items in zip(plan.chunks, plan.work, strict=True):
            dqc = dq[bh, r0:r1].zero_()
            for w in items:
                rows = slice(r0 + w.a, r0 + w.e)
                keys = slice(r0 + w.a + w.slot - lag, r0 + w.e + w.slot - lag)
                p = torch.empty(w.e - w.a, b, b)
                torch.baddbmm(p, q[rows], k[keys].transpose(1, 2), beta=0.0, alpha=scale, out=p)
                if w.mask is not None:
                    p.masked_fill_(~w.mask, NEG_INF)
                p.sub_(lse[bh, rows, :, None]).exp_()
                dv[bh, keys].baddbmm_(p.transpose(1, 2), do[rows])
                ds = p.mul_(torch.bmm(do[rows], v[keys].transpose(1, 2)).sub_(delta[bh, rows, :, None]))
                dqc[w.a:w.e].baddbmm_(ds, k[keys], alpha=scale)
                dk[bh, keys].baddbmm_(ds.transpose(1, 2), q[rows], alpha=scale)


# --- gather schedule --------------------------------------------------------------------------


def _bmm(a: torch.Tensor, b: torch.Tensor, alpha: float = 1.0) -> torch.Tensor:
    """alpha * a @ b over all leading dims, as one bmm on views (no copies of a or b)."""
    a3, b3 = a.reshape(-1, *a.shape[-2:]), b.reshape(-1, *b.shape[-2:])
    out = torch.empty(a3.shape[0], a3.shape[1], b3.shape[2])
    torch.baddbmm(out, a3, b3, beta=0.0, alpha=alpha, out=out)
    return out.view(*a.shape[:-1], b.shape[-1])


def _gather(xp: torch.Tensor, plan: _GatherPlan, heads: int, r0: int, r1: int) -> torch.Tensor:
    """Key blocks listed for query blocks [r0, r1): [B * H, c, M * block, D]."""
    BH, _, b, D = xp.shape
    idx = plan.index[:, r0:r1]
    x = xp.view(BH // heads, heads, *xp.shape[1:])
    g = x[:, :, idx[0]] if idx.shape[0] == 1 else x[:, torch.arange(heads)[:, None, None], idx]
    return g.reshape(BH, r1 - r0, -1, D)


def _gather_scores(qc, kg, plan: _GatherPlan, layout: Layout, heads: int, r0: int, r1: int,
                   scale: float) -> torch.Tensor:
    """Masked scores [B * H, c, block, M * block] of query blocks [r0, r1)."""
    s = _bmm(qc, kg.transpose(-1, -2), scale)
    BH, c, b, _ = s.shape
    M = plan.index.shape[-1]
    s5 = s.view(BH // heads, heads, c, b, M, b)
    kinds = plan.kinds[:, r0:r1]
    if bool((kinds == 0).any()):
        s5.masked_fill_((kinds == 0)[None, :, :, None, :, None], NEG_INF)
    h, r, m = torch.nonzero(kinds == 2, as_tuple=True)
    if h.numel():
        if plan.masks is None:
            mask = _entry_masks(layout, h, r0 + r, plan.index[h, r0 + r, m])
        else:
            mask = plan.masks[plan.mask_row[h, r0 + r, m]]
        view = s5.permute(1, 2, 4, 0, 3, 5)  # [H, c, M, B, b, b]
        if plan.index.shape[0] == 1:
            view[:, r, m] = view[:, r, m].masked_fill(~mask[None, :, None], NEG_INF)
        else:
            view[h, r, m] = view[h, r, m].masked_fill(~mask[:, None], NEG_INF)
    return s


def _gather_chunks(plan: _GatherPlan, qp: torch.Tensor):
    BH, QB, b, D = qp.shape
    return _chunk_rows(QB, BH * plan.index.shape[-1] * b * max(D, b) * 4)


def _gather_forward(plan: _GatherPlan, layout: Layout, heads: int, qp, kp, vp, o, lse, scale: float):
    for r0, r1 in _gather_chunks(plan, qp):
        s = _gather_scores(qp[:, r0:r1], _gather(kp, plan, heads, r0, r1), plan, layout, heads, r0, r1, scale)
        top = s.amax(-1, keepdim=True)
        p = s.sub_(top).exp_()
        total = p.sum(-1, keepdim=True)
        o[:, r0:r1] = _bmm(p, _gather(vp, plan, heads, r0, r1)).div_(total)
        lse[:, r0:r1] = total.log_().add_(top).squeeze(-1)


def _gather_backward(plan: _GatherPlan, layout: Layout, heads: int, qp, kp, vp, dop, lse, delta, dq, dk, dv,
                     scale: float):
    BH, QB, b, D = qp.shape
    table = torch.arange(BH) % plan.index.shape[0]  # head table of each (batch, head)
    base = (torch.arange(BH) * QB)[:, None, None]
    for r0, r1 in _gather_chunks(plan, qp):
        kg, vg = _gather(kp, plan, heads, r0, r1), _gather(vp, plan, heads, r0, r1)
        p = _gather_scores(qp[:, r0:r1], kg, plan, layout, heads, r0, r1, scale)
        p = p.sub_(lse[:, r0:r1, :, None]).exp_()  # [BH, c, b, M b]
        doc = dop[:, r0:r1]
        dvg = _bmm(p.transpose(-1, -2), doc)  # [BH, c, M b, D]
        ds = p.mul_(_bmm(doc, vg.transpose(-1, -2)).sub_(delta[:, r0:r1, :, None]))
        dq[:, r0:r1] = _bmm(ds, kg, scale)
        dkg = _bmm(ds.transpose(-1, -2), qp[:, r0:r1], scale)
        flat = (base + plan.index[table, r0:r1]).reshape(-1)  # rows of dk/dv viewed as [BH * QB, b, D]
        dk.view(-1, b, D).index_add_(0, flat, dkg.reshape(-1, b, D))
        dv.view(-1, b, D).index_add_(0, flat, dvg.reshape(-1, b, D))


# --- autograd ---------------------------------------------------------------------------------


class CPUAttention(torch.autograd.Function):
    """Block-sparse attention in block order, with a recomputing backward."""

    @staticmethod
    def forward(ctx, q, k, v, layout: Layout, scale: float):
        plan = _plan(layout)
        qp, kp, vp = (to_physical(t, layout) for t in (q, k, v))
        o = torch.empty(qp.shape)
        lse = torch.empty(qp.shape[:3])
        if isinstance(plan, _BandPlan):
            _band_forward(plan, qp, kp, vp, o, lse, scale)
        else:
            _gather_forward(plan, layout, q.shape[1], qp, kp, vp, o, lse, scale)
        ctx.save_for_backward(qp, kp, vp, o, lse)
        ctx.layout, ctx.scale, ctx.shape, ctx.dtype = layout, scale, q.shape, q.dtype
        return from_physical(o, layout, q.shape, q.dtype)

    @staticmethod
    def backward(ctx, do):
        qp, kp, vp, o, lse = ctx.saved_tensors
        layout, scale, shape, dtype = ctx.layout, ctx.scale, ctx.shape, ctx.dtype
        plan = _plan(layout)
        dop = to_physical(do.contiguous(), layout)
        delta = (o * dop).sum(-1)
        dq = torch.empty(qp.shape)  # both schedules write every row
        dk, dv = torch.zeros(kp.shape), torch.zeros(vp.shape)
        if isinstance(plan, _BandPlan):
            _band_backward(plan, qp, kp, vp, dop, lse, delta, dq, dk, dv, scale)
        else:
            _gather_backward(plan, layout, shape[1], qp, kp, vp, dop, lse, delta, dq, dk, dv, scale)
        return (*(from_physical(g, layout, shape, dtype) for g in (dq, dk, dv)), None, None)


# --- strided layouts read in place -----------------------------------------------------------


def _reads_columns_in_place(layout: Layout) -> bool:
    """Strided layouts whose [R, l] view is whole (N = R l) and whose columns split into whole blocks."""
    return layout.permuted and layout.physical_len == layout.seq_len and layout.rows % layout.block == 0


def _column_blocks(x: torch.Tensor, layout: Layout) -> torch.Tensor:
    """[B, H, N, D] -> float32 view [B * H, U, b, l, D]: block-row u of every column (U = R / b)."""
    B, H, N, D = x.shape
    return x.float().reshape(B * H, layout.rows // layout.block, layout.block, layout.stride, D)


class ColumnAttention(torch.autograd.Function):
    """The strided pattern without a copy into block order: for block-row u of the [R, l] view, all l
    columns are one batch of [b, D] matrices read with row stride l * D, attending to block-rows 0..u of
    their own column (causal mask on the diagonal block only). No padding slots, no transposes of q/k/v."""

    @staticmethod
    def forward(ctx, q, k, v, layout: Layout, scale: float):
        qv, kv, vv = (_column_blocks(t, layout) for t in (q, k, v))
        BH, U, b, ll, D = qv.shape
        causal = torch.ones(b, b, dtype=torch.bool).tril_()
        o = torch.empty(BH, U, b, ll, D)
        lse = torch.empty(BH, U, ll, b)
        for bh in range(BH):
            for u in range(U):
                qu = qv[bh, u].transpose(0, 1)  # [l, b, D]
                s = torch.empty(u + 1, ll, b, b)
                for w in range(u + 1):
                    torch.baddbmm(s[w], qu, kv[bh, w].permute(1, 2, 0), beta=0.0, alpha=scale, out=s[w])
                s[u].masked_fill_(~causal, NEG_INF)
                top = s.amax(dim=(0, 3))  # [l, b]
                s.sub_(top[None, :, :, None]).exp_()
                total = s.sum(dim=(0, 3))
                acc = torch.bmm(s[0], vv[bh, 0].transpose(0, 1))
                for w in range(1, u + 1):
                    acc.baddbmm_(s[w], vv[bh, w].transpose(0, 1))
                o[bh, u].copy_(acc.div_(total[..., None]).transpose(0, 1))
                lse[bh, u] = total.log_().add_(top)
        out = o.view(q.shape)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.layout, ctx.scale = layout, scale
        return out.to(q.dtype)

    @staticmethod
    def backward(ctx, do):
        q, k, v, out, lse = ctx.saved_tensors
        layout, scale = ctx.layout, ctx.scale
        qv, kv, vv, dov = (_column_blocks(t, layout) for t in (q, k, v, do))
        BH, U, b, ll, D = qv.shape
        causal = torch.ones(b, b, dtype=torch.bool).tril_()
        delta = (_column_blocks(out, layout) * dov).sum(-1)  # [BH, U, b, l]
        dq = torch.empty(BH, U, b, ll, D)
        dk = torch.zeros(BH, U, ll, b, D)  # accumulated column-major, transposed once at the end
        dv = torch.zeros(BH, U, ll, b, D)
        for bh in range(BH):
            for u in range(U):
                qu, dou = qv[bh, u].transpose(0, 1), dov[bh, u].transpose(0, 1)  # [l, b, D]
                lse_u, delta_u = lse[bh, u, :, :, None], delta[bh, u].t()[:, :, None]
                dqu = torch.zeros(ll, b, D)
                for w in range(u + 1):
                    kw, vw = kv[bh, w].transpose(0, 1), vv[bh, w].transpose(0, 1)
                    p = torch.baddbmm(torch.empty(ll, b, b), qu, kw.transpose(1, 2), beta=0.0, alpha=scale)
                    if w == u:
                        p.masked_fill_(~causal, NEG_INF)
                    p.sub_(lse_u).exp_()
                    dv[bh, w].baddbmm_(p.transpose(1, 2), dou)
                    ds = p.mul_(torch.bmm(dou, vw.transpose(1, 2)).sub_(delta_u))
                    dqu.baddbmm_(ds, kw, alpha=scale)
                    dk[bh, w].baddbmm_(ds.transpose(1, 2), qu, alpha=scale)
                dq[bh, u].copy_(dqu.transpose(0, 1))
        dtype = q.dtype
        return (dq.view(q.shape).to(dtype), dk.transpose(2, 3).reshape(q.shape).to(dtype),
                dv.transpose(2, 3).reshape(q.shape).to(dtype), None, None)


# --- band layouts in compiled C ---------------------------------------------------------------


def _runs_compiled(layout: Layout, d: int) -> bool:
    """A band layout whose block and head dim the compiled kernel takes (1, 2, 4 or 8 vectors), where it runs."""
    vl = cpu_kernels.vector_floats()
    if not vl or layout.block > 64 or not all(n % vl == 0 and n // vl in (1, 2, 4, 8) for n in (layout.block, d)):
        return False
    return isinstance(_plan(layout), _BandPlan)


def _in_place(layout: Layout) -> bool:
    """Whole layouts need no copy: blocks in sequence order, or a strided grid read as it is."""
    whole = layout.physical_len == layout.seq_len == layout.num_blocks * layout.block
    return _reads_columns_in_place(layout) or (not layout.permuted and whole)


def _band_forward_compiled(xs: list[torch.Tensor], layout: Layout, scale: float, grid: tuple[int, int],
                           backward_coming: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """band_forward on q, k, v [B H, L, D] float32 in the kernel's order: (o, lse, the probabilities kept for the
    backward or None)."""
    plan = _plan(layout)
    o, lse = torch.empty(xs[0].shape), torch.empty(xs[0].shape[:2])
    # the probabilities [B H, QB, b, M b] for the backward, where one is coming and they fit
    shape = (xs[0].shape[0], layout.num_blocks, layout.block, plan.width * layout.block)
    keep = backward_coming and math.prod(shape) * 4 <= PROBS_KEEP_BYTES and plan.fill >= PROBS_MIN_FILL
    probs = _probs_buffer(shape) if keep else None
    cpu_kernels.check(cpu_kernels.library().band_forward(
        *(x.data_ptr() for x in xs), plan.kinds.data_ptr(), plan.mask_id.data_ptr(), plan.masks.data_ptr(),
        xs[0].shape[0], layout.num_blocks, layout.block, xs[0].shape[-1], plan.width, *grid, scale, o.data_ptr(),
        lse.data_ptr(), None if probs is None else probs.data_ptr(), torch.get_num_threads()))
    return o, lse, probs


def _band_backward_compiled(saved: tuple[torch.Tensor, ...], dout: torch.Tensor, layout: Layout, scale: float,
                            grid: tuple[int, int]) -> list[torch.Tensor]:
    """band_backward from what _band_forward_compiled saved (q, k, v, o, lse, probs) and dout like o:
    [dq, dk, dv], each float32 like o; the probabilities go back to the pool."""
    q, k, v, o, lse, probs = saved
    plan = _plan(layout)
    grads = [torch.empty(o.shape) for _ in range(3)]
    cpu_kernels.check(cpu_kernels.library().band_backward(
        q.data_ptr(), k.data_ptr(), v.data_ptr(), dout.data_ptr(), lse.data_ptr(), o.data_ptr(),
        plan.kinds.data_ptr(), plan.mask_id.data_ptr(), plan.masks.data_ptr(), o.shape[0], layout.num_blocks,
        layout.block, o.shape[-1], plan.width, *grid, scale, None if probs is None else probs.data_ptr(),
        *(g.data_ptr() for g in grads), torch.get_num_threads()))
    if probs is not None and sum(t.numel() for t in _probs_pool) + probs.numel() <= PROBS_POOL_BYTES // 4:
        _probs_pool.append(probs)
    return grads


def _grid(layout: Layout) -> tuple[int, int]:
    """The [R, l] grid a strided layout is read as in place, else (0, 0)."""
    return (layout.rows, layout.stride) if layout.permuted else (0, 0)


class CompiledBand(torch.autograd.Function):
    """Band layouts in kernels/cpu_kernels.c (band_forward, band_backward): on the inputs themselves when the
    layout is whole ([B * H, N, D], strided layouts read as their [R, l] grid), else in block order through
    one copy in and one out (:func:`to_physical`)."""

    @staticmethod
    def forward(ctx, q, k, v, layout: Layout, scale: float):
        B, H, N, D = q.shape
        if _in_place(layout):
            xs = [_contiguous_float(t).view(B * H, N, D) for t in (q, k, v)]
            grid = _grid(layout)
        else:
            xs = [to_physical(t, layout).contiguous().view(B * H, -1, D) for t in (q, k, v)]
            grid = (0, 0)
        o, lse, probs = _band_forward_compiled(xs, layout, scale, grid, any(ctx.needs_input_grad[:3]))
        ctx.save_for_backward(*xs, o, lse, probs)
        ctx.layout, ctx.scale, ctx.shape, ctx.dtype, ctx.grid = layout, scale, q.shape, q.dtype, grid
        return CompiledBand._back(o, ctx)

    @staticmethod
    def _back(x: torch.Tensor, ctx) -> torch.Tensor:
        """A result in the kernel's order -> the caller's [B, H, N, D] and dtype."""
        if _in_place(ctx.layout):
            return x.view(ctx.shape).to(ctx.dtype)
        return from_physical(x.view(-1, ctx.layout.num_blocks, ctx.layout.block, ctx.shape[-1]), ctx.layout,
                             ctx.shape, ctx.dtype)

    @staticmethod
    def backward(ctx, do):
        saved = ctx.saved_tensors  # once: under checkpointing each read unpacks them again
        o = saved[3]
        if _in_place(ctx.layout):
            dout = _contiguous_float(do).view(o.shape)
        else:
            dout = to_physical(do.contiguous(), ctx.layout).contiguous().view(o.shape)
        grads = _band_backward_compiled(saved, dout, ctx.layout, ctx.scale, ctx.grid)
        return (*(CompiledBand._back(g, ctx) for g in grads), None, None)


PACKED_DTYPES = (torch.float32, torch.bfloat16)  # what heads_copy reads and writes


class PackedBand(torch.autograd.Function):
    """A whole band layout (:func:`_in_place`) in the compiled kernels, straight from the qkv projection's output
    [B, N, 3 H D] to the attention's output [B, N, H D] (float32 or bfloat16, the input's dtype): one compiled
    copy (kernels/cpu_kernels.c heads_copy) into the kernels' float32 q, k, v [B H, N, D] and one out of their
    output, the same for the gradients, in place of a permuted copy and a cast per tensor, a stack and a clone."""

    @staticmethod
    def forward(ctx, qkv, layout: Layout, scale: float, heads: int):
        B, N, width = qkv.shape
        D = width // (3 * heads)
        qkv = qkv.contiguous()
        xs = [torch.empty(B * heads, N, D) for _ in range(3)]
        _heads_copy(qkv, xs, heads, to_heads=True)
        grid = _grid(layout)
        o, lse, probs = _band_forward_compiled(xs, layout, scale, grid, ctx.needs_input_grad[0])
        ctx.save_for_backward(*xs, o, lse, probs)
        ctx.layout, ctx.scale, ctx.grid, ctx.heads, ctx.dtype = layout, scale, grid, heads, qkv.dtype
        y = torch.empty(B, N, heads * D, dtype=qkv.dtype)
        _heads_copy(y, [o], heads, to_heads=False)
        return y

    @staticmethod
    def backward(ctx, dy):
        saved = ctx.saved_tensors  # once: under checkpointing each read unpacks them again
        o = saved[3]
        dout = torch.empty(o.shape)
        dy = dy.contiguous() if dy.dtype in PACKED_DTYPES else dy.float().contiguous()
        _heads_copy(dy, [dout], ctx.heads, to_heads=True)
        grads = _band_backward_compiled(saved, dout, ctx.layout, ctx.scale, ctx.grid)
        dqkv = torch.empty(dy.shape[0], dy.shape[1], 3 * dy.shape[2], dtype=ctx.dtype)
        _heads_copy(dqkv, grads, ctx.heads, to_heads=False)
        return dqkv, None, None, None


def _heads_copy(rows: torch.Tensor, heads: list[torch.Tensor], n_heads: int, to_heads: bool) -> None:
    """rows [B, N, P H D] (float32 or bfloat16, contiguous) <-> P heads [B H, N, D] (float32, contiguous), in the
    direction ``to_heads`` says."""
    B, N, _ = rows.shape
    pointers = (ctypes.c_void_p * len(heads))(*(h.data_ptr() for h in heads))
    cpu_kernels.check(cpu_kernels.library().heads_copy(
        rows.data_ptr(), pointers, B, N, len(heads), n_heads, heads[0].shape[-1], int(to_heads),
        int(rows.dtype == torch.bfloat16), torch.get_num_threads()))


def runs_packed(qkv: torch.Tensor, layout: Layout, heads: int) -> bool:
    """Whether :func:`packed_attention` takes ``qkv`` [B, N, 3 H D] with ``layout`` (else unpack it into q, k, v
    for :func:`cpu_attention`)."""
    D = qkv.shape[-1] // (3 * heads)
    return qkv.device.type == "cpu" and qkv.dtype in PACKED_DTYPES and _runs_compiled(layout, D) and _in_place(layout)


def packed_attention(qkv: torch.Tensor, layout: Layout, scale: float, heads: int) -> torch.Tensor:
    """[B, N, 3 H D] -> [B, N, H D] where :func:`runs_packed`; inputs already validated by ``kernels.attention``."""
    return PackedBand.apply(qkv, layout, scale, heads)


def _probs_buffer(shape: tuple[int, ...]) -> torch.Tensor:
    """An uninitialised float32 tensor of ``shape``: a pooled one of that size where there is one."""
    n = math.prod(shape)
    for i, t in enumerate(_probs_pool):
        if t.numel() == n:
            return _probs_pool.pop(i).view(shape)
    return torch.empty(shape)


def cpu_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: Layout,
                  scale: float) -> torch.Tensor:
    """[B, H, N, D] -> [B, H, N, D]; inputs already validated by ``kernels.attention``."""
    if _runs_compiled(layout, q.shape[-1]):
        return CompiledBand.apply(q, k, v, layout, scale)
    if _reads_columns_in_place(layout):
        return ColumnAttention.apply(q, k, v, layout, scale)
    return CPUAttention.apply(q, k, v, layout, scale)
