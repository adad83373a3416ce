"""Block-sparse weight matmul on the CPU: compiled C for float32, else gathered blocks and batched matmuls.

**Compiled (float32, blocks 16, 32 and 64, a CPU with AVX2 and FMA or AVX-512).** kernels/cpu_kernels.c
(loaded by kernels/cpu_kernels.py) reads x, dy and w in place: a tile of rows x one output
block stays in registers over the whole list of blocks feeding it, so nothing is gathered or copied and
each output is written once (see the C file). dX runs the same loop over the layout's rows with each
weight block transposed; dW packs x's and dy's column blocks in token chunks. ``STS_COMPILED_KERNELS=0``
in the environment turns it off; ``cpu_kernels.status()`` says whether it runs and why not.

**PyTorch (bf16, fp16, block 8, or no compiler).** Output block j of y = x @ W is one matmul whose
inner dimension runs over every block feeding j:

    y_j = [x_{i_1} | ... | x_{i_c}] @ [W[i_1, j] ; ... ; W[i_c, j]]        ([T, c*b] @ [c*b, b])

Output blocks with the same number of blocks form a *group* (``_partition`` merges groups, padding
them with zero weight blocks, while that saves work; a padded slot multiplies x's block 0 by zeros,
exact for finite x). A group runs in tiles (output blocks x tokens) of about CHUNK_BYTES of gathered
x: one ``index_select`` into a buffer reused by every tile and one ``bmm`` that reads it in place and
writes its output blocks, in the schedule's order, into a work buffer; one ``index_copy_`` at the end
puts them in place. x, y, dy and dx stay token-major: no transposed copies.

The backward runs the same schedule over the layout's rows, gathering dy once per tile for both
gradients: dx_i = [dy_{j_1} | ... ] @ [W[i, j_1]^T ; ...] and [dW[i, j_1] | ...] = x_i^T @ [dy_{j_1} | ...].
Row i's weight blocks are its row-major ids; each is written once: no scatter-add, no atomics.

Small blocks in float32 run dX through torch's BSR matmul (MKL) instead, which reads W's blocks in place
(w itself, in row-major order, is W's BSR values): gathering 8- or 16-wide pieces costs more than it
saves. At block 8 the forward does too from BSR_FORWARD_MIN_TOKENS tokens on; below, the transposed copy
of w that W^T's BSR values need costs more than the product saves. dW always runs the schedule above.
(All measured on one core, 4,096 features: docs/benchmarks.md.)
"""

from __future__ import annotations

import bisect
import warnings
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from . import cpu_kernels

CHUNK_BYTES = 16 << 20  # gathered operand of one tile: large tiles mean few calls, which matters on a loaded
# machine (each multi-threaded call may wait for a descheduled thread); on one idle core 4 and 16 MiB time alike
MIN_TOKENS = 128  # tiles split the tokens only above this many (shorter matmuls run slower)
GROUP_COST = 8  # fixed cost of one more group, in block products (calls, partial tiles)
BSR_MAX_BLOCK = 16  # float32 dX through torch's BSR mm up to this block (faster at every token count tried)
BSR_FORWARD_MAX_BLOCK = 8  # ... and the forward up to this block,
BSR_FORWARD_MIN_TOKENS = 128  # from this many tokens (block 8, density 0.5: 82 ms against 119 at 128 tokens)
COMPILED_BLOCKS = (16, 32, 64)  # cpu_kernels.c's tiles


@dataclass(frozen=True)
class Group:
    """Output blocks ``dst`` [n] that read ``count`` blocks each (padded): operand blocks ``src`` and weight
    blocks ``wid`` [n * count] (padding reads block 0 of each, the weight block then zeroed), ``wdst``
    (= wid, padding sent to the dump slot nnz) and ``pads``, the sorted padding positions.
    ``offset``: where dst[0] sits in the schedule's order."""

    offset: int
    dst: torch.Tensor
    src: torch.Tensor
    wid: torch.Tensor
    wdst: torch.Tensor
    pads: list[int]
    count: int


@dataclass(frozen=True)
class Schedule:
    """Groups over the blocks of one side of the layout; ``order`` [m]: the output block at each position
    of the work buffer (the groups' dst, concatenated); ``empty``: the blocks with no weight block."""

    groups: list[Group]
    order: torch.Tensor
    empty: torch.Tensor


