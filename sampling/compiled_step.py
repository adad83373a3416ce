"""A whole decoding step in one call: C code (sampling/compiled_step.c), compiled once per machine.

At batch 1 on a CPU a step of the shipped models is about 80 small operations; through PyTorch
each costs microseconds of dispatch, and together they cost as much as reading the weights.
The compiled step does the same maths (embedding, every layer's norm, qkv, cache write, attention
over the pattern's cache rows, projection, feed-forward, final norm and head) in one call, on all
threads in lockstep (or, when sampling at least two rows a thread, each thread alone on its own rows,
with the same logits), with each weight matrix packed so that a tile of 16 outputs streams
contiguously, in bfloat16 where every weight of the matrix is a bfloat16 number (a model stored in
bfloat16, like the shipped image64): the same values, widened in registers, from half the bytes. It
reads and writes the same caches as the PyTorch step (sampling/kv_cache.py; float32 or bfloat16), so a prompt
prefilled by the parallel forward pass continues in C.

Building and loading (:func:`library`): kernels/native.py builds the library once per machine into this
user's private cache folder (never loading anything from a shared folder). The app builds it at start-up
(:func:`prepare`). Without a working compiler, or with ``STS_FUSED_STEP=0`` in the environment, there is
no library and the sampler uses the PyTorch step.
"""

from __future__ import annotations

import ctypes
import os
import statistics
import time
import weakref
from functools import lru_cache
from pathlib import Path

import torch

from kernels import All, Fixed, Local, Strided, native
from models.model import SparseTransformer

from .kv_cache import FixedCache, LayerCache
from .options import SamplingOptions
from .step import DecodeStep

SOURCE = Path(__file__).with_name("compiled_step.c")
TILE = 16  # outputs per packed weight tile (compiled_step.c)
MAX_THREADS = 64  # compiled_step.c: the partial results combined per head
MAX_HEADS = 64  # compiled_step.c: Layer.lo
PATTERNS = (All, Local, Strided, Fixed)  # the patterns compiled_step.c's cache_rows knows
# rows_per_pass="auto": the grouping (how many sequences step together, on all threads or on the calling thread
# alone) is measured, not fixed. One pass of all rows reads each weight once a step, but every sequence brings its
# own caches into the CPU's caches (an AMD VM (AVX2) ran batches of 8 12-50% faster as 4 passes of 2, an Intel VM
# with 480 MB of L3 1.4-2.3x slower). Threads that meet at every phase of a step lose when other work holds the
# cores: image64 at batch 1 beside a 2-thread training run on 2 cores ran 944-1,223 tokens/s on 2 threads and
# 1,920-2,431 on one. Each candidate samples TUNE_STEPS positions of the real work in each of TUNE_ROUNDS rounds
# after TUNE_STEPS untimed ones, and its median round counts (a new step's first positions ran up to 6x slower, in
# a fresh process beyond the untimed ones: one stalled round must not decide); the calling thread alone must be
# SOLO_MARGIN times faster than all threads (the 16-step windows spread widely on a VM whose speed drifts). The
# choice holds until RETUNE_EVERY positions later, when the caches and the other work have changed.
TUNE_STEPS = 16
TUNE_ROUNDS = 3
SOLO_MARGIN = 1.2
RETUNE_EVERY = 4096
_P = ctypes.c_void_p


_status = {"path": None, "error": "", "note": ""}  # what the last library() did (see status())


