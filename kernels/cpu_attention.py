"""Block-sparse attention on the CPU in plain PyTorch: gather the listed key blocks, batched matmul.

Works in the layout's physical order (the strided pattern is transposed once,
with a copy, which is cheap next to the matmuls on a CPU). Query blocks are
processed in chunks sized to stay in cache; the forward saves the log-sum-exp
and the backward recomputes the probabilities chunk by chunk, so memory stays
O(computed blocks), never N x N. Computes in float32 whatever the input dtype.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .layout import BlockTable, Layout

CHUNK_BYTES = 2 << 20  # working set per chunk of query blocks (fits L2; big buffers page-fault)


@dataclass
class _Plan:
    """One merged key-block list per query block, with the masks its partial entries need."""

    index: torch.Tensor  # [Ht, QB, M] key blocks (full ones, then partial, then padding -> 0)
    slot_valid: torch.Tensor  # [Ht, QB, M] False on padding slots
    part_at: torch.Tensor  # [n, 3] (h, qb, slot) of partial entries, sorted by qb
    part_mask: torch.Tensor  # [n, b, b] element masks of the partial entries
    part_row_start: torch.Tensor  # [QB + 1] partial entries of query blocks [r0, r1) are part_at[start[r0]:start[r1]]


def _listed(table: BlockTable) -> torch.Tensor:
    """All listed blocks of a CSR table, head by head, row by row."""
    return table.index[torch.arange(table.index.shape[1]) < table.offsets[:, -1:]].long()


def _plan(layout: Layout) -> _Plan:
    """The layout's CPU plan, built once and cached on the layout."""
    if "cpu_plan" in layout._cache:
        return layout._cache["cpu_plan"]
    full, part = layout.kv_full, layout.kv_partial
    ht, qb_n, b = layout.table_heads, layout.num_blocks, layout.block
    n_full, n_part = full.count.long(), part.count.long()
    width = int((n_full + n_part).max())
    slot = torch.arange(width)
    index = torch.zeros(ht, qb_n, width, dtype=torch.long)
    is_full = slot < n_full[..., None]
    is_part = (slot >= n_full[..., None]) & (slot < (n_full + n_part)[..., None])
    index[is_full] = _listed(full)
    index[is_part] = _listed(part)
    h, qb, s = torch.nonzero(is_part, as_tuple=True)
    order = torch.argsort(qb, stable=True)
    h, qb, s = h[order], qb[order], s[order]
    kb = index[h, qb, s]
    i, valid_q = layout.original_index(qb[:, None] * b + torch.arange(b))  # [n, b]
    j, valid_k = layout.original_index(kb[:, None] * b + torch.arange(b))
    heads = h if layout.table_heads > 1 else torch.zeros_like(h)
    ok = layout.allowed(i[:, :, None], j[:, None, :], heads[:, None, None]) & valid_k[:, None, :]
    ok |= ~valid_q[:, :, None]  # padding rows read everything listed: keeps them finite
    row_start = torch.searchsorted(qb, torch.arange(qb_n + 1))
    plan = _Plan(index, is_full | is_part, torch.stack([h, qb, s], 1), ok, row_start)
    layout._cache["cpu_plan"] = plan
    return plan


def to_physical(x: torch.Tensor, layout: Layout) -> torch.Tensor:
    """[B, H, N, D] -> [B, H, QB, block, D] float32 in the layout's block order, zero padded."""
    B, H, N, D = x.shape
    x = x.float()
    if layout.permuted:
        R, ll = layout.rows, layout.stride
        x = torch.nn.functional.pad(x, (0, 0, 0, R * ll - N))
        x = x.view(B, H, R, ll, D).transpose(2, 3).reshape(B, H, R * ll, D)
    P = layout.num_blocks * layout.block
    if P != x.shape[2]:
        x = torch.nn.functional.pad(x, (0, 0, 0, P - x.shape[2]))
    return x.view(B, H, layout.num_blocks, layout.block, D)


def from_physical(x: torch.Tensor, layout: Layout, dtype: torch.dtype) -> torch.Tensor:
    """Inverse of :func:`to_physical`: [B, H, QB, block, D] -> [B, H, N, D] in ``dtype``."""
    B, H = x.shape[:2]
    D = x.shape[-1]
    x = x.reshape(B, H, -1, D)
    if layout.permuted:
        R, ll = layout.rows, layout.stride
        x = x[:, :, : R * ll].reshape(B, H, ll, R, D).transpose(2, 3).reshape(B, H, R * ll, D)
    return x[:, :, : layout.seq_len].to(dtype).contiguous()