@dataclass(frozen=True)
class BsrLists:
    """Compressed-row lists for torch BSR tensors: of W^T (by output block: ``t_crow``, ``t_col`` and the
    weight ids ``t_ids``) and of W (by input block, in the weight's own order: ``crow``, ``col``)."""

    t_crow: torch.Tensor
    t_col: torch.Tensor
    t_ids: torch.Tensor
    crow: torch.Tensor
    col: torch.Tensor


@dataclass(frozen=True)
class CompiledLists:
    """int32 lists for cpu_kernels.c: per output block (``col_ptr``; input blocks ``col_src`` and weight
    ids ``col_wid``), per input block (``row_ptr``; output blocks ``row_src``, weight ids ``row_wid``), and
    each weight block's input block (``rows``). The weight's blocks are in row-major order, so ``row_src``
    is also each weight block's output block and ``row_wid`` is 0, 1, ..."""

    col_ptr: torch.Tensor
    col_src: torch.Tensor
    col_wid: torch.Tensor
    row_ptr: torch.Tensor
    row_src: torch.Tensor
    row_wid: torch.Tensor
    rows: torch.Tensor


@dataclass(frozen=True)
class CpuPlan:
    """Schedules by output block (forward) and by input block (dX and dW); BSR lists for small blocks;
    the compiled code's lists for the blocks it knows."""

    block: int
    in_blocks: int
    out_blocks: int
    nnz: int
    by_col: Schedule
    by_row: Schedule
    bsr: BsrLists | None
    lists: CompiledLists | None


def _partition(counts: torch.Tensor) -> list[tuple[torch.Tensor, int]]:
    """Split the outer blocks with counts > 0 into groups (indices, padded count) of least total cost:
    sum of n * max count + GROUP_COST per group. Dynamic programming over the runs of equal counts (in
    decreasing order), since cutting inside a run only adds a group."""
    order = torch.argsort(counts, descending=True, stable=True)
    order = order[counts[order] > 0]
    values, sizes = torch.unique_consecutive(counts[order], return_counts=True)
    v, ends = values.tolist(), torch.cumsum(sizes, 0).tolist()
    starts = [0, *ends[:-1]]
    best, cut = [0.0] * (len(v) + 1), [0] * (len(v) + 1)
    for k in range(1, len(v) + 1):
        best[k], cut[k] = min((best[r] + (ends[k - 1] - starts[r]) * v[r] + GROUP_COST, r) for r in range(k))
    groups, k = [], len(v)
    while k:
        r = cut[k]
        groups.append((order[starts[r]:ends[k - 1]], v[r]))
        k = r
    return groups[::-1]


def _schedule(outer: torch.Tensor, inner: torch.Tensor, ids: torch.Tensor, n_outer: int, nnz: int) -> Schedule:
    """The schedule for entries (outer block, inner block, weight id), sorted by outer block."""
    counts = torch.bincount(outer, minlength=n_outer)
    slot = torch.arange(outer.numel()) - (torch.cumsum(counts, 0) - counts)[outer]  # rank within the outer block
    parts = _partition(counts)
    group_of = torch.zeros(n_outer, dtype=torch.long)
    pos = torch.zeros(n_outer, dtype=torch.long)
    for k, (dst, _) in enumerate(parts):
        group_of[dst], pos[dst] = k, torch.arange(dst.numel())
    by_group = torch.argsort(group_of[outer], stable=True)
    ends = torch.cumsum(torch.bincount(group_of[outer], minlength=len(parts)), 0).tolist()
    groups, offset, first = [], 0, 0
    for (dst, count), end in zip(parts, ends, strict=True):
        mine = by_group[first:end]
        flat = pos[outer[mine]] * count + slot[mine]
        src = torch.zeros(dst.numel() * count, dtype=torch.long)
        wid = torch.zeros_like(src)
        wdst = torch.full_like(src, nnz)
        src[flat], wid[flat], wdst[flat] = inner[mine], ids[mine], ids[mine]
        groups.append(Group(offset, dst, src, wid, wdst, (wdst == nnz).nonzero().flatten().tolist(), count))
        offset, first = offset + dst.numel(), end
    return Schedule(groups, torch.cat([g.dst for g in groups]), (counts == 0).nonzero().flatten())


