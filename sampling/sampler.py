"""Sampling: KV-cached incremental decoding with a seed per sample and progress reports.

The prompt is prefilled with one parallel forward pass (the block-sparse kernels), then one
token per step: each layer reads only what its pattern allows from a static cache
(sampling/kv_cache.py). The step is chosen once, when a :class:`Decoder` is set up
(:func:`make_step`): the compiled C step (sampling/compiled_step.py) where it runs (fp32 on the
CPU, a C compiler found), else the PyTorch step (sampling/step.py). Both read and write the same
caches; tests check that step-by-step logits equal the full forward's at every position, for both.

Randomness: sample b draws its uniforms from its own generator seeded with ``seeds[b]``
(one uniform per position, inverse-CDF sampling, sampling/options.py), so a sample depends on its
seed and prompt only, not on the batch it ran in.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from models.lstm import SparseLSTM
from models.model import SparseTransformer, check_int

from . import compiled_step
from .compiled_step import CompiledStep
from .kv_cache import LayerCache, make_caches
from .lstm_step import LSTMStep
from .options import SamplingOptions
from .step import DecodeStep, TorchStep

PREFILL_ROWS = 1  # sequences per parallel forward pass of Decoder.prefill
STEPS = ("auto", "pytorch", "compiled")


def make_step(model: SparseTransformer, caches: list[LayerCache], pos_emb: torch.Tensor, step: str = "auto",
              shards: int | None = None) -> DecodeStep:
    """The decoding step over ``caches``: "compiled", "pytorch", or "auto" (the compiled step where it can
    run and ``shards`` is not given, else the PyTorch step). shards: see sampling.step.TorchStep."""
    if step not in STEPS:
        raise ValueError(f"step must be one of {STEPS}, got {step!r}")
    if step == "compiled" and shards is not None:
        raise ValueError("shards split the PyTorch step's weights: pass step='pytorch' (or 'auto') with shards")
    if step == "auto":
        step = "pytorch" if shards is not None or compiled_step.unavailable(model, caches) else "compiled"
    if step == "compiled":
        return CompiledStep(model, caches, pos_emb)
    return TorchStep(model, caches, pos_emb, shards)


CACHE_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def default_cache_dtype(model_dtype: torch.dtype) -> torch.dtype:
    """What the KV caches hold by default for a model computing in ``model_dtype``: bfloat16 for a float32 or
    bfloat16 model (the keys and values rounded to bfloat16, as they are under bfloat16 autocast in training: half the
    cache bytes a step reads), else the model's own dtype."""
    return torch.bfloat16 if model_dtype in (torch.float32, torch.bfloat16) else model_dtype


def decoding_step(model: SparseTransformer | SparseLSTM) -> str:
    """Which step :func:`generate` will use for ``model`` as it is now (device, dtype), and why not the C one."""
    if isinstance(model, SparseLSTM):
        return "PyTorch LSTM step (sampling/lstm_step.py)"
    reason = compiled_step.unavailable(model, [])
    return "compiled C step (sampling/compiled_step.c)" if reason is None else f"PyTorch step ({reason})"


class Decoder:
    """Prefill and single-token steps of one model for a batch, with static KV caches.

    ``step`` is the decoding step (a DecodeStep: ``decoder.step(tokens, pos)`` -> logits [B, V]), chosen once
    by :func:`make_step` from ``step`` ("auto", "pytorch", "compiled") and ``shards``.
    dense: keep and read every past position in every layer (a baseline for benchmarks; it
    is not the model's pattern, so its samples differ).
    cache_dtype: what the caches hold (default :func:`default_cache_dtype`): bfloat16 halves the bytes a step reads
    and stores; float32 keeps the keys and values exactly as the step computes them.
    A SparseLSTM has no caches: its step (sampling/lstm_step.py) carries the recurrent state, and ``step``
    must be "auto" or "pytorch", without ``dense``, ``shards`` or ``cache_dtype``.
    """

    def __init__(self, model: SparseTransformer | SparseLSTM, batch: int, seq_len: int | None = None,
                 dense: bool = False, shards: int | None = None, step: str = "auto",
                 cache_dtype: torch.dtype | None = None):
        if not isinstance(model, (SparseTransformer, SparseLSTM)):
            raise ValueError(f"model must be a SparseTransformer or a SparseLSTM, got {type(model).__name__}")
        if step not in STEPS:  # before the caches are allocated
            raise ValueError(f"step must be one of {STEPS}, got {step!r}")
        self.model, self.cfg = model, model.cfg
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        if isinstance(model, SparseLSTM):
            if step == "compiled" or dense or shards is not None or cache_dtype is not None:
                raise ValueError("an LSTM decodes with its PyTorch step: step 'compiled', dense caches, shards and "
                                 "cache_dtype are for the Sparse Transformer")
            self.caches = []
            self.seq_len = check_int("seq_len", seq_len, 1) if seq_len is not None else model.cfg.seq_len
            self.step: DecodeStep = LSTMStep(model, batch)
            return
        if cache_dtype is None:
            cache_dtype = default_cache_dtype(self.dtype)
        elif cache_dtype not in CACHE_DTYPES:
            raise ValueError(f"cache_dtype must be one of {CACHE_DTYPES}, got {cache_dtype!r}")
        self.caches: list[LayerCache] = make_caches(self.cfg, batch, seq_len, self.device, cache_dtype, dense)
        self.seq_len = self.caches[0].seq_len
        with torch.no_grad():
            self.pos_emb = model.position_embedding(torch.arange(self.seq_len, device=self.device)).detach()
        self.step: DecodeStep = make_step(model, self.caches, self.pos_emb, step, shards)

    @property
    def cache_bytes(self) -> int:
        return sum(c.nbytes for c in self.caches)

    @torch.no_grad()
    def prefill(self, tokens: torch.Tensor) -> None:
        """Fill the caches with positions 0..P-1 of tokens [B, P]: one parallel forward pass per PREFILL_ROWS
        sequences (eight 6,144-token prompts took 7.0-7.4 s in one pass, 5.1-5.8 s in passes of two and
        4.4-6.3 s one at a time, interleaved, on a 2-core VM: a smaller pass keeps its activations in the
        CPU's caches). An LSTM's step runs the whole prompt in one pass and keeps the state."""
        if isinstance(self.step, LSTMStep):
            self.step.prefill(tokens.to(self.device))
            return
        was_training = self.model.training
        self.model.eval()
        tokens = tokens.to(self.device)
        try:
            for r0 in range(0, tokens.shape[0], PREFILL_ROWS):
                rows = slice(r0, r0 + PREFILL_ROWS)
                self.model.prefill(tokens[rows], [_CacheRows(cache, rows) for cache in self.caches])
        finally:
            self.model.train(was_training)

    def sample(self, tokens: torch.Tensor, uniforms: torch.Tensor, options: SamplingOptions, start: int,
               stop: int) -> None:
        """Sample tokens[:, start:stop] in place (tokens [B, N] int64, uniforms [B, N] float32 in [0, 1)),
        token pos drawn with uniforms[:, pos] (see DecodeStep.sample)."""
        self.step.sample(tokens, uniforms, options, start, stop)