def _chunks(layout: Layout, plan: _Plan, B: int, H: int, D: int):
    """Yield query-block ranges [r0, r1) whose gathered keys fit CHUNK_BYTES."""
    per_row = B * H * plan.index.shape[-1] * layout.block * max(D, layout.block) * 4
    step = max(1, CHUNK_BYTES // per_row)
    for r0 in range(0, layout.num_blocks, step):
        yield r0, min(r0 + step, layout.num_blocks)


def _gather(xp: torch.Tensor, plan: _Plan, r0: int, r1: int) -> torch.Tensor:
    """Key blocks listed for query blocks [r0, r1): [B, H, c, M * block, D]."""
    B, H, _, b, D = xp.shape
    idx = plan.index[:, r0:r1]
    if idx.shape[0] == 1:
        g = xp[:, :, idx[0]]
    else:
        g = xp[:, torch.arange(H)[:, None, None], idx]
    return g.reshape(B, H, r1 - r0, -1, D)


def _bmm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Batched matmul over all leading dims, as one bmm on views (no copies of a or b)."""
    out = torch.bmm(a.reshape(-1, *a.shape[-2:]), b.reshape(-1, *b.shape[-2:]))
    return out.view(*a.shape[:-1], b.shape[-1])


def _scores(qc, kg, plan: _Plan, r0: int, r1: int) -> torch.Tensor:
    """Masked scores [B, H, c, block, M * block] of (pre-scaled) query blocks [r0, r1)."""
    s = _bmm(qc, kg.transpose(-1, -2))
    B, H, c, b, _ = s.shape
    M = plan.index.shape[-1]
    s6 = s.view(B, H, c, b, M, b)
    valid = plan.slot_valid[:, r0:r1]
    if not bool(valid.all()):
        s6.masked_fill_(~valid[None, :, :, None, :, None], float("-inf"))
    lo, hi = int(plan.part_row_start[r0]), int(plan.part_row_start[r1])
    if hi > lo:
        h, qb, slot = plan.part_at[lo:hi].unbind(1)
        mask = plan.part_mask[lo:hi]
        view = s6.permute(1, 2, 4, 0, 3, 5)  # [H, c, M, B, b, b]
        if plan.index.shape[0] == 1 and H > 1:
            sel = view[:, qb - r0, slot]  # [H, n, B, b, b]
            view[:, qb - r0, slot] = sel.masked_fill(~mask[None, :, None], float("-inf"))
        else:
            sel = view[h, qb - r0, slot]  # [n, B, b, b]
            view[h, qb - r0, slot] = sel.masked_fill(~mask[:, None], float("-inf"))
    return s


class CPUAttention(torch.autograd.Function):
    """Block-gather attention with a recomputing backward."""

    @staticmethod
    def forward(ctx, q, k, v, layout: Layout, scale: float):
        plan = _plan(layout)
        qp, kp, vp = (to_physical(t, layout) for t in (q, k, v))
        qs = qp * scale
        B, H, QB, b, D = qp.shape
        op = torch.empty_like(qp)
        lse = torch.empty(B, H, QB, b, 1)
        for r0, r1 in _chunks(layout, plan, B, H, D):
            s = _scores(qs[:, :, r0:r1], _gather(kp, plan, r0, r1), plan, r0, r1)
            m = s.amax(-1, keepdim=True)
            p = s.sub_(m).exp_()
            total = p.sum(-1, keepdim=True)
            op[:, :, r0:r1] = _bmm(p, _gather(vp, plan, r0, r1)).div_(total)
            lse[:, :, r0:r1] = total.log_().add_(m)
        ctx.save_for_backward(qs, kp, vp, op, lse)
        ctx.layout, ctx.scale, ctx.dtype = layout, scale, q.dtype
        return from_physical(op, layout, q.dtype)

    @staticmethod
    def backward(ctx, do):
        qs, kp, vp, op, lse = ctx.saved_tensors
        layout, scale = ctx.layout, ctx.scale
        plan = _plan(layout)
        dop = to_physical(do, layout)
        B, H, QB, b, D = qs.shape
        delta = (op * dop).sum(-1, keepdim=True)
        dq = torch.empty_like(qs)
        dk = torch.zeros(B, H * QB, b, D)
        dv = torch.zeros(B, H * QB, b, D)
        heads = torch.arange(H)[:, None, None] * QB
        for r0, r1 in _chunks(layout, plan, B, H, D):
            kg, vg = _gather(kp, plan, r0, r1), _gather(vp, plan, r0, r1)
            p = _scores(qs[:, :, r0:r1], kg, plan, r0, r1).sub_(lse[:, :, r0:r1]).exp_()  # [B, H, c, b, M b]
            doc = dop[:, :, r0:r1]
            dvg = _bmm(p.transpose(-1, -2), doc)  # [B, H, c, M b, D]
            ds = p.mul_(_bmm(doc, vg.transpose(-1, -2)).sub_(delta[:, :, r0:r1]))
            dq[:, :, r0:r1] = _bmm(ds, kg).mul_(scale)
            dkg = _bmm(ds.transpose(-1, -2), qs[:, :, r0:r1])  # q was pre-scaled
            flat = (heads + plan.index[:, r0:r1]).reshape(-1)  # [H * c * M] rows of dk/dv
            dk.index_add_(1, flat, dkg.reshape(B, -1, b, D))
            dv.index_add_(1, flat, dvg.reshape(B, -1, b, D))
        dk, dv = dk.view(B, H, QB, b, D), dv.view(B, H, QB, b, D)
        return (*(from_physical(g, layout, ctx.dtype) for g in (dq, dk, dv)), None, None)


def cpu_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: Layout,
                  scale: float) -> torch.Tensor:
    """[B, H, N, D] -> [B, H, N, D]; inputs already validated by ``kernels.attention``."""
    return CPUAttention.apply(q, k, v, layout, scale)
