"""Sampling: KV-cached incremental decoding, temperature / top-k / top-p, a seed per sample, progress.

The prompt is prefilled with one parallel forward pass (the block-sparse kernels), then one
token per step: each layer reads only what its pattern allows from a static cache
(models.kv_cache). At batch 1 on a CPU a step is about 80 small operations, so per-op overhead
costs as much as reading the weights: by default each step is one call of the fused C step
(models.fused_step), which reads and writes the same caches. Where that cannot run, the step is
written with plain functional ops on the model's own weights (no module dispatch, pre-transposed
matrices); on a CPU each weight matrix is then split by output columns into one shard per thread
and applied with one batched matmul (``baddbmm``), so every core streams its own share of the
weights (a plain matrix-vector product runs on one core). Tests check that step-by-step logits
equal the full forward's at every position, for both steps.

Randomness: sample b draws its uniforms from its own generator seeded with ``seeds[b]``
(one uniform per position, inverse-CDF sampling), so a sample depends on its seed and
prompt only, not on the batch it ran in.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .fused_step import FusedStep
from .fused_step import unavailable as fused_step_unavailable
from .kv_cache import LayerCache, make_caches
from .model import ModelConfig, SparseTransformer, check_int

PREFILL_ROWS = 1  # sequences per parallel forward pass of Decoder.prefill


@dataclass(frozen=True)
class SamplingOptions:
    """temperature 0 = greedy; top_k keeps the k likeliest tokens; top_p the smallest set with mass >= p."""

    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None

    def __post_init__(self) -> None:
        t = self.temperature
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or t < 0:
            raise ValueError(f"temperature must be a finite number >= 0 (0 = greedy), got {t!r}")
        if self.top_k is not None and (isinstance(self.top_k, bool) or not isinstance(self.top_k, int)
                                       or self.top_k < 1):
            raise ValueError(f"top_k must be a positive integer or None (off), got {self.top_k!r}")
        p = self.top_p
        if p is not None and (isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 < p <= 1):
            raise ValueError(f"top_p must be in (0, 1] or None (off), got {p!r}")


def choose_tokens(logits: torch.Tensor, uniforms: torch.Tensor, options: SamplingOptions) -> torch.Tensor:
    """logits [B, V], uniforms [B] in [0, 1) -> tokens [B] int64 (inverse CDF of the filtered distribution)."""
    if options.temperature == 0:
        return logits.argmax(-1)
    if options.temperature != 1:
        logits = logits / options.temperature
    if options.top_k is not None and options.top_k < logits.shape[-1]:
        kth = logits.topk(options.top_k, -1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, -math.inf)
    # unnormalised probabilities (the inverse CDF below scales by the total); not torch.softmax, whose
    # parallel loop at batch 8 wakes torch's thread pool, which then spins on the cores the fused step uses
    probs = (logits - logits.amax(-1, keepdim=True)).exp_()
    if options.top_p is not None and options.top_p < 1:
        sorted_p, order = probs.sort(-1, descending=True)
        before = sorted_p.cumsum(-1) - sorted_p  # mass of the likelier tokens
        keep = before < options.top_p * sorted_p.sum(-1, keepdim=True)
        probs = probs * torch.zeros_like(probs, dtype=torch.bool).scatter_(-1, order, keep)
    cdf = probs.cumsum(-1)
    target = uniforms.to(cdf.dtype)[:, None] * cdf[:, -1:]
    return torch.searchsorted(cdf, target, right=True).squeeze(-1).clamp_(max=logits.shape[-1] - 1)


class Decoder:
    """Prefill and single-token steps of one model for a batch, with static KV caches.

    dense: keep and read every past position in every layer (a baseline for benchmarks; it
    is not the model's pattern, so its samples differ).
    fused: run each step as one call of the compiled C step (models.fused_step); None (default):
    where it is available (fp32 on the CPU, a C compiler found) and ``shards`` is not given;
    False: the PyTorch step; True: the C step or a ValueError saying why it cannot run.
    shards (PyTorch step): pieces each weight matrix is split into by output columns (see the
    module notes); default: on a CPU, torch's thread count rounded down to a divisor of
    gcd(d_model, vocab); elsewhere 1.
    """

    def __init__(self, model: SparseTransformer, batch: int, seq_len: int | None = None, dense: bool = False,
                 shards: int | None = None, fused: bool | None = None):
        if not isinstance(model, SparseTransformer):
            raise ValueError(f"model must be a SparseTransformer, got {type(model).__name__}")
        cfg = model.cfg
        self.model, self.cfg = model, cfg
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        self.caches: list[LayerCache] = make_caches(cfg, batch, seq_len, self.device, self.dtype, dense)
        self.seq_len = self.caches[0].seq_len
        with torch.no_grad():
            self.pos_emb = model.position_embedding(torch.arange(self.seq_len, device=self.device)).detach()
        if fused not in (None, True, False):
            raise ValueError(f"fused must be None (auto), True or False, got {fused!r}")
        if shards is not None and check_int("shards", shards, 1) > 1 and (cfg.d_model % shards or cfg.vocab % shards):
            raise ValueError(f"shards must divide d_model ({cfg.d_model}) and vocab ({cfg.vocab}), got {shards}")
        if fused and shards is not None:
            raise ValueError("shards split the PyTorch step's weights: pass fused=False (or no fused) with shards")
        if fused is None:
            fused = shards is None and fused_step_unavailable(model, self.caches) is None
        # the C step (None: the PyTorch step); it reads and writes the same caches
        self.fused = FusedStep(model, self.caches, self.pos_emb) if fused else None
        self.shards = None
        if self.fused is None:
            if shards is None:
                shards = weight_shards(cfg, torch.get_num_threads()) if self.device.type == "cpu" else 1
            self._prepare_weights(shards)

    def _prepare_weights(self, shards: int) -> None:
        """The PyTorch step's weights: pre-transposed, split into ``shards`` by output columns."""
        model = self.model
        self.shards = shards
        self.linear = _addmm if shards == 1 else _sharded_addmm

        def lin(m: torch.nn.Linear) -> tuple[torch.Tensor, torch.Tensor]:
            """(w [in, out], b [out]), or with shards S: (w [S, in, out / S], b [S, 1, out / S])."""
            w, b = m.weight.detach().t(), m.bias.detach()
            if shards == 1:
                return w.contiguous(), b
            return w.unflatten(1, (shards, -1)).transpose(0, 1).contiguous(), b.view(shards, 1, -1)

        d = lambda t: t.detach()  # noqa: E731
        self.blocks = [(d(b.norm1.weight), d(b.norm1.bias), *lin(b.attn.qkv), *lin(b.attn.proj),
                        d(b.norm2.weight), d(b.norm2.bias), *lin(b.ff.fc), *lin(b.ff.proj))
                       for b in model.blocks]
        self.final = (d(model.norm.weight), d(model.norm.bias), *lin(model.head))
        self.tok_emb, self.start = d(model.tok_emb.weight), d(model.start)

    @property
    def cache_bytes(self) -> int:
        return sum(c.nbytes for c in self.caches)

    @torch.no_grad()
    def prefill(self, tokens: torch.Tensor) -> None:
        """Fill the caches with positions 0..P-1 of tokens [B, P]: one parallel forward pass per PREFILL_ROWS
        sequences (eight 6,144-token prompts took 7.0-7.4 s in one pass, 5.1-5.8 s in passes of two and
        4.4-6.3 s one at a time, interleaved, on the machine of README *Sampling speed*: a smaller pass
        keeps its activations in the CPU's caches)."""
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
        token pos drawn with uniforms[:, pos]. With the C step and no top-k / top-p, the steps and the
        sampling all run in C (one call); otherwise one step and one :func:`choose_tokens` per position."""
        filters = (options.top_k is not None and options.top_k < self.cfg.vocab) or (
            options.top_p is not None and options.top_p < 1)
        if self.fused is not None and not filters:
            self.fused.sample(tokens, uniforms, options.temperature, start, stop)
            return
        for pos in range(start, stop):
            logits = self.step(tokens[:, pos - 1] if pos else None, pos)
            tokens[:, pos] = choose_tokens(logits, uniforms[:, pos], options)

    @torch.no_grad()
    def step(self, prev: torch.Tensor | None, pos: int) -> torch.Tensor:
        """Logits [B, V] (float32) of token ``pos``; prev [B] are the tokens at pos - 1 (None at pos 0)."""
        if self.fused is not None:
            return self.fused(prev, pos)
        cfg, B = self.cfg, self.caches[0].batch
        d, H, D = cfg.d_model, cfg.n_heads, cfg.head_dim
        linear, norm = self.linear, torch.layer_norm  # torch.layer_norm: F.layer_norm's Python checks cost ~1 us
        x = self.start.expand(B, d) if prev is None else self.tok_emb[prev]
        x = x + self.pos_emb[pos]
        for (n1w, n1b, qkv_w, qkv_b, pw, pb, n2w, n2b, fw, fb, f2w, f2b), cache in zip(self.blocks, self.caches,
                                                                                           strict=True):
            qkv = linear(norm(x, (d,), n1w, n1b), qkv_w, qkv_b).view(B, 3, H, 1, D)
            y = cache.step(pos, qkv.select(1, 0), qkv.narrow(1, 1, 2).squeeze(3))  # [B, H, 1, D]
            x = x + linear(y.view(B, d), pw, pb)
            x = x + linear(F.gelu(linear(norm(x, (d,), n2w, n2b), fw, fb), approximate="tanh"), f2w, f2b)
        nw, nb, hw, hb = self.final
        return linear(norm(x, (d,), nw, nb), hw, hb).float()


class _CacheRows:
    """Some rows of a layer's cache, as the model's prefill fills them (``fill(k, v)``)."""

    def __init__(self, cache: LayerCache, rows: slice):
        self.cache, self.rows = cache, rows

    def fill(self, k: torch.Tensor, v: torch.Tensor) -> None:
        self.cache.fill(k, v, self.rows)


def decoding_step(model: SparseTransformer) -> str:
    """Which step :func:`generate` will use for ``model`` as it is now (device, dtype), and why not the C one."""
    reason = fused_step_unavailable(model, [])
    return "fused C step (models/fused_step.c)" if reason is None else f"PyTorch step ({reason})"


def weight_shards(cfg: ModelConfig, threads: int) -> int:
    """The most shards, at most ``threads``, dividing every linear layer's outputs (multiples of d_model or vocab)."""
    common = math.gcd(cfg.d_model, cfg.vocab)
    return max(s for s in range(1, max(1, threads) + 1) if common % s == 0)


def _addmm(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """x [B, in] @ w [in, out] + b [out] -> [B, out]."""
    return torch.addmm(b, x, w)


def _sharded_addmm(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """x [B, in] @ w [S, in, out / S] + b [S, 1, out / S] -> [B, out]: the S products run on S threads."""
    return torch.baddbmm(b, x.expand(w.shape[0], -1, -1), w).transpose(0, 1).reshape(x.shape[0], -1)


@dataclass
class Progress:
    """A report from :func:`generate`: ``tokens`` [B, done] so far (prompt included)."""

    done: int
    total: int
    tokens: torch.Tensor
    seconds: float
    finished: bool


def generate(model: SparseTransformer, prompt: torch.Tensor, length: int, seeds: list[int],
             options: SamplingOptions | None = None, report_every: int = 256, dense_cache: bool = False,
             fused: bool | None = None) -> Iterator[Progress]:
    """Sample ``length`` tokens per sequence, continuing ``prompt`` [B, P] (P may be 0).

    Yields a Progress every ``report_every`` sampled tokens and once at the end
    (``finished``). Stop iterating (or close the generator) to cancel between reports.
    The prompt's tokens are copied unchanged into the result. fused: see :class:`Decoder`.
    """
    options = options or SamplingOptions()
    if not isinstance(prompt, torch.Tensor) or prompt.dim() != 2 or prompt.dtype != torch.int64:
        raise ValueError("prompt must be an int64 tensor [B, P] (P may be 0)")
    B, P = prompt.shape
    length = check_int("length", length, max(1, P), model.cfg.seq_len)
    check_int("batch (prompt rows)", B, 1)
    check_int("report_every", report_every, 1)
    if len(seeds) != B or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in seeds):
        raise ValueError(f"seeds must be {B} non-negative integers (one per sample), got {seeds!r}")
    if P and (int(prompt.min()) < 0 or int(prompt.max()) >= model.cfg.vocab):
        raise ValueError(f"prompt tokens must be in [0, {model.cfg.vocab})")
    uniforms = torch.stack([torch.rand(length, generator=torch.Generator().manual_seed(s), dtype=torch.float64)
                            for s in seeds])
    t0 = time.perf_counter()
    decoder = Decoder(model, B, length, dense=dense_cache, fused=fused)
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


class SamplingCancelled(Exception):
    """The progress callback asked to stop."""


def sample(model: SparseTransformer, prompt: torch.Tensor, length: int, seeds: list[int],
           options: SamplingOptions | None = None, callback: Callable[[Progress], bool | None] | None = None,
           report_every: int = 256, fused: bool | None = None) -> torch.Tensor:
    """:func:`generate` to the end; returns tokens [B, length]. ``callback`` returning False cancels
    (raises SamplingCancelled)."""
    for progress in generate(model, prompt, length, seeds, options, report_every, fused=fused):
        if callback is not None and callback(progress) is False:
            raise SamplingCancelled(f"cancelled at {progress.done} of {progress.total} tokens")
        if progress.finished:
            return progress.tokens
    raise AssertionError("generate ended without a final report")