def cpu_plan(rows: torch.Tensor, cols: torch.Tensor, in_blocks: int, out_blocks: int, block: int) -> CpuPlan:
    """The plan for the non-zero blocks (rows[k], cols[k]), k in row-major order."""
    nnz = rows.numel()
    by_col = torch.argsort(cols, stable=True)
    zero = torch.zeros(1, dtype=torch.long)
    t_crow = torch.cat([zero, torch.cumsum(torch.bincount(cols, minlength=out_blocks), 0)])  # per output block
    crow = torch.cat([zero, torch.cumsum(torch.bincount(rows, minlength=in_blocks), 0)])  # per input block
    bsr = BsrLists(t_crow, rows[by_col], by_col, crow, cols) if block <= BSR_MAX_BLOCK else None
    lists = None
    if block in COMPILED_BLOCKS:
        i32 = lambda t: t.to(torch.int32).contiguous()  # noqa: E731
        lists = CompiledLists(i32(t_crow), i32(rows[by_col]), i32(by_col), i32(crow), i32(cols),
                              i32(torch.arange(nnz)), i32(rows))
    return CpuPlan(block, in_blocks, out_blocks, nnz,
                   _schedule(cols[by_col], rows[by_col], by_col, out_blocks, nnz),
                   _schedule(rows, cols, torch.arange(nnz), in_blocks, nnz), bsr, lists)


def compiled_for(block: int) -> bool:
    """Do float32 products with this block size run in compiled C here? (Then float32 is the fastest CPU
    dtype for them: faster than the PyTorch schedule in bf16.)"""
    return block in COMPILED_BLOCKS and cpu_kernels.library() is not None


def _uses_compiled(plan: CpuPlan, dtype: torch.dtype) -> bool:
    return plan.lists is not None and dtype == torch.float32 and cpu_kernels.library() is not None


def _compiled_mm(a: torch.Tensor, w: torch.Tensor, plan: CpuPlan, forward: bool) -> torch.Tensor:
    """a [T, k] (contiguous float32) @ W (forward) or @ W^T (dX) in compiled C."""
    lists, b, T = plan.lists, plan.block, a.shape[0]
    n_out = plan.out_blocks if forward else plan.in_blocks
    ptr, src, wid = (lists.col_ptr, lists.col_src, lists.col_wid) if forward else \
        (lists.row_ptr, lists.row_src, lists.row_wid)
    out = a.new_empty(T, n_out * b)
    w = w.contiguous()
    lib = cpu_kernels.library()
    cpu_kernels.check(lib.bs_mm(a.data_ptr(), a.stride(0), w.data_ptr(), ptr.data_ptr(), src.data_ptr(), wid.data_ptr(),
                                n_out, T, b, 0 if forward else 1, out.data_ptr(), out.stride(0),
                                torch.get_num_threads()))
    return out


def _compiled_dw(x: torch.Tensor, dy: torch.Tensor, plan: CpuPlan) -> torch.Tensor:
    """dw [nnz, b, b] = the listed blocks of x^T @ dy, in compiled C."""
    lists, b = plan.lists, plan.block
    dw = x.new_empty(plan.nnz, b, b)
    lib = cpu_kernels.library()
    cpu_kernels.check(lib.bs_dw(x.data_ptr(), x.stride(0), dy.data_ptr(), dy.stride(0), lists.rows.data_ptr(),
                                lists.row_src.data_ptr(), plan.nnz, x.shape[0], b, dw.data_ptr(),
                                torch.get_num_threads()))
    return dw


def _bsr_product(plan: CpuPlan, w: torch.Tensor, a: torch.Tensor, forward: bool) -> torch.Tensor:
    """a [T, k] @ W (forward) or @ W^T (dX), through torch's BSR mm: [T, k] -> [T, n]."""
    lists, b = plan.bsr, plan.block
    shape = (plan.in_blocks * b, plan.out_blocks * b)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch: "Sparse BSR tensor support is in beta state"
        if forward:  # y^T = W^T x^T: W^T's blocks are w's, transposed, in column order
            values = torch.index_select(w.transpose(1, 2), 0, lists.t_ids)
            m = torch.sparse_bsr_tensor(lists.t_crow, lists.t_col, values, size=shape[::-1])
        else:  # dx^T = W dy^T: W's blocks in row-major order are w itself
            m = torch.sparse_bsr_tensor(lists.crow, lists.col, w.contiguous(), size=shape)
        return torch.mm(m, a.t()).t().contiguous()


