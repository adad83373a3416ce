"""Block-sparse attention on the CPU in plain PyTorch: only the listed key blocks, batched matmuls.

Works in the layout's physical order (one copy in, one out; the strided pattern is
transposed in that copy). The forward saves the log-sum-exp; the backward recomputes
the probabilities, so memory stays O(computed blocks), never N x N. Computes in
float32 whatever the input dtype. Two schedules, picked per layout:

* band: every query block r reads the key blocks [r - M + 1, r] (all, local, strided
  when M is small). Slot m of every row is then the contiguous slice of keys shifted
  by m, so each slot is one bmm on views: no gather, no scatter. Per (batch, head).
* gather: anything else (fixed, wide bands). The listed key blocks of a chunk of rows
  are gathered into [rows, M * block] and the gradients scattered back with index_add.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .layout import BlockTable, Layout

CHUNK_BYTES = 4 << 20  # scores of one chunk of query blocks: stays in cache
MASK_CACHE_BYTES = 64 << 20  # gather schedule: keep partial-block masks up to this size, else rebuild per chunk
MAX_BAND_SLOTS = 16  # wider bands (e.g. "all") use the gather schedule
NEG_INF = float("-inf")


# --- layout -> physical order -----------------------------------------------------------------


def to_physical(x: torch.Tensor, layout: Layout, front: int = 0) -> torch.Tensor:
    """[B, H, N, D] -> [B * H, front + QB, block, D] float32 in block order, zero padded.

    ``front`` zero blocks are put before the first block (the band schedule's slot shift).
    """
    B, H, N, D = x.shape
    b = layout.block
    out = torch.empty((B * H, front + layout.num_blocks, b, D))
    flat = out.view(B, H, -1, D)
    flat[:, :, : front * b].zero_()
    flat = flat[:, :, front * b:]
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


def from_physical(x: torch.Tensor, layout: Layout, shape: torch.Size, dtype: torch.dtype,
                  front: int = 0) -> torch.Tensor:
    """Inverse of :func:`to_physical`: [B * H, front + QB, block, D] -> ``shape`` [B, H, N, D] in ``dtype``."""
    B, H, N, D = shape
    flat = x.view(B, H, -1, D)[:, :, front * layout.block:]
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


def _slots(layout: Layout, band: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Per (head table, query block, slot): the key block and its kind (0 padding, 1 full, 2 partial).

    band: slot m of row r holds key block r - (M - 1) + m; else the listed blocks left-packed.
    """
    ht, n = layout.table_heads, layout.num_blocks
    entries = []
    for table, kind in ((layout.kv_full, 1), (layout.kv_partial, 2)):
        counts = table.count.long()
        h = torch.repeat_interleave(torch.arange(ht)[:, None].expand(ht, n).reshape(-1), counts.reshape(-1))
        r = torch.repeat_interleave(torch.arange(n).repeat(ht), counts.reshape(-1))
        entries.append((h, r, _listed(table), torch.full_like(h, kind)))
    h, r, kb, kind = (torch.cat(parts) for parts in zip(*entries, strict=True))
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
    rows = torch.arange(layout.num_blocks)
    lo = torch.full_like(rows, layout.num_blocks)
    hi = torch.full_like(rows, -1)
    for table in (layout.kv_full, layout.kv_partial):
        c = table.count[0].long()
        r = torch.repeat_interleave(rows, c)
        kb = _listed(table)
        lo.scatter_reduce_(0, r, kb, "amin")
        hi.scatter_reduce_(0, r, kb, "amax")
    return bool((hi == rows).all() and (hi - lo + 1 == counts).all())


@dataclass
class _Work:
    """One slot of one chunk: rows [a, e) of the chunk read key blocks row + shift (band) or index (gather)."""

    slot: int
    a: int
    e: int
    mask: torch.Tensor | None  # [e - a, block, block], False -> not read; None: all read


@dataclass
class _BandPlan:
    width: int  # M
    chunks: list[tuple[int, int]]
    work: list[list[_Work]]  # per chunk


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
                rows = r0 + a + torch.nonzero(k == 2).flatten()
                mask[k == 2] = _entry_masks(layout, torch.zeros_like(rows), rows, index[rows, m])
            items.append(_Work(m, a, e, mask))
        work.append(items)
    return _BandPlan(width, chunks, work)


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


def _band_forward(plan: _BandPlan, qs, kp, vp, o, lse):
    """qs/o: [BH, QB, b, D]; kp/vp: [BH, M - 1 + QB, b, D] (front padded); lse: [BH, QB, b]."""
    b = qs.shape[2]
    s = torch.empty(plan.width, max(r1 - r0 for r0, r1 in plan.chunks), b, b)
    for bh in range(qs.shape[0]):
        q, k, v = qs[bh], kp[bh], vp[bh]
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
                keys = slice(r0 + w.a + w.slot, r0 + w.e + w.slot)
                torch.bmm(q[rows], k[keys].transpose(1, 2), out=out)
                if w.mask is not None:
                    out.masked_fill_(~w.mask, NEG_INF)
            for m in idle:
                sc[m].fill_(NEG_INF)
            top = sc.amax(dim=(0, 3))  # [c, b]
            sc.sub_(top[None, :, :, None]).exp_()
            total = sc.sum(dim=(0, 3))
            oc = o[bh, r0:r1].zero_()
            for w in items:
                oc[w.a:w.e].baddbmm_(sc[w.slot, w.a:w.e], v[r0 + w.a + w.slot:r0 + w.e + w.slot])
            oc.div_(total[..., None])
            lse[bh, r0:r1] = total.log_().add_(top)


def _band_backward(plan: _BandPlan, qs, kp, vp, dop, lse, delta, dq, dk, dv):
    """Streams slot by slot; dk/dv are front padded like kp/vp and accumulate in place."""
    for bh in range(qs.shape[0]):
        q, k, v, do = qs[bh], kp[bh], vp[bh], dop[bh]
        for (r0, r1), items in zip(plan.chunks, plan.work, strict=True):
            dqc = dq[bh, r0:r1].zero_()
            for w in items:
                rows = slice(r0 + w.a, r0 + w.e)
                keys = slice(r0 + w.a + w.slot, r0 + w.e + w.slot)
                p = torch.bmm(q[rows], k[keys].transpose(1, 2))
                if w.mask is not None:
                    p.masked_fill_(~w.mask, NEG_INF)
                p.sub_(lse[bh, rows, :, None]).exp_()
                dv[bh, keys].baddbmm_(p.transpose(1, 2), do[rows])
                ds = p.mul_(torch.bmm(do[rows], v[keys].transpose(1, 2)).sub_(delta[bh, rows, :, None]))
                dqc[w.a:w.e].baddbmm_(ds, k[keys])
                dk[bh, keys].baddbmm_(ds.transpose(1, 2), q[rows])


# --- gather schedule --------------------------------------------------------------------------


def _bmm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Batched matmul over all leading dims, as one bmm on views (no copies of a or b)."""
    out = torch.bmm(a.reshape(-1, *a.shape[-2:]), b.reshape(-1, *b.shape[-2:]))
    return out.view(*a.shape[:-1], b.shape[-1])


def _gather(xp: torch.Tensor, plan: _GatherPlan, heads: int, r0: int, r1: int) -> torch.Tensor:
    """Key blocks listed for query blocks [r0, r1): [B * H, c, M * block, D]."""
    BH, _, b, D = xp.shape
    idx = plan.index[:, r0:r1]
    x = xp.view(BH // heads, heads, *xp.shape[1:])
    g = x[:, :, idx[0]] if idx.shape[0] == 1 else x[:, torch.arange(heads)[:, None, None], idx]
    return g.reshape(BH, r1 - r0, -1, D)


def _gather_scores(qc, kg, plan: _GatherPlan, layout: Layout, heads: int, r0: int, r1: int) -> torch.Tensor:
    """Masked scores [B * H, c, block, M * block] of (pre-scaled) query blocks [r0, r1)."""
    s = _bmm(qc, kg.transpose(-1, -2))
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


def _gather_chunks(plan: _GatherPlan, qs: torch.Tensor):
    BH, QB, b, D = qs.shape
    return _chunk_rows(QB, BH * plan.index.shape[-1] * b * max(D, b) * 4)


def _gather_forward(plan: _GatherPlan, layout: Layout, heads: int, qs, kp, vp, o, lse):
    for r0, r1 in _gather_chunks(plan, qs):
        s = _gather_scores(qs[:, r0:r1], _gather(kp, plan, heads, r0, r1), plan, layout, heads, r0, r1)
        top = s.amax(-1, keepdim=True)
        p = s.sub_(top).exp_()
        total = p.sum(-1, keepdim=True)
        o[:, r0:r1] = _bmm(p, _gather(vp, plan, heads, r0, r1)).div_(total)
        lse[:, r0:r1] = total.log_().add_(top).squeeze(-1)


def _gather_backward(plan: _GatherPlan, layout: Layout, heads: int, qs, kp, vp, dop, lse, delta, dq, dk, dv):
    BH, QB, b, D = qs.shape
    table = torch.arange(BH) % plan.index.shape[0]  # head table of each (batch, head)
    base = (torch.arange(BH) * QB)[:, None, None]
    for r0, r1 in _gather_chunks(plan, qs):
        kg, vg = _gather(kp, plan, heads, r0, r1), _gather(vp, plan, heads, r0, r1)
        p = _gather_scores(qs[:, r0:r1], kg, plan, layout, heads, r0, r1)
        p = p.sub_(lse[:, r0:r1, :, None]).exp_()  # [BH, c, b, M b]
        doc = dop[:, r0:r1]
        dvg = _bmm(p.transpose(-1, -2), doc)  # [BH, c, M b, D]
        ds = p.mul_(_bmm(doc, vg.transpose(-1, -2)).sub_(delta[:, r0:r1, :, None]))
        dq[:, r0:r1] = _bmm(ds, kg)
        dkg = _bmm(ds.transpose(-1, -2), qs[:, r0:r1])
        flat = (base + plan.index[table, r0:r1]).reshape(-1)  # rows of dk/dv viewed as [BH * QB, b, D]
        dk.view(-1, b, D).index_add_(0, flat, dkg.reshape(-1, b, D))
        dv.view(-1, b, D).index_add_(0, flat, dvg.reshape(-1, b, D))


# --- autograd ---------------------------------------------------------------------------------


class CPUAttention(torch.autograd.Function):
    """Block-sparse attention with a recomputing backward."""

    @staticmethod
    def forward(ctx, q, k, v, layout: Layout, scale: float):
        plan = _plan(layout)
        band = isinstance(plan, _BandPlan)
        front = plan.width - 1 if band else 0
        qs = to_physical(q, layout).mul_(scale)
        kp, vp = to_physical(k, layout, front), to_physical(v, layout, front)
        BH, QB, b, D = qs.shape
        o = torch.empty_like(qs)
        lse = torch.empty(BH, QB, b)
        if band:
            _band_forward(plan, qs, kp, vp, o, lse)
        else:
            _gather_forward(plan, layout, q.shape[1], qs, kp, vp, o, lse)
        ctx.save_for_backward(qs, kp, vp, o, lse)
        ctx.layout, ctx.scale, ctx.shape, ctx.dtype, ctx.front = layout, scale, q.shape, q.dtype, front
        return from_physical(o, layout, q.shape, q.dtype)

    @staticmethod
    def backward(ctx, do):
        qs, kp, vp, o, lse = ctx.saved_tensors
        layout, front = ctx.layout, ctx.front
        plan = _plan(layout)
        dop = to_physical(do, layout)
        delta = (o * dop).sum(-1)
        dq = torch.empty_like(qs)  # both schedules write every row
        dk, dv = torch.zeros_like(kp), torch.zeros_like(vp)
        if isinstance(plan, _BandPlan):
            _band_backward(plan, qs, kp, vp, dop, lse, delta, dq, dk, dv)
        else:
            _gather_backward(plan, layout, ctx.shape[1], qs, kp, vp, dop, lse, delta, dq, dk, dv)
        dq.mul_(ctx.scale)  # q was pre-scaled, so dk already carries the scale
        return (from_physical(dq, layout, ctx.shape, ctx.dtype), from_physical(dk, layout, ctx.shape, ctx.dtype, front),
                from_physical(dv, layout, ctx.shape, ctx.dtype, front), None, None)


def cpu_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: Layout,
                  scale: float) -> torch.Tensor:
    """[B, H, N, D] -> [B, H, N, D]; inputs already validated by ``kernels.attention``."""
    return CPUAttention.apply(q, k, v, layout, scale)
