"""A whole decoding step in one call: C code (models/fused_step.c) compiled on first use.

At batch 1 on a CPU a step of the shipped models is about 80 small operations; through PyTorch
each costs microseconds of dispatch, and together they cost as much as reading the weights.
The C step does the same maths (embedding, every layer's norm, qkv, cache write, attention over
the pattern's cache rows, projection, feed-forward, final norm and head) in one call, on all
threads in lockstep, with each weight matrix packed so that a tile of 16 outputs streams
contiguously. It reads and writes the same caches as the PyTorch step (models.kv_cache), so a
prompt prefilled by the parallel forward pass continues in C.

The library is compiled once per source, compiler and CPU with the system's C compiler (``$CC``,
else ``cc``) into ``$XDG_CACHE_HOME/sparse-transformer-studio`` (default ``~/.cache/...``).
Without a working compiler, or with ``STS_FUSED_STEP=0`` in the environment, :func:`library`
returns None and the decoder uses its PyTorch step.
"""

from __future__ import annotations

import ctypes
import hashlib
import math
import os
import platform
import shutil
import subprocess
import tempfile
import time
import weakref
from functools import lru_cache
from pathlib import Path

import torch

from .kv_cache import FixedCache, FullCache, LayerCache, LocalCache, StridedCache
from .model import SparseTransformer

SOURCE = Path(__file__).with_name("fused_step.c")
TILE = 16  # outputs per packed weight tile (fused_step.c)
MAX_THREADS = 64  # fused_step.c: the partial results combined per head
MAX_HEADS = 64  # fused_step.c: Layer.lo
# rows_per_pass="auto": how many sequences to step together is measured, not fixed. One pass of all rows
# reads each weight once a step, but every sequence brings its own caches into the CPU's caches: on the
# README's AMD VM (AVX2) batches of 8 ran 12-50% faster as 4 passes of 2 than as one pass of 8, on its
# Intel VM (AVX-512, 480 MB L3) 1.4-2.3x slower. Each candidate (2, 4, .. rows, and all rows)
# samples TUNE_STEPS positions of the real work, timed; the fastest runs until RETUNE_EVERY positions
# later, when the caches have grown and the candidates run again.
TUNE_STEPS = 16
RETUNE_EVERY = 4096
_KINDS = {LocalCache: 0, StridedCache: 1, FixedCache: 2, FullCache: 3}
_P = ctypes.c_void_p


def _cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "sparse-transformer-studio"


def _cpu_id() -> str:
    """What the compiled code depends on: the machine and (on Linux) the CPU's feature flags."""
    flags = ""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith(("flags", "Features"))), "")
    except OSError:
        pass
    return f"{platform.system()} {platform.machine()} {flags}"


def _compile(cc: str, out: Path) -> str | None:
    """Compile SOURCE into ``out``; None on success, else the compiler's complaint."""
    error = f"{cc} did not run"
    for arch in (["-march=native"], []):  # -march=native is not known to every compiler
        cmd = [cc, "-O3", *arch, "-std=gnu11", "-shared", "-fPIC", "-pthread", str(SOURCE), "-o", str(out), "-lm"]
        try:
            run = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        except (OSError, subprocess.TimeoutExpired) as e:
            return str(e)
        if run.returncode == 0:
            return None
        lines = run.stderr.strip().splitlines()
        error = lines[-1] if lines else f"{cc} exited with {run.returncode}"
    return error


_build_error = ""  # why the last build failed (shown by unavailable())


def _build(cc: str, name: str) -> Path | None:
    """Compile into the first writable cache folder; the library's path, or None (see _build_error)."""
    global _build_error
    for folder in (_cache_dir(), Path(tempfile.gettempdir()) / "sparse-transformer-studio"):
        try:
            folder.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(suffix=".so", dir=folder)
            os.close(fd)
        except OSError as e:
            _build_error = str(e)
            continue
        error = _compile(cc, Path(tmp))
        if error is not None:
            os.unlink(tmp)
            _build_error = f"{cc}: {error}"
            return None
        os.replace(tmp, folder / name)  # atomic: a concurrent build writes the same bytes
        return folder / name
    return None


