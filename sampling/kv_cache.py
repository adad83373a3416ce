"""Static KV caches for decoding, one per layer, holding only what the layer's pattern can still read.

Each cache is preallocated for a batch and a sequence length, so a decoding step allocates
nothing that grows. Its size comes from the pattern's ``decode_slots`` (kernels/patterns.py).
``fill(k, v, rows)`` stores the keys/values of a prompt (positions 0..P-1, from one parallel
forward pass) for some rows of the batch; ``step(pos, q, kv)`` stores position ``pos`` and returns
the attention output of its query over what the pattern lets ``pos`` read:

  local (window w):  a ring of the last w + 1 positions                 [B, 2, H, w + 1, D]
  strided (stride l): every position, as an [l, rows] matrix (column-major); a query
                     reads the contiguous start of its column           [B, 2, H, l, ceil(N/l), D]
  fixed (l, c):      a ring of the current l-block plus the c summary positions of each
                     block (per head when heads use distinct summaries) [B, 2, H, l + ceil(N/l) c, D]
  all:               every position                                     [B, 2, H, N, D]
(2: keys and values side by side.) The compiled step (sampling/compiled_step.c) reads and writes
the same tensors. A cache holds its own dtype (the decoder's default for a float32 model: bfloat16, half the
bytes a step reads): what it stores is rounded to that dtype, and attention reads it widened to the query's.

A step reaches its slots through views made once (``select``/``narrow`` on them): parsing a
Python index such as ``kv[:, :, :, c, r]`` costs microseconds, and a whole step is about a
millisecond at batch 1 on a CPU.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels import All, Fixed, Local, Pattern, Strided
from models.model import ModelConfig, check_int


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """q [B, H, 1, D] over keys/values [B, H, n, D] -> [B, H, 1, D] (SDPA: one fused call, default scale), in q's
    dtype (a cache may hold a narrower one)."""
    return F.scaled_dot_product_attention(q, k.to(q.dtype), v.to(q.dtype))


class LayerCache:
    """Keys and values side by side in one tensor ``kv`` [B, 2, H, *slots, D], so a step writes both at once.

    ``pattern`` is the layer's attention pattern and ``slots`` its DecodeSlots for ``seq_len``."""

    def __init__(self, cfg: ModelConfig, pattern: Pattern, batch: int, seq_len: int, device: torch.device,
                 dtype: torch.dtype):
        self.cfg, self.pattern, self.batch, self.seq_len = cfg, pattern, batch, seq_len
        self.slots = pattern.decode_slots(seq_len)
        self.shape = (batch, cfg.n_heads, cfg.head_dim)
        self.device, self.dtype = device, dtype
        self._allocate()

    def _allocate(self) -> None:
        """Allocate the cache's tensors (``kv`` and any others) from ``self.slots``."""
        raise NotImplementedError

    def _empty(self, *slots: int) -> torch.Tensor:
        B, H, D = self.shape
        return torch.zeros(B, 2, H, *slots, D, device=self.device, dtype=self.dtype)

    def tensors(self) -> list[torch.Tensor]:
        return [self.kv]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())

    def fill(self, k: torch.Tensor, v: torch.Tensor, rows: slice = slice(None)) -> None:
        """Store positions 0..P-1 (k, v [b, H, P, D], rounded to the cache's dtype) of the batch's ``rows`` (default
        all: b = B)."""
        self._fill(k.to(self.dtype), v.to(self.dtype), rows)

    def _fill(self, k: torch.Tensor, v: torch.Tensor, rows: slice) -> None:
        """fill, with k and v in the cache's dtype."""
        raise NotImplementedError

    def step(self, pos: int, q: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
        """Store position ``pos`` (kv [B, 2, H, D]) and attend with q [B, H, 1, D] -> [B, H, 1, D]."""
        raise NotImplementedError


class LocalCache(LayerCache):
    """A ring of the last window + 1 positions."""

    def _allocate(self):
        self.ring = self.slots.slots
        self.kv = self._empty(self.ring)
        self.k, self.v = self.kv[:, 0], self.kv[:, 1]

    def _fill(self, k, v, rows):
        P = k.shape[2]
        first = max(0, P - self.ring)
        slots = torch.arange(first, P, device=self.device) % self.ring
        self.kv[rows, 0, :, slots], self.kv[rows, 1, :, slots] = k[:, :, first:], v[:, :, first:]

    def step(self, pos, q, kv):
        self.kv.select(3, pos % self.ring).copy_(kv)
        n = min(pos + 1, self.ring)  # ring slot p holds position p until the ring wraps
        return _attend(q, self.k.narrow(2, 0, n), self.v.narrow(2, 0, n))


class StridedCache(LayerCache):
    """Stored column-major ([stride, rows]): the column a query reads is contiguous, so a step
    touches a few pages instead of one page per row (the audio model has 256 rows)."""

    def _allocate(self):
        self.stride, self.rows = self.slots.slots, self.slots.rows
        self.kv = self._empty(self.stride, self.rows)
        # per column c: (keys and values [B, 2, H, rows, D], keys [B, H, rows, D], values)
        self.columns = [(self.kv.select(3, c), self.kv[:, 0, :, c], self.kv[:, 1, :, c]) for c in range(self.stride)]

    def _fill(self, k, v, rows):
        B, H, P, D = k.shape
        full, rest = divmod(P, self.stride)  # complete rows, then the start of the next one
        for i, t in enumerate((k, v)):
            by_row = t[:, :, : full * self.stride].view(B, H, full, self.stride, D)
            self.kv[rows, i, :, :, :full] = by_row.transpose(2, 3)
            self.kv[rows, i, :, :rest, full] = t[:, :, full * self.stride:]

    def step(self, pos, q, kv):
        r, c = divmod(pos, self.stride)
        both, k, v = self.columns[c]
        both.select(3, r).copy_(kv)
        return _attend(q, k.narrow(2, 0, r + 1), v.narrow(2, 0, r + 1))


class FixedCache(LayerCache):
    """A ring of the current l-block, and the summary positions of every l-block (per head if they differ)."""

    def _allocate(self):
        self.stride, self.summary, self.rows = self.slots.slots, self.slots.summary, self.slots.rows
        self.lo = [self.pattern.summary_range(h)[0] for h in range(self.cfg.n_heads)]  # first summary column
        self.shared = len(set(self.lo)) == 1
        self.kv = self._empty(self.stride)  # ring of the current l-block
        self.k, self.v = self.kv[:, 0], self.kv[:, 1]
        self.summaries = self._empty(self.rows, self.summary)

    def tensors(self):
        return [self.kv, self.summaries]

    def _fill(self, k, v, rows):
        P = k.shape[2]
        for h, lo in enumerate(self.lo):
            hs = slice(None) if self.shared else slice(h, h + 1)
            for r in range(-(-P // self.stride)):
                cols = range(r * self.stride + lo, min(P, r * self.stride + lo + self.summary))
                if len(cols):
                    self.summaries[rows, 0, hs, r, : len(cols)] = k[:, hs, cols.start: cols.stop]
                    self.summaries[rows, 1, hs, r, : len(cols)] = v[:, hs, cols.start: cols.stop]
            if self.shared:
                break
        start = (P // self.stride) * self.stride  # the l-block the next position belongs to
        if start < P:
            self.kv[rows, 0, :, : P - start], self.kv[rows, 1, :, : P - start] = k[:, :, start:], v[:, :, start:]

    def step(self, pos, q, kv):
        r, c = divmod(pos, self.stride)
        self.kv.select(3, c).copy_(kv)
        for h, lo in enumerate(self.lo):
            if 0 <= c - lo < self.summary:
                hs = slice(None) if self.shared else h
                self.summaries[:, :, hs, r, c - lo] = kv[:, :, hs]
            if self.shared:
                break
        k, v = self.k.narrow(2, 0, c + 1), self.v.narrow(2, 0, c + 1)
        if not r:
            return _attend(q, k, v)
        B, H, D = self.shape
        k = torch.cat([self.summaries[:, 0, :, :r].reshape(B, H, -1, D), k], 2)
        v = torch.cat([self.summaries[:, 1, :, :r].reshape(B, H, -1, D), v], 2)
        return _attend(q, k, v)


class FullCache(LayerCache):
    """Every past position (the ``all`` pattern; also the dense-cache baseline of bench/sample.py)."""

    def _allocate(self):
        self.kv = self._empty(self.seq_len)
        self.k, self.v = self.kv[:, 0], self.kv[:, 1]

    def _fill(self, k, v, rows):
        P = k.shape[2]
        self.kv[rows, 0, :, :P], self.kv[rows, 1, :, :P] = k, v

    def step(self, pos, q, kv):
        self.kv.select(3, pos).copy_(kv)
        return _attend(q, self.k.narrow(2, 0, pos + 1), self.v.narrow(2, 0, pos + 1))


CACHES: dict[type[Pattern], type[LayerCache]] = {Local: LocalCache, Strided: StridedCache, Fixed: FixedCache,
                                                 All: FullCache}


def make_caches(cfg: ModelConfig, batch: int, seq_len: int | None = None, device: torch.device | str = "cpu",
                dtype: torch.dtype = torch.float32, dense: bool = False) -> list[LayerCache]:
    """One cache per layer of ``cfg`` for ``batch`` sequences of up to ``seq_len`` tokens.

    dense: every layer keeps and reads every past position (a baseline for benchmarks;
    not the model's pattern, so its samples differ).
    """
    check_int("batch", batch, 1)
    n = check_int("seq_len", cfg.seq_len if seq_len is None else seq_len, 1, cfg.seq_len)
    device = torch.device(device)
    patterns = [All() if dense else cfg.layer_pattern(layer) for layer in range(cfg.n_layers)]
    return [CACHES[type(p)](cfg, p, batch, n, device, dtype) for p in patterns]