def _uses_bsr(plan: CpuPlan, dtype: torch.dtype, forward_tokens: int | None = None) -> bool:
    """dX (forward_tokens None) or the forward of that many tokens through torch's BSR mm?"""
    if plan.bsr is None or dtype != torch.float32:  # torch's CPU BSR mm has no 16-bit kernels
        return False
    return forward_tokens is None or (plan.block <= BSR_FORWARD_MAX_BLOCK and forward_tokens >= BSR_FORWARD_MIN_TOKENS)


def _tiles(group: Group, tokens: int, row_bytes: int) -> Iterator[tuple[int, int, int, int]]:
    """(first, end) output blocks x (first, end) tokens of the group's tiles, tokens innermost;
    row_bytes: bytes of one block of one token."""
    per_token = group.count * row_bytes
    span = min(tokens, max(MIN_TOKENS, CHUNK_BYTES // per_token))
    per = max(1, CHUNK_BYTES // (per_token * span))
    n = group.dst.numel()
    for s in range(0, n, per):
        for t in range(0, tokens, span):
            yield s, min(n, s + per), t, min(tokens, t + span)


class _Scratch:
    """Buffers sized for the largest tile of a schedule, reused by every tile; ``backward`` adds the two
    that only the backward pass uses."""

    def __init__(self, schedule: Schedule, tokens: int, block: int, like: torch.Tensor, backward: bool) -> None:
        self.block, self.tokens = block, tokens
        self.row_bytes = block * like.element_size()
        firsts = [(g, *next(_tiles(g, tokens, self.row_bytes))) for g in schedule.groups]
        slots = max((e - s) * g.count for g, s, e, _, _ in firsts)
        self.gathered = like.new_empty(max((e - s) * g.count * (u - t) for g, s, e, t, u in firsts) * block)
        self.weights = like.new_empty(slots, block, block)
        if backward:
            self.side = like.new_empty(slots * block * block)
            self.sums = like.new_empty(slots * block * block)

    def tiles(self, g: Group) -> Iterator[tuple[int, int, int, int]]:
        return _tiles(g, self.tokens, self.row_bytes)

    def gather(self, src: torch.Tensor, g: Group, s: int, e: int, t: int, u: int) -> torch.Tensor:
        """[e - s, u - t, count * b]: the operand blocks of output blocks s:e, tokens t:u (in scratch)."""
        n, c, b = e - s, g.count, self.block
        out = self.gathered[:(u - t) * n * c * b].view(u - t, n * c, b)
        torch.index_select(src[t:u], 1, g.src[s * c:e * c], out=out)
        return out.view(u - t, n, c * b).transpose(0, 1)

    def weights_of(self, w: torch.Tensor, g: Group, s: int, e: int) -> torch.Tensor:
        """[e - s, count, b, b]: the weight blocks of output blocks s:e, padding zeroed (in scratch)."""
        c, b = g.count, self.block
        ws = torch.index_select(w, 0, g.wid[s * c:e * c], out=self.weights[:(e - s) * c])
        lo, hi = bisect.bisect_left(g.pads, s * c), bisect.bisect_left(g.pads, e * c)
        if hi > lo:
            ws.index_fill_(0, torch.tensor(g.pads[lo:hi]) - s * c, 0)
        return ws.view(e - s, c, b, b)

    def side_by_side(self, blocks: torch.Tensor) -> torch.Tensor:
        """[n, c, b, b] -> [n, b, c * b]: the blocks side by side (a copy in scratch, rows of b contiguous)."""
        n, c, b = blocks.shape[0], blocks.shape[1], self.block
        out = self.side[:n * c * b * b].view(n, b, c, b)
        return out.copy_(blocks.transpose(1, 2)).view(n, b, c * b)


def _token_major(work: torch.Tensor, schedule: Schedule, n_blocks: int) -> torch.Tensor:
    """Work buffer [m, T, b] in the schedule's order -> [T, n_blocks * b], zeros at the empty blocks."""
    T, b = work.shape[1], work.shape[2]
    out = work.new_empty(T, n_blocks * b)
    out3 = out.view(T, n_blocks, b)
    out3.index_fill_(1, schedule.empty, 0)
    out3.index_copy_(1, schedule.order, work.transpose(0, 1))
    return out


def forward(x: torch.Tensor, w: torch.Tensor, plan: CpuPlan) -> tuple[torch.Tensor, torch.Tensor]:
    """x [T, in] @ W -> (y [T, out], x saved for the backward)."""
    x = x.contiguous()
    T, b, sched = x.shape[0], plan.block, plan.by_col
    if T == 0:
        return x.new_zeros(0, plan.out_blocks * b), x
    if _uses_compiled(plan, x.dtype):
        return _compiled_mm(x, w, plan, forward=True), x
    if _uses_bsr(plan, x.dtype, forward_tokens=T):
        return _bsr_product(plan, w, x, forward=True), x
    x3 = x.view(T, plan.in_blocks, b)
    work = x.new_empty(sched.order.numel(), T, b)
    scratch = _Scratch(sched, T, b, x, backward=False)
    for g in sched.groups:
        for s, e, t, u in scratch.tiles(g):
            stacked = scratch.weights_of(w, g, s, e).view(e - s, g.count * b, b)  # W[i_1, j] ; W[i_2, j] ; ...
            torch.bmm(scratch.gather(x3, g, s, e, t, u), stacked, out=work[g.offset + s:g.offset + e, t:u])
    return _token_major(work, sched, plan.out_blocks), x


def backward(dy: torch.Tensor, x: torch.Tensor, w: torch.Tensor, plan: CpuPlan, need_dx: bool,
             need_dw: bool) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """dy [T, out] -> (dx [T, in], dw [nnz, b, b]); None for a gradient not needed."""
    dy = dy.contiguous()
    T, b, sched = dy.shape[0], plan.block, plan.by_row
    if T == 0:
        return dy.new_zeros(0, plan.in_blocks * b) if need_dx else None, torch.zeros_like(w) if need_dw else None
    if _uses_compiled(plan, dy.dtype):
        x = x.contiguous()
        return (_compiled_mm(dy, w, plan, forward=False) if need_dx else None,
                _compiled_dw(x, dy, plan) if need_dw else None)
    dx = None
    if need_dx and _uses_bsr(plan, dy.dtype):
        dx, need_dx = _bsr_product(plan, w, dy, forward=False), False
    if not (need_dx or need_dw):
        return dx, None
    dy3, x3 = dy.view(T, plan.out_blocks, b), x.view(T, plan.in_blocks, b)
    work = dy.new_empty(sched.order.numel(), T, b) if need_dx else None
    dw = w.new_empty(plan.nnz + 1, b, b) if need_dw else None  # the last block takes the padding's products
    scratch = _Scratch(sched, T, b, dy, backward=True)
    for g in sched.groups:
        c = g.count
        for s, e, t, u in scratch.tiles(g):
            n = e - s
            gathered = scratch.gather(dy3, g, s, e, t, u)  # [n, tokens, c*b]: the dy blocks each row feeds
            if need_dx:
                side = scratch.side_by_side(scratch.weights_of(w, g, s, e))  # [W[i, j_1] | W[i, j_2] | ...]
                torch.bmm(gathered, side.transpose(1, 2), out=work[g.offset + s:g.offset + e, t:u])
            if need_dw:
                xi = x3[t:u].index_select(1, g.dst[s:e]).permute(1, 2, 0)  # [n, b, tokens]
                sums = scratch.sums[:n * b * c * b].view(n, b, c * b)  # row i's blocks side by side
                if t == 0:
                    torch.bmm(xi, gathered, out=sums)
                else:
                    sums.baddbmm_(xi, gathered)
                if u == T:
                    blocks = scratch.weights[:n * c]
                    blocks.view(n, c, b, b).copy_(sums.view(n, b, c, b).transpose(1, 2))
                    dw.index_copy_(0, g.wdst[s * c:e * c], blocks)
    if need_dx:
        dx = _token_major(work, sched, plan.in_blocks)
    return dx, dw[:plan.nnz] if need_dw else None