class _CacheRows:
    """Some rows of a layer's cache, as the model's prefill fills them (``fill(k, v)``)."""

    def __init__(self, cache: LayerCache, rows: slice):
        self.cache, self.rows = cache, rows

    def fill(self, k: torch.Tensor, v: torch.Tensor) -> None:
        self.cache.fill(k, v, self.rows)


@dataclass
class Progress:
    """A report from :func:`generate`: ``tokens`` [B, done] so far (prompt included)."""

    done: int
    total: int
    tokens: torch.Tensor
    seconds: float
    finished: bool


MAX_SEED = 2**64 - 1  # the largest seed torch.Generator.manual_seed takes


def generate(model: SparseTransformer | SparseLSTM, prompt: torch.Tensor, length: int, seeds: list[int],
             options: SamplingOptions | None = None, report_every: int = 256, dense_cache: bool = False,
             step: str = "auto") -> Iterator[Progress]:
    """Sample ``length`` tokens per sequence, continuing ``prompt`` [B, P] (P may be 0).

    Yields a Progress every ``report_every`` sampled tokens and once at the end
    (``finished``). Stop iterating (or close the generator) to cancel between reports.
    The prompt's tokens are copied unchanged into the result. step: see :func:`make_step`.
    """
    options = SamplingOptions() if options is None else options
    if not isinstance(options, SamplingOptions):
        raise ValueError(f"options must be a SamplingOptions, got {type(options).__name__}")
    if not isinstance(prompt, torch.Tensor) or prompt.dim() != 2 or prompt.dtype != torch.int64:
        raise ValueError("prompt must be an int64 tensor [B, P] (P may be 0)")
    B, P = prompt.shape
    length = check_int("length", length, max(1, P), model.cfg.seq_len)
    check_int("batch (prompt rows)", B, 1)
    check_int("report_every", report_every, 1)
    if len(seeds) != B or not all(isinstance(s, int) and not isinstance(s, bool) and 0 <= s <= MAX_SEED
                                  for s in seeds):
        raise ValueError(f"seeds must be {B} integers in 0..{MAX_SEED} (2^64 - 1; one per sample), got {seeds!r}")
    if P and (int(prompt.min()) < 0 or int(prompt.max()) >= model.cfg.vocab):
        raise ValueError(f"prompt tokens must be in [0, {model.cfg.vocab})")
    uniforms = torch.stack([torch.rand(length, generator=torch.Generator().manual_seed(s), dtype=torch.float64)
                            for s in seeds])
    t0 = time.perf_counter()
    decoder = Decoder(model, B, length, dense=dense_cache, step=step)
    tokens = torch.empty(B, length, dtype=torch.int64, device=decoder.device)
    tokens[:, :P] = prompt
    if P:
        decoder.prefill(prompt)
    uniforms = uniforms.to(decoder.device, torch.float32).clamp_(max=1 - 2**-24)  # stays below 1 in fp32
    for start in range(P, length, report_every):
        stop = min(start + report_every, length)
        decoder.sample(tokens, uniforms, options, start, stop)
        if stop < length:
            yield Progress(stop, length, tokens[:, :stop], time.perf_counter() - t0, False)
    yield Progress(length, length, tokens, time.perf_counter() - t0, True)
