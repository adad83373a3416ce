"""The attention patterns of the Sparse Transformer, one object each: the single definition of a pattern.

A pattern says which keys j a query i may read (always j <= i). Each object holds everything the rest
of the code needs to know about its pattern:

  ``allowed(i, j, head)``  the element predicate (torch, broadcasting): the definition itself;
  ``first_key_block`` / ``full_in_band`` / ``extra_key_blocks``  its block lists (used by layout.py);
  ``decode_slots(seq_len)``  what a decoding cache keeps for it (used by sampling.kv_cache and the
                             compiled step); ``keys_read(pos)`` how many keys a query at pos reads;
  ``code``                 the kind number that the Triton kernel and the compiled step branch on.

  all      j <= i                                           dense causal (tests, comparison)
  local    i - window <= j <= i                             the previous ``window`` positions
  strided  j <= i and (i - j) % stride == 0                 every ``stride``-th position back
  fixed    j <= i and (j // stride == i // stride           own ``stride``-block, plus the last ``summary``
           or j % stride in the head's summary columns)     positions of every block

A Sparse Transformer interleaves ``local`` and ``strided`` layers (one pattern per layer).
Adding a pattern touches this file (a new class and its entry in PATTERNS), the Triton kernel's
predicate (kernels/triton_attention.py ``_allowed``) and the compiled decoding step's cache reader
(sampling/compiled_step.c ``cache_rows``), plus a decoding cache class for its ``decode_slots``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch


def check_int(name: str, value: object, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


@dataclass(frozen=True)
class DecodeSlots:
    """What a decoding cache of one layer keeps, per (batch row, head): ``slots`` positions (a ring or
    the stride's columns), ``rows`` rows of them where the cache is a matrix, ``summary`` positions per
    l-block (fixed), and ``keys``, the most positions one query reads."""

    slots: int
    rows: int = 0
    summary: int = 0
    keys: int = 0


class Pattern:
    """Base of the four patterns; see the module notes. Instances are frozen dataclasses (hashable)."""

    name: ClassVar[str]
    code: ClassVar[int]  # the kind code of the Triton kernel and of the compiled decoding step
    params: ClassVar[tuple[str, ...]] = ()
    permuted: ClassVar[bool] = False  # blocks laid out in the transposed [R, l] order (see layout.py)

    window: int | None = None
    stride: int | None = None
    summary: int | None = None
    distinct_summaries: bool = False

    @classmethod
    def for_stride(cls, stride: int, summary: int, distinct_summaries: bool) -> Pattern:
        """This kind's pattern in a model of stride l = ``stride`` (local reads l back, fixed has c = summary)."""
        return cls()

    def allowed(self, i: torch.Tensor, j: torch.Tensor, head: int | torch.Tensor = 0) -> torch.Tensor:
        """May query i read key j (original positions, broadcasting)?"""
        raise NotImplementedError

    # --- block lists (kernels/layout.py) -------------------------------------------------------
    # ``lay`` is the Layout being built: its block, seq_len, rows (R of the strided view) and num_blocks.

    def first_key_block(self, lay, t_lo: np.ndarray) -> np.ndarray:
        """For query blocks starting at physical positions ``t_lo``: the first key block of the contiguous
        run of key blocks [first, query block] that they read."""
        return np.zeros_like(t_lo)

    def full_in_band(self, lay, k_lo: np.ndarray, t_hi: np.ndarray) -> np.ndarray:
        """Whether a key block starting at ``k_lo``, strictly below a query block ending at ``t_hi``, is
        read whole by every query of it (no element mask needed)."""
        return np.ones(k_lo.shape, dtype=bool)

    def extra_key_blocks(self, lay, head: int, qb: np.ndarray, t_lo: np.ndarray,
                         first: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
        """Key blocks read outside the contiguous run, as (query block, key block, full) arrays, or None."""
        return None

    # --- decoding -----------------------------------------------------------------------------

    def decode_slots(self, seq_len: int) -> DecodeSlots:
        """What a decoding cache for sequences of ``seq_len`` keeps (see DecodeSlots)."""
        raise NotImplementedError

    def keys_read(self, pos: int) -> int:
        """How many keys the query at position ``pos`` reads (per head)."""
        raise NotImplementedError


@dataclass(frozen=True)
class All(Pattern):
    name: ClassVar[str] = "all"
    code: ClassVar[int] = 0

    def allowed(self, i, j, head=0):
        return j <= i

    def decode_slots(self, seq_len):
        return DecodeSlots(slots=seq_len, keys=seq_len)

    def keys_read(self, pos):
        return pos + 1


@dataclass(frozen=True)
class Local(Pattern):
    name: ClassVar[str] = "local"
    code: ClassVar[int] = 1
    params: ClassVar[tuple[str, ...]] = ("window",)
    window: int = 1

    def __post_init__(self) -> None:
        object.__setattr__(self, "window", check_int("window", self.window, 1))

    @classmethod
    def for_stride(cls, stride, summary, distinct_summaries):
        return cls(window=stride)

    def allowed(self, i, j, head=0):
        return (j <= i) & (j >= i - self.window)

    def first_key_block(self, lay, t_lo):
        return np.maximum(t_lo - self.window, 0) // lay.block

    def full_in_band(self, lay, k_lo, t_hi):
        return k_lo >= t_hi - self.window

    def decode_slots(self, seq_len):
        ring = min(self.window + 1, seq_len)  # the last window + 1 positions
        return DecodeSlots(slots=ring, keys=ring)

    def keys_read(self, pos):
        return min(pos, self.window) + 1


@dataclass(frozen=True)
class Strided(Pattern):
    """Run on the transposed sequence: in the [R, l] view read column by column it is a dense causal
    attention inside each column, so it is truly block-sparse (OpenAI's trick)."""

    name: ClassVar[str] = "strided"
    code: ClassVar[int] = 2
    params: ClassVar[tuple[str, ...]] = ("stride",)
    permuted: ClassVar[bool] = True
    stride: int = 1

    def __post_init__(self) -> None:
        object.__setattr__(self, "stride", check_int("stride", self.stride, 1))

    @classmethod
    def for_stride(cls, stride, summary, distinct_summaries):
        return cls(stride=stride)

    def allowed(self, i, j, head=0):
        return (j <= i) & ((i - j) % self.stride == 0)

    def first_key_block(self, lay, t_lo):
        seg = t_lo // lay.rows  # column of the block's first row
        # a block starting on the last row of a column that the sequence does not reach
        # (padding) needs nothing from that column
        seg += (t_lo % lay.rows == lay.rows - 1) & (seg >= lay.seq_len - (lay.rows - 1) * self.stride)
        return seg * lay.rows // lay.block

    def full_in_band(self, lay, k_lo, t_hi):
        return k_lo // lay.rows == t_hi // lay.rows

    def decode_slots(self, seq_len):
        rows = -(-seq_len // self.stride)  # the cache is [stride, rows]: a query reads its column
        return DecodeSlots(slots=self.stride, rows=rows, keys=rows)

    def keys_read(self, pos):
        return pos // self.stride + 1


@dataclass(frozen=True)
class Fixed(Pattern):
    """With ``distinct_summaries`` head h reads the summary sub-block k = h % (stride // summary):
    columns [l - (k+1) c, l - k c) of every l-block."""

    name: ClassVar[str] = "fixed"
    code: ClassVar[int] = 3
    params: ClassVar[tuple[str, ...]] = ("stride", "summary")
    stride: int = 1
    summary: int = 1
    distinct_summaries: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "stride", check_int("stride", self.stride, 1))
        object.__setattr__(self, "summary", check_int("summary", self.summary, 1))
        if self.summary > self.stride:
            raise ValueError(f"summary must be <= stride ({self.stride}), got {self.summary}")

    @classmethod
    def for_stride(cls, stride, summary, distinct_summaries):
        return cls(stride=stride, summary=summary, distinct_summaries=distinct_summaries)

    @property
    def subblocks(self) -> int:
        """How many distinct summary sub-blocks the heads cycle through (1: all heads share one)."""
        return self.stride // self.summary if self.distinct_summaries else 1

    def summary_range(self, head: int | torch.Tensor):
        """The column offsets [lo, hi) within each l-block that ``head`` reads (ints, or tensors like ``head``)."""
        hi = self.stride - (head % self.subblocks) * self.summary
        return hi - self.summary, hi

    def allowed(self, i, j, head=0):
        lo, hi = self.summary_range(head)
        col = j % self.stride
        return (j <= i) & ((j // self.stride == i // self.stride) | ((col >= lo) & (col < hi)))

    def first_key_block(self, lay, t_lo):
        return (t_lo // self.stride) * self.stride // lay.block

    def full_in_band(self, lay, k_lo, t_hi):
        return k_lo // self.stride == t_hi // self.stride

    def extra_key_blocks(self, lay, head, qb, t_lo, first):
        """The summary blocks of the l-blocks before each query block's own, not already in its run."""
        l, b = self.stride, lay.block
        lo, hi = self.summary_range(head)
        # sorted unique key blocks holding summary positions, and whether each is all summary
        m = np.arange(-(-lay.seq_len // l), dtype=np.int64)
        a, e = (m * l + lo) // b, (m * l + hi - 1) // b
        counts = e - a + 1
        kb = np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts) + np.repeat(a, counts)
        kb = np.unique(kb[kb < lay.num_blocks])
        k_lo, k_end = kb * b, kb * b + b - 1
        full = (k_lo // l == k_end // l) & (k_lo % l >= lo) & (k_end % l < hi)
        # the first l-block m whose summary range [m l + lo, m l + hi) meets each of them
        first_m = np.maximum(0, -(-(kb * b - hi + 1) // l))
        # each query block reads a prefix of them
        take = np.minimum(np.searchsorted(first_m, t_lo // l, "left"), np.searchsorted(kb, first, "left"))
        pos = np.arange(take.sum()) - np.repeat(np.cumsum(take) - take, take)
        return np.repeat(qb, take), kb[pos], full[pos]

    def decode_slots(self, seq_len):
        rows = -(-seq_len // self.stride)  # a ring of the own l-block plus ``summary`` positions per l-block
        return DecodeSlots(slots=self.stride, rows=rows, summary=self.summary, keys=rows * self.summary + self.stride)

    def keys_read(self, pos):
        return (pos // self.stride) * self.summary + pos % self.stride + 1


PATTERNS: dict[str, type[Pattern]] = {p.name: p for p in (All, Local, Strided, Fixed)}
KINDS = tuple(PATTERNS)


def make_pattern(kind: str, window: int | None = None, stride: int | None = None, summary: int | None = None,
                 distinct_summaries: bool = False) -> Pattern:
    """The pattern ``kind`` with its parameters, each checked (a ValueError names what is wrong)."""
    if kind not in PATTERNS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    cls = PATTERNS[kind]
    given = {"window": window, "stride": stride, "summary": summary}
    for name, value in given.items():
        if name in cls.params and value is None:
            raise ValueError(f"kind={kind!r} needs {name}=")
        if name not in cls.params and value is not None:
            raise ValueError(f"{name}= is not used by kind={kind!r} (it takes {cls.params or 'no parameters'})")
    if distinct_summaries and kind != "fixed":
        raise ValueError("distinct_summaries=True is only meaningful for kind='fixed'")
    kw = {name: given[name] for name in cls.params}
    return cls(**kw, distinct_summaries=bool(distinct_summaries)) if kind == "fixed" else cls(**kw)