@lru_cache(maxsize=1)
def library() -> ctypes.CDLL | None:
    """The compiled step for this machine (built on first use, then reused from the cache folder), or None
    where it cannot be (:func:`status` says why)."""
    _status.update(path=None, error="", note="")
    if os.environ.get("STS_FUSED_STEP", "1") == "0":
        _status["error"] = "it is turned off (STS_FUSED_STEP=0)"
        return None
    try:
        path, _status["note"] = native.find_or_build(SOURCE)
        lib = ctypes.CDLL(str(path))
    except (OSError, ValueError) as e:  # no compiler, a failed build, a library that does not load here
        _status["error"] = f"it could not be built ({e}; install a C compiler, or name one in $CC)"
        return None
    _status["path"] = path
    lib.st_new.restype = _P
    lib.st_new.argtypes = [ctypes.c_int] * 8 + [_P] * 7
    lib.st_layer.restype = None
    lib.st_layer.argtypes = [_P, ctypes.c_int, ctypes.c_int, _P, _P] + [ctypes.c_int] * 4 + [_P, _P]
    lib.st_sparse.restype = None
    lib.st_sparse.argtypes = [_P, ctypes.c_int, ctypes.c_int, _P, ctypes.c_int, _P, _P]
    lib.st_half.restype = None
    lib.st_half.argtypes = [_P, ctypes.c_int, ctypes.c_int, _P]
    lib.st_lag.restype = None
    lib.st_lag.argtypes = [_P, ctypes.c_int, _P, _P]
    lib.st_start.restype = ctypes.c_int
    lib.st_start.argtypes = [_P]
    lib.st_step.restype = ctypes.c_int
    lib.st_step.argtypes = [_P, ctypes.c_int, _P, ctypes.c_int64, _P]
    lib.st_sample.restype = ctypes.c_int
    lib.st_sample.argtypes = ([_P, _P, ctypes.c_int64, _P, ctypes.c_int64, ctypes.c_float, ctypes.c_int,
                              ctypes.c_float] + [ctypes.c_int] * 5)
    lib.st_free.restype = None
    lib.st_free.argtypes = [_P]
    return lib


def prepare() -> str:
    """Build (or find) the library now, e.g. at an app's start-up; one line saying what is ready."""
    t0 = time.perf_counter()
    lib = library()
    if lib is None:
        return f"compiled decoding step unavailable: {_status['error']}; the PyTorch step is used"
    note = f"; {_status['note']}" if _status["note"] else ""
    return f"compiled decoding step ready ({_status['path']}, {time.perf_counter() - t0:.1f} s{note})"


def unavailable(model: SparseTransformer, caches: list[LayerCache]) -> str | None:
    """Why the compiled step cannot run this model with these caches here (None: it can).
    The model is checked first, so that nothing is compiled for a model the step cannot run."""
    cfg = model.cfg
    param = next(model.parameters())
    if param.device.type != "cpu" or param.dtype != torch.float32:
        return f"it runs fp32 on the CPU (the model is {param.dtype} on {param.device})"
    if cfg.vocab % TILE or cfg.ff_width % TILE:
        return f"vocab and the feed-forward width must be multiples of {TILE}"
    if cfg.sparse_ff_layers and cfg.ff_block % TILE:
        return f"block-sparse feed-forward layers need blocks that are multiples of {TILE} (ff_block={cfg.ff_block})"
    if cfg.n_heads > MAX_HEADS:
        return f"at most {MAX_HEADS} heads"
    if any(type(c.pattern) not in PATTERNS for c in caches):
        return "a pattern it does not know"
    if any(c.dtype not in (torch.float32, torch.bfloat16) or c.device.type != "cpu" for c in caches):
        return "its caches must be float32 or bfloat16 on the CPU"
    if library() is None:
        return _status["error"]
    return None