@lru_cache(maxsize=1)
def library() -> ctypes.CDLL | None:
    """The compiled step (built on first use, then reused from the cache folder), or None where it cannot be."""
    global _build_error
    if os.environ.get("STS_FUSED_STEP", "1") == "0":
        return None
    cc = shutil.which(os.environ.get("CC", "cc"))
    if cc is None:
        _build_error = f"no C compiler ({os.environ.get('CC', 'cc')}) on the PATH"
        return None
    key = hashlib.sha256(SOURCE.read_bytes() + f"{cc} {_cpu_id()}".encode()).hexdigest()[:16]
    name = f"fused_step-{key}.so"
    folders = (_cache_dir(), Path(tempfile.gettempdir()) / "sparse-transformer-studio")
    path = next((f / name for f in folders if (f / name).exists()), None) or _build(cc, name)
    if path is None:
        return None
    try:
        lib = ctypes.CDLL(str(path))
    except OSError as e:  # e.g. a library built for another machine sharing this home folder
        _build_error = f"{path} does not load: {e}"
        return None
    lib.st_new.restype = _P
    lib.st_new.argtypes = [ctypes.c_int] * 8 + [_P] * 7
    lib.st_layer.restype = None
    lib.st_layer.argtypes = [_P, ctypes.c_int, ctypes.c_int, _P, _P, ctypes.c_int, ctypes.c_int, ctypes.c_int, _P, _P]
    lib.st_start.restype = ctypes.c_int
    lib.st_start.argtypes = [_P]
    lib.st_step.restype = ctypes.c_int
    lib.st_step.argtypes = [_P, ctypes.c_int, _P, ctypes.c_int64, _P]
    lib.st_sample.restype = ctypes.c_int
    lib.st_sample.argtypes = [_P, _P, ctypes.c_int64, _P, ctypes.c_int64, ctypes.c_float] + [ctypes.c_int] * 4
    lib.st_free.restype = None
    lib.st_free.argtypes = [_P]
    return lib


def unavailable(model: SparseTransformer, caches: list[LayerCache]) -> str | None:
    """Why the fused step cannot run this model with these caches here (None: it can).
    The model is checked first, so that nothing is compiled for a model the step cannot run."""
    cfg = model.cfg
    param = next(model.parameters())
    if param.device.type != "cpu" or param.dtype != torch.float32:
        return f"it runs fp32 on the CPU (the model is {param.dtype} on {param.device})"
    if cfg.vocab % TILE or (cfg.ff_mult * cfg.d_model) % TILE:
        return f"vocab and the feed-forward width must be multiples of {TILE}"
    if cfg.n_heads > MAX_HEADS:
        return f"at most {MAX_HEADS} heads"
    if any(type(c) not in _KINDS for c in caches):
        return "a cache kind it does not know"
    if library() is None:
        return ("it is turned off (STS_FUSED_STEP=0)" if os.environ.get("STS_FUSED_STEP") == "0"
                else f"it could not be built ({_build_error}; install a C compiler, or name one in $CC)")
    return None


