"""Block-sparse layouts for the Sparse Transformer attention patterns.

A layout says, per head and per query block, which key blocks attention reads,
and which of those are *full* (every query may see every key: no mask) or
*partial* (the element predicate must be applied). It is built in closed form,
in O(number of listed blocks) time and memory; no N x N mask is ever made.

Coordinates. Each pattern is defined on the original positions i (query) and
j (key) of a sequence of length N. Blocks live in a *physical* order, which is
the original order for every kind but ``strided``: there the sequence is
viewed as a matrix of R = ceil(N / l) rows and l columns and read column by
column (physical t = c * R + r for original i = r * l + c). In that order the
strided pattern is a dense causal attention inside each column segment of
length R, so it is truly block-sparse. The kernels map t back to i themselves;
callers never see the permutation.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from .patterns import KINDS, Pattern, check_int, make_pattern

BLOCK_SIZES = (16, 32, 64, 128)


@dataclass(frozen=True)
class BlockTable:
    """Block lists in CSR form: row r of head h lists ``index[h, offsets[h, r]:offsets[h, r + 1]]``.

    ``h`` runs over 1 head when every head shares the table, else over all heads; the
    lists are sorted. Memory is O(listed blocks + rows).
    """

    offsets: torch.Tensor  # [Ht, rows + 1] int32
    index: torch.Tensor  # [Ht, max listed over heads] int32

    @property
    def count(self) -> torch.Tensor:
        """[Ht, rows] number of blocks listed per row."""
        return self.offsets[:, 1:] - self.offsets[:, :-1]

    def row(self, h: int, r: int) -> torch.Tensor:
        return self.index[h, self.offsets[h, r]: self.offsets[h, r + 1]]

    def to(self, device: torch.device) -> BlockTable:
        return BlockTable(self.offsets.to(device), self.index.to(device))


@dataclass(eq=False)
class Layout:
    """A block-sparse attention layout; build it with :func:`make_layout`.

    Tables (``Ht`` is 1 when all heads share the pattern, else ``heads``):
      kv_partial / kv_full: for each query block, the key blocks read with / without a mask.
      q_partial / q_full: the transposed lists: for each key block, the query blocks that
        read it (used by the backward pass).
    """

    pattern: Pattern
    seq_len: int
    block: int
    heads: int
    rows: int  # strided: R = ceil(N / l), rows of the [R, l] view; else N
    kv_partial: BlockTable
    kv_full: BlockTable
    q_partial: BlockTable
    q_full: BlockTable
    _cache: dict = field(default_factory=dict, repr=False)  # device tables, CPU plan

    @property
    def kind(self) -> str:
        return self.pattern.name

    @property
    def window(self) -> int | None:
        return self.pattern.window

    @property
    def stride(self) -> int | None:
        return self.pattern.stride

    @property
    def summary(self) -> int | None:
        return self.pattern.summary

    @property
    def distinct_summaries(self) -> bool:
        return self.pattern.distinct_summaries

    @property
    def permuted(self) -> bool:
        """True when blocks are laid out in the transposed (column-major) order."""
        return self.pattern.permuted

    @property
    def physical_len(self) -> int:
        """Positions of the physical order (R * l for strided, N otherwise)."""
        return self.rows * self.stride if self.permuted else self.seq_len

    @property
    def num_blocks(self) -> int:
        """Query (= key) blocks along the padded physical sequence."""
        return -(-self.physical_len // self.block)

    @property
    def table_heads(self) -> int:
        return int(self.kv_full.offsets.shape[0])

    def summary_range(self, head: int | torch.Tensor):
        """``fixed`` only: the column offsets [lo, hi) within each l-block that ``head`` reads."""
        if self.kind != "fixed":
            raise ValueError(f"summary_range is only defined for kind='fixed', not {self.kind!r}")
        return self.pattern.summary_range(head)

    def blocks_per_head(self) -> torch.Tensor:
        """[heads] number of (query block, key block) pairs computed for each head."""
        total = self.kv_full.count.sum(1) + self.kv_partial.count.sum(1)
        return total.expand(self.heads).to(torch.int64)

    def computed_scores(self) -> int:
        """Score entries computed for one batch element, all heads (for FLOP counts)."""
        return int(self.blocks_per_head().sum()) * self.block * self.block

    def density(self) -> float:
        """Computed score entries / N^2 / heads (dense causal is about 0.5)."""
        return self.computed_scores() / (self.seq_len**2 * self.heads)

    def tables(self, device: torch.device | str) -> tuple[BlockTable, BlockTable, BlockTable, BlockTable]:
        """The four tables on ``device`` (cached)."""
        key = ("tables", str(torch.device(device)))
        if key not in self._cache:
            self._cache[key] = tuple(
                t.to(device) for t in (self.kv_full, self.kv_partial, self.q_full, self.q_partial)
            )
        return self._cache[key]

    # --- element level -------------------------------------------------------------------

    def original_index(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Physical positions -> (original positions, valid). Invalid ones map to N + t."""
        if self.permuted:
            i = (t % self.rows) * self.stride + t // self.rows
            inside = t < self.physical_len
        else:
            i, inside = t, t >= 0
        valid = inside & (i < self.seq_len)
        return torch.where(valid, i, self.seq_len + t), valid

    def allowed(self, i: torch.Tensor, j: torch.Tensor, head: int | torch.Tensor = 0) -> torch.Tensor:
        """The pattern's predicate on original positions (broadcasting): may query i read key j?"""
        return self.pattern.allowed(i, j, head)

    def dense_mask(self, head: int = 0) -> torch.Tensor:
        """[N, N] bool: what the block lists plus in-block masks let each query read.

        Expands the tables (for tests and figures; refuses N > 4096).
        """
        n, b = self.seq_len, self.block
        if n > 4096:
            raise ValueError(f"dense_mask is for small layouts (N <= 4096), got N={n}")
        h = head if self.table_heads > 1 else 0
        mask = torch.zeros(n, n, dtype=torch.bool)
        for table, full in ((self.kv_full, True), (self.kv_partial, False)):
            for qb in range(self.num_blocks):
                t_q = qb * b + torch.arange(b)
                i, valid_q = self.original_index(t_q)
                for kb in table.row(h, qb).tolist():
                    j, valid_k = self.original_index(kb * b + torch.arange(b))
                    ok = valid_q[:, None] & valid_k[None, :]
                    if not full:
                        ok &= self.allowed(i[:, None], j[None, :], head)
                    ii, jj = torch.nonzero(ok, as_tuple=True)
                    mask[i[ii], j[jj]] = True
        return mask