def _pack(linear: torch.nn.Linear) -> tuple[torch.Tensor, torch.Tensor]:
    """weight [out, in] -> [out / 16, in, 16] (a tile of 16 outputs contiguous), bias [out]."""
    w = linear.weight.detach()
    out, inp = w.shape
    return w.view(out // TILE, TILE, inp).transpose(1, 2).contiguous(), linear.bias.detach().contiguous()


def _pack_sparse(linear: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A block-sparse linear layer (models/sparse_ff.py) as compiled_step.c's Mat reads it: (weights packed per
    output block j as [block / 16, listed * block, 16] over the input blocks that feed j in increasing order,
    col_ptr [out_blocks + 1] int32, starts [nnz] int32: each listed block's first input)."""
    mm, w = linear.mm, linear.weight.detach()
    b = mm.block
    order = torch.argsort(mm.cols * mm.in_blocks + mm.rows)  # by output block, then input block
    packed = w[order].view(-1, b, b // TILE, TILE)  # [nnz, in, tile, 16]
    counts = torch.bincount(mm.cols, minlength=mm.out_blocks)
    parts = [p.permute(2, 0, 1, 3).reshape(b // TILE, -1, TILE) for p in packed.split(counts.tolist())]
    col_ptr = torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)]).to(torch.int32)
    starts = (mm.rows[order] * b).to(torch.int32)
    return torch.cat([p.flatten() for p in parts]).contiguous(), col_ptr.contiguous(), starts.contiguous()


def _as_bf16(packed: torch.Tensor) -> torch.Tensor | None:
    """The packed float32 weights in bfloat16 when every value is a bfloat16 number (the same numbers in half the
    bytes: a model stored in bfloat16 holds such weights), else None. Each tile's rows i and i + 1 (i even) are
    interleaved, lane by lane, as compiled_step.c's ldh2 reads them (every tile has an even number of rows: d_model
    is a multiple of the head dim, 32, 64 or 128, and the feed-forward width and sparse blocks of 16)."""
    half = packed.to(torch.bfloat16)
    if not torch.equal(half.float(), packed):
        return None
    return half.view(-1, 2, TILE).transpose(1, 2).contiguous()


class CompiledStep(DecodeStep):
    """The decoding step in C for one model, one batch and its caches (see the module notes).

    threads: default torch's thread count, at most d_model / 16 (the tiles of the smallest matrix).
    rows_per_pass: how many sequences :meth:`sample` steps together, or "auto" (the default: measured
    on the sampling itself, see TUNE_STEPS, together with whether the calling thread runs them alone); the
    weights are read once a step for all of them, but each brings its own cache into the CPU's caches. A pass
    of at least two rows a thread is split between the threads, each stepping its own rows (and reading every
    weight) without waiting for the others.
    bf16_weights: read each weight matrix whose every value is a bfloat16 number (all of them, for a model
    stored in bfloat16) from a bfloat16 copy, widened to float32 in registers: the same logits, bit for bit,
    from half the weight bytes. False: float32 copies. ``weight_bytes``: the matrix bytes one step reads (the lag
    inputs' float32 [K, d] among them).
    """

    def __init__(self, model: SparseTransformer, caches: list[LayerCache], pos_emb: torch.Tensor,
                 threads: int | None = None, rows_per_pass: int | str = "auto", bf16_weights: bool = True):
        reason = unavailable(model, caches)
        if reason:
            raise ValueError(f"the compiled decoding step is not available: {reason}")
        lib, cfg, B = library(), model.cfg, caches[0].batch
        if threads is None:  # more threads than the smallest matrix has tiles would wait at every barrier
            threads = min(torch.get_num_threads(), cfg.d_model // TILE)
        threads = max(1, min(MAX_THREADS, threads))
        self.batch, self.vocab, self.seq_len = B, cfg.vocab, caches[0].seq_len
        if rows_per_pass != "auto" and (isinstance(rows_per_pass, bool) or not isinstance(rows_per_pass, int)
                                        or rows_per_pass < 1):
            raise ValueError(f'rows_per_pass must be "auto" or an integer >= 1, got {rows_per_pass!r}')
        self.rows_per_pass = rows_per_pass
        if not isinstance(bf16_weights, bool):
            raise ValueError(f"bf16_weights must be True or False, got {bf16_weights!r}")
        self.tuned_rows, self.tuned_solo = B, False  # "auto": the grouping chosen by the last measurement
        self._tune_at = 0  # "auto": the position from which the candidates run again
        d = lambda t: t.detach().contiguous()  # noqa: E731
        head_w, head_b = _pack(model.head)
        keep = [d(model.tok_emb.weight), d(model.start), pos_emb.contiguous(), d(model.norm.weight),
                d(model.norm.bias), head_w, head_b]
        max_keys = max(c.slots.keys for c in caches)
        handle = lib.st_new(B, cfg.d_model, cfg.n_heads, cfg.ff_width, cfg.vocab, cfg.n_layers,
                            threads, max_keys, *(t.data_ptr() for t in keep))
        if not handle:
            raise MemoryError("the compiled decoding step could not allocate its buffers")
        self._finalizer = weakref.finalize(self, lib.st_free, handle)
        self.weight_bytes = 0
        if cfg.lag_inputs:
            lag = [d(model.lag.t()), d(model.token_value)]  # [K, d], [V]
            keep += lag
            lib.st_lag(handle, cfg.lag_inputs, *(t.data_ptr() for t in lag))
            self.weight_bytes += lag[0].nbytes
        matrices = [(-1, 0, head_w)]  # (layer, which, packed float32 weights) of every matrix, -1: the head
        for i, (block, cache) in enumerate(zip(model.blocks, caches, strict=True)):
            sparse = i in cfg.sparse_ff_layers
            ff = [(d(m.weight), d(m.bias)) if sparse else _pack(m) for m in (block.ff.fc, block.ff.proj)]
            weights = [d(block.norm1.weight), d(block.norm1.bias), *_pack(block.attn.qkv), *_pack(block.attn.proj),
                       d(block.norm2.weight), d(block.norm2.bias), *ff[0], *ff[1]]
            keep += weights
            pointers = (_P * len(weights))(*(w.data_ptr() for w in weights))
            fixed = isinstance(cache, FixedCache)
            lo = (ctypes.c_int * len(cache.lo))(*cache.lo) if fixed else None  # first summary column per head
            slots = cache.slots
            lib.st_layer(handle, i, cache.pattern.code, cache.kv.data_ptr(),
                         cache.summaries.data_ptr() if fixed else None, int(cache.dtype == torch.bfloat16),
                         slots.slots, slots.rows, slots.summary, lo, pointers)
            matrices += [(i, 0, weights[2]), (i, 1, weights[4]), (i, 2, weights[8]), (i, 3, weights[10])]
            for which, m in enumerate((block.ff.fc, block.ff.proj) if sparse else ()):
                packed = _pack_sparse(m)  # the dense-layout pointers given above are replaced
                keep += packed
                matrices[-2 + which] = (i, 2 + which, packed[0])
                lib.st_sparse(handle, i, which, *(t.data_ptr() for t in packed[:1]), cfg.ff_block,
                              *(t.data_ptr() for t in packed[1:]))
        replaced = set()
        for layer, which, packed in matrices:
            half = _as_bf16(packed) if bf16_weights else None
            if half is not None:
                keep.append(half)
                replaced.add(id(packed))
                lib.st_half(handle, layer, which, half.data_ptr())
            self.weight_bytes += (packed if half is None else half).nbytes
        keep = [t for t in keep if id(t) not in replaced]  # the float32 copies the step no longer reads
        keep += [t for c in caches for t in c.tensors()]
        self._keep, self._lib, self._handle = keep, lib, handle
        self.threads = lib.st_start(handle)  # fewer than asked if a worker could not start

    @property
    def description(self) -> str:
        return (f"compiled C step (sampling/compiled_step.c), {self.threads} threads, rows per pass "
                f"{self.tuned_rows}{' (the calling thread alone)' if self.tuned_solo else ''}, "
                f"{self.weight_bytes / 1e6:.1f} MB of weights")

    def __call__(self, tokens: torch.Tensor, pos: int) -> torch.Tensor:
        """Logits [B, V] (float32) of position ``pos``; tokens [B, >= pos] int64: the sequences so far (see
        DecodeStep)."""
        if not isinstance(pos, int) or not 0 <= pos < self.seq_len:
            raise ValueError(f"pos must be an integer in [0, {self.seq_len}), got {pos!r}")
        if not isinstance(tokens, torch.Tensor) or tokens.dim() != 2 or tokens.shape[0] != self.batch \
                or tokens.shape[1] < pos:
            desc = tuple(tokens.shape) if isinstance(tokens, torch.Tensor) else type(tokens).__name__
            raise ValueError(f"tokens must be a tensor [{self.batch}, >= {pos}] (the sequences so far), got {desc}")
        tokens = tokens.to("cpu", torch.int64).contiguous()
        logits = torch.empty(self.batch, self.vocab)
        prev = tokens[:, pos - 1] if pos else None
        bad = self._lib.st_step(self._handle, pos, None if prev is None else prev.data_ptr(),
                                tokens.stride(0), logits.data_ptr())
        if bad:
            raise ValueError(f"the tokens before position {pos} must be in [0, {self.vocab})")
        return logits

    def sample(self, tokens: torch.Tensor, uniforms: torch.Tensor, options: SamplingOptions, start: int,
               stop: int) -> None:
        """Sample tokens[:, start:stop] in place (see DecodeStep.sample). Every step and draw runs in C without
        returning to Python: the inverse CDF at uniforms[:, pos] of softmax(logits / temperature) filtered by
        top-k and top-p (temperature 0: argmax), the rule of sampling.options.choose_tokens (a top-p cut can
        differ where tokens are exactly as likely, or a sum lands within rounding of the cut).
        tokens [B, N] int64 and uniforms [B, N] float32 on the CPU, rows contiguous; tokens[:, :start]
        are the tokens before start. The rows run ``rows_per_pass`` at a time, each group through all the
        positions before the next ("auto": see TUNE_STEPS; each group on all threads or on the calling thread
        alone). The tokens do not depend on the grouping."""
        B = self.batch
        for name, t, dtype in (("tokens", tokens, torch.int64), ("uniforms", uniforms, torch.float32)):
            if t.dtype != dtype or t.device.type != "cpu" or t.dim() != 2 or t.shape[0] != B or t.stride(1) != 1:
                raise ValueError(f"{name} must be a CPU {dtype} tensor [{B}, N] with contiguous rows, got "
                                 f"{t.dtype} {tuple(t.shape)} on {t.device}")
        if not 0 <= start <= stop <= min(self.seq_len, tokens.shape[1], uniforms.shape[1]):
            raise ValueError(f"positions [{start}, {stop}) must lie in the cache ({self.seq_len}) and the tensors")
        if self.rows_per_pass != "auto":
            self._sample_rows(tokens, uniforms, options, start, stop, self.rows_per_pass)
            return
        candidates, needed = self._groupings(), self.tuning_positions
        pos = start
        while pos < stop:
            if needed and pos >= self._tune_at and stop - pos >= needed:
                self._sample_rows(tokens, uniforms, options, pos, pos + TUNE_STEPS, *candidates[0])  # warm, untimed
                pos += TUNE_STEPS
                rounds: dict[tuple[int, bool], list[float]] = {grouping: [] for grouping in candidates}
                for grouping in candidates * TUNE_ROUNDS:
                    t0 = time.perf_counter()
                    self._sample_rows(tokens, uniforms, options, pos, pos + TUNE_STEPS, *grouping)
                    rounds[grouping].append(time.perf_counter() - t0)
                    pos += TUNE_STEPS
                # each grouping's median round (one stalled round does not decide); the calling thread alone
                # must be clearly faster
                seconds = {grouping: statistics.median(times) * (SOLO_MARGIN if grouping[1] else 1)
                           for grouping, times in rounds.items()}
                self.tuned_rows, self.tuned_solo = min(candidates, key=seconds.__getitem__)
                self._tune_at = pos + RETUNE_EVERY
            end = min(stop, self._tune_at) if self._tune_at > pos else stop
            self._sample_rows(tokens, uniforms, options, pos, end, self.tuned_rows, self.tuned_solo)
            pos = end

    def _groupings(self) -> list[tuple[int, bool]]:
        """"auto"'s candidates: (rows a pass: 2, 4, .. and all, on the calling thread alone) pairs."""
        rows = sorted({min(2**k, self.batch) for k in range(1, self.batch.bit_length() + 1)})
        return [(r, solo) for solo in ((False, True) if self.threads > 1 else (False,)) for r in rows]

    @property
    def tuning_positions(self) -> int:
        """The positions one "auto" measurement samples (untimed, then TUNE_ROUNDS rounds); 0: nothing to choose."""
        n = len(self._groupings())
        return (1 + TUNE_ROUNDS * n) * TUNE_STEPS if n > 1 else 0

    def _sample_rows(self, tokens: torch.Tensor, uniforms: torch.Tensor, options: SamplingOptions, start: int,
                     stop: int, rows: int, solo: bool = False) -> None:
        """Positions [start, stop) of every row, ``rows`` rows at a time, on all threads or (solo) on the calling
        thread alone (arguments checked by sample)."""
        top_k = min(options.top_k or 0, self.vocab)  # vocab or more: off, as 0
        rule = (float(options.temperature), top_k, 1.0 if options.top_p is None else float(options.top_p))
        for row0 in range(0, self.batch, rows):
            bad = self._lib.st_sample(self._handle, tokens.data_ptr(), tokens.stride(0), uniforms.data_ptr(),
                                      uniforms.stride(0), *rule, start, stop, row0, min(rows, self.batch - row0),
                                      int(solo))
            if bad:
                raise ValueError(f"tokens before position {start} must be in [0, {self.vocab})")

    def close(self) -> None:
        """Stop the worker threads and free the buffers (also done when the object is collected)."""
        self._finalizer()