def _pack(linear: torch.nn.Linear) -> tuple[torch.Tensor, torch.Tensor]:
    """weight [out, in] -> [out / 16, in, 16] (a tile of 16 outputs contiguous), bias [out]."""
    w = linear.weight.detach()
    out, inp = w.shape
    return w.view(out // TILE, TILE, inp).transpose(1, 2).contiguous(), linear.bias.detach().contiguous()


class FusedStep:
    """``self(prev, pos)`` -> logits [B, V] for one model, one batch and its caches (see the module notes).

    threads: default torch's thread count, at most d_model / 16 (the tiles of the smallest matrix).
    rows_per_pass: how many sequences :meth:`sample` steps together, or "auto" (the default: measured
    on the sampling itself, see TUNE_STEPS); the weights are read once a step for all of them, but each
    brings its own cache into the CPU's caches.
    """

    def __init__(self, model: SparseTransformer, caches: list[LayerCache], pos_emb: torch.Tensor,
                 threads: int | None = None, rows_per_pass: int | str = "auto"):
        reason = unavailable(model, caches)
        if reason:
            raise ValueError(f"the fused decoding step is not available: {reason}")
        lib, cfg, B = library(), model.cfg, caches[0].batch
        if threads is None:  # more threads than the smallest matrix has tiles would wait at every barrier
            threads = min(torch.get_num_threads(), cfg.d_model // TILE)
        threads = max(1, min(MAX_THREADS, threads))
        self.batch, self.vocab, self.seq_len = B, cfg.vocab, caches[0].seq_len
        if rows_per_pass != "auto" and (isinstance(rows_per_pass, bool) or not isinstance(rows_per_pass, int)
                                        or rows_per_pass < 1):
            raise ValueError(f'rows_per_pass must be "auto" or an integer >= 1, got {rows_per_pass!r}')
        self.rows_per_pass = rows_per_pass
        self.tuned_rows = B  # "auto": the rows per pass chosen by the last measurement
        self._tune_at = 0  # "auto": the position from which the candidates run again
        d = lambda t: t.detach().contiguous()  # noqa: E731
        head_w, head_b = _pack(model.head)
        keep = [d(model.tok_emb.weight), d(model.start), pos_emb.contiguous(), d(model.norm.weight),
                d(model.norm.bias), head_w, head_b]
        geometry = [self._geometry(c) for c in caches]
        max_keys = max(g[4] for g in geometry)
        handle = lib.st_new(B, cfg.d_model, cfg.n_heads, cfg.ff_mult * cfg.d_model, cfg.vocab, cfg.n_layers,
                            threads, max_keys, *(t.data_ptr() for t in keep))
        if not handle:
            raise MemoryError("the fused decoding step could not allocate its buffers")
        self._finalizer = weakref.finalize(self, lib.st_free, handle)
        for i, (block, cache, (slots, rows, summary, lo, _)) in enumerate(zip(model.blocks, caches, geometry,
                                                                               strict=True)):
            weights = [d(block.norm1.weight), d(block.norm1.bias), *_pack(block.attn.qkv), *_pack(block.attn.proj),
                       d(block.norm2.weight), d(block.norm2.bias), *_pack(block.ff.fc), *_pack(block.ff.proj)]
            keep += weights
            pointers = (_P * len(weights))(*(w.data_ptr() for w in weights))
            lo = (ctypes.c_int * len(lo))(*lo) if lo else None
            summaries = cache.summaries.data_ptr() if isinstance(cache, FixedCache) else None
            lib.st_layer(handle, i, _KINDS[type(cache)], cache.kv.data_ptr(), summaries, slots, rows, summary, lo,
                         pointers)
        keep += [t for c in caches for t in c.tensors()]
        self._keep, self._lib, self._handle = keep, lib, handle
        self.threads = lib.st_start(handle)  # fewer than asked if a worker could not start

    @staticmethod
    def _geometry(cache: LayerCache) -> tuple[int, int, int, list[int], int]:
        """(slots, rows, summary, first summary column per head) as fused_step.c's Layer holds them, and
        the most keys a query of the layer reads."""
        if isinstance(cache, LocalCache):
            return cache.slots, 0, 0, [], cache.slots
        if isinstance(cache, StridedCache):
            return cache.stride, cache.rows, 0, [], cache.rows
        if isinstance(cache, FixedCache):
            return cache.stride, cache.rows, cache.summary, cache.lo, cache.rows * cache.summary + cache.stride
        return cache.seq_len, 0, 0, [], cache.seq_len

    def __call__(self, prev: torch.Tensor | None, pos: int) -> torch.Tensor:
        """Logits [B, V] (float32) of position ``pos``; prev [B] int64 are the tokens at pos - 1 (None at 0)."""
        if not 0 <= pos < self.seq_len or (prev is None) != (pos == 0):
            raise ValueError(f"pos must be in [0, {self.seq_len}) with prev given exactly when pos > 0, "
                             f"got pos={pos}, prev={'None' if prev is None else 'a tensor'}")
        if prev is not None and (prev.dtype != torch.int64 or prev.device.type != "cpu"
                                 or prev.shape != (self.batch,)):
            prev = torch.as_tensor(prev, dtype=torch.int64, device="cpu").reshape(self.batch)
        logits = torch.empty(self.batch, self.vocab)
        bad = self._lib.st_step(self._handle, pos, None if prev is None else prev.data_ptr(),
                                0 if prev is None else prev.stride(0), logits.data_ptr())
        if bad:
            raise ValueError(f"prev tokens must be in [0, {self.vocab}), got {prev.tolist()}")
        return logits

    def sample(self, tokens: torch.Tensor, uniforms: torch.Tensor, temperature: float, start: int,
               stop: int) -> None:
        """Sample tokens[:, start:stop] in place, one step per position, without returning to Python:
        the inverse CDF of softmax(logits / temperature) at uniforms[:, pos] (temperature 0: argmax),
        as models.sampler.choose_tokens without top-k / top-p. tokens [B, N] int64 and uniforms
        [B, N] float32 on the CPU, rows contiguous; tokens[:, :start] are the tokens before start.
        The rows run ``rows_per_pass`` at a time, each group through all the positions before the next
        ("auto": see TUNE_STEPS). The tokens do not depend on the grouping."""
        B = self.batch
        for name, t, dtype in (("tokens", tokens, torch.int64), ("uniforms", uniforms, torch.float32)):
            if t.dtype != dtype or t.device.type != "cpu" or t.dim() != 2 or t.shape[0] != B or t.stride(1) != 1:
                raise ValueError(f"{name} must be a CPU {dtype} tensor [{B}, N] with contiguous rows, got "
                                 f"{t.dtype} {tuple(t.shape)} on {t.device}")
        if not 0 <= start <= stop <= min(self.seq_len, tokens.shape[1], uniforms.shape[1]):
            raise ValueError(f"positions [{start}, {stop}) must lie in the cache ({self.seq_len}) and the tensors")
        if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature >= 0):
            raise ValueError(f"temperature must be a finite number >= 0, got {temperature!r}")
        if self.rows_per_pass != "auto":
            self._sample_rows(tokens, uniforms, temperature, start, stop, self.rows_per_pass)
            return
        candidates = sorted({min(2**k, B) for k in range(1, B.bit_length() + 1)})
        pos = start
        while pos < stop:
            if len(candidates) > 1 and pos >= self._tune_at and stop - pos >= TUNE_STEPS * len(candidates):
                seconds = {}
                for rows in candidates:
                    t0 = time.perf_counter()
                    self._sample_rows(tokens, uniforms, temperature, pos, pos + TUNE_STEPS, rows)
                    seconds[rows] = time.perf_counter() - t0
                    pos += TUNE_STEPS
                self.tuned_rows = min(candidates, key=seconds.__getitem__)
                self._tune_at = pos + RETUNE_EVERY
            end = min(stop, self._tune_at) if self._tune_at > pos else stop
            self._sample_rows(tokens, uniforms, temperature, pos, end, self.tuned_rows)
            pos = end

    def _sample_rows(self, tokens: torch.Tensor, uniforms: torch.Tensor, temperature: float, start: int,
                     stop: int, rows: int) -> None:
        """Positions [start, stop) of every row, ``rows`` rows at a time (arguments checked by sample)."""
        for row0 in range(0, self.batch, rows):
            bad = self._lib.st_sample(self._handle, tokens.data_ptr(), tokens.stride(0), uniforms.data_ptr(),
                                      uniforms.stride(0), float(temperature), start, stop, row0,
                                      min(rows, self.batch - row0))
            if bad:
                raise ValueError(f"tokens before position {start} must be in [0, {self.vocab})")

    def close(self) -> None:
        """Stop the worker threads and free the buffers (also done when the object is collected)."""
        self._finalizer()