def make_layout(
    kind: str,
    seq_len: int,
    block: int,
    heads: int = 1,
    window: int | None = None,
    stride: int | None = None,
    summary: int | None = None,
    distinct_summaries: bool = False,
) -> Layout:
    """Build the block-sparse layout of one attention pattern (kernels/patterns.py defines them).

    kind: "all" (j <= i), "local" (i - window <= j <= i), "strided" (j <= i and
    (i - j) % stride == 0), or "fixed" (j <= i and (j // stride == i // stride or
    j % stride >= stride - summary)). With ``distinct_summaries`` head h reads the
    summary sub-block k = h % (stride // summary): offsets [l - (k+1) c, l - k c).
    Any seq_len works; padding to the block is handled inside the kernels.
    A Sparse Transformer interleaves "local" and "strided" layers (one pattern per call).
    """
    if not isinstance(kind, str) or kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    seq_len = check_int("seq_len", seq_len, 1)
    heads = check_int("heads", heads, 1)
    if isinstance(block, bool) or block not in BLOCK_SIZES:
        raise ValueError(f"block must be one of {BLOCK_SIZES}, got {block!r}")
    return layout_of(make_pattern(kind, window, stride, summary, distinct_summaries), seq_len, block, heads)


def layout_of(pattern: Pattern, seq_len: int, block: int, heads: int = 1) -> Layout:
    """The layout of ``pattern`` for sequences of ``seq_len`` in blocks of ``block`` (arguments as make_layout's)."""
    rows = -(-seq_len // pattern.stride) if pattern.permuted else seq_len
    proto = Layout(pattern, seq_len, block, heads, rows, *([None] * 4))
    n_blocks = proto.num_blocks
    head_tables = heads if pattern.distinct_summaries else 1
    per_head = [_rows_for_head(proto, h, n_blocks) for h in range(head_tables)]
    proto.kv_full = _stack([_table(qb, kb, n_blocks, full) for qb, kb, full in per_head])
    proto.kv_partial = _stack([_table(qb, kb, n_blocks, ~full) for qb, kb, full in per_head])
    proto.q_full = _stack([_table(kb, qb, n_blocks, full) for qb, kb, full in per_head])
    proto.q_partial = _stack([_table(kb, qb, n_blocks, ~full) for qb, kb, full in per_head])
    return proto


def _rows_for_head(lay: Layout, head: int, n_blocks: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """All listed (query block, key block, full) triples of one head, sorted by (qb, kb)."""
    b, pattern = lay.block, lay.pattern
    qb = np.arange(n_blocks, dtype=np.int64)
    t_lo = qb * b
    first = pattern.first_key_block(lay, t_lo)
    # contiguous part: key blocks first[qb] .. qb
    counts = qb - first + 1
    row = np.repeat(qb, counts)
    kb = np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts) + np.repeat(first, counts)
    full = (kb < row) & pattern.full_in_band(lay, kb * b, row * b + b - 1)
    extra = pattern.extra_key_blocks(lay, head, qb, t_lo, first)
    if extra is not None:
        row, kb, full = (np.concatenate([e, x]) for e, x in zip(extra, (row, kb, full), strict=True))
        order = np.lexsort((kb, row))
        row, kb, full = row[order], kb[order], full[order]
    return row, kb, full


def _table(rows: np.ndarray, cols: np.ndarray, n_rows: int, keep: np.ndarray) -> BlockTable:
    """CSR of the (row, col) pairs where ``keep``.

    The pairs come sorted by (query block, key block), so a stable sort by ``rows``
    leaves the cols of each row sorted, for either orientation of the table.
    """
    rows, cols = rows[keep], cols[keep]
    order = np.argsort(rows, kind="stable")
    offsets = np.zeros(n_rows + 1, dtype=np.int32)
    np.cumsum(np.bincount(rows, minlength=n_rows), out=offsets[1:])
    return BlockTable(torch.from_numpy(offsets)[None], torch.from_numpy(cols[order].astype(np.int32))[None])


def _stack(tables: list[BlockTable]) -> BlockTable:
    width = max(1, max(t.index.shape[1] for t in tables))
    index = [torch.nn.functional.pad(t.index, (0, width - t.index.shape[1])) for t in tables]
    return BlockTable(torch.cat([t.offsets for t in tables]), torch.cat(index))
