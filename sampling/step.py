"""The decoding step interface and its PyTorch implementation.

A step runs one position of every sequence of a batch through the model, reading and writing the
layers' KV caches (sampling/kv_cache.py): ``step(tokens, pos)`` -> logits [B, V]. Two implementations
take the same caches: :class:`TorchStep` here (plain PyTorch, any device and dtype) and
``sampling.compiled_step.CompiledStep`` (one call of C code, fp32 on the CPU). The sampler picks one
when it is set up (sampling.sampler.make_step); tests check both against the full forward pass.
"""

from __future__ import annotations

import math
from functools import partial

import torch
import torch.nn.functional as F

from kernels import BlockSparseMatMul
from models.model import ModelConfig, SparseTransformer

from .kv_cache import LayerCache
from .options import SamplingOptions, choose_tokens


class DecodeStep:
    """``self(tokens, pos)`` -> logits [B, V] float32 of token ``pos``; tokens [B, >= pos] int64 are the sequences
    so far: a step reads the token at pos - 1 (none at pos 0), and with lag inputs the ``lag_inputs`` before it too.
    ``description`` says which implementation runs and how."""

    description: str
    tuning_positions: int = 0  # positions sample() spends choosing how to run (CompiledStep's "auto"); 0: none

    def __call__(self, tokens: torch.Tensor, pos: int) -> torch.Tensor:
        raise NotImplementedError

    def sample(self, tokens: torch.Tensor, uniforms: torch.Tensor, options: SamplingOptions, start: int,
               stop: int) -> None:
        """Sample tokens[:, start:stop] in place (tokens [B, N] int64, uniforms [B, N] float32 in [0, 1)),
        token pos drawn with uniforms[:, pos]: one step and one :func:`choose_tokens` per position."""
        for pos in range(start, stop):
            logits = self(tokens, pos)
            tokens[:, pos] = choose_tokens(logits, uniforms[:, pos], options)


class TorchStep(DecodeStep):
    """The step in plain functional ops on the model's own weights (no module dispatch, pre-transposed
    matrices; block-sparse feed-forward weights through their ``BlockSparseMatMul``). On a CPU each dense weight
    matrix is split by output columns into ``shards`` pieces applied with one batched matmul (``baddbmm``), so
    every core streams its own share of the weights (a plain matrix-vector product runs on one core). shards:
    default on a CPU torch's thread count rounded down to a divisor of gcd(d_model, vocab) (:func:`weight_shards`),
    elsewhere 1."""

    def __init__(self, model: SparseTransformer, caches: list[LayerCache], pos_emb: torch.Tensor,
                 shards: int | None = None):
        cfg = model.cfg
        self.cfg, self.caches, self.pos_emb = cfg, caches, pos_emb
        if shards is None:
            device = next(model.parameters()).device
            shards = weight_shards(cfg, torch.get_num_threads()) if device.type == "cpu" else 1
        if isinstance(shards, bool) or not isinstance(shards, int) or shards < 1 or (
                shards > 1 and (cfg.d_model % shards or cfg.vocab % shards)):
            raise ValueError(f"shards must be a positive integer dividing d_model ({cfg.d_model}) and vocab "
                             f"({cfg.vocab}), got {shards!r}")
        self.shards = shards
        self.description = f"PyTorch step, weights in {shards} shard(s)"
        self.linear = _addmm if shards == 1 else _sharded_addmm

        def lin(m: torch.nn.Linear) -> tuple[torch.Tensor, torch.Tensor]:
            """(w [in, out], b [out]), or with shards S: (w [S, in, out / S], b [S, 1, out / S])."""
            w, b = m.weight.detach().t(), m.bias.detach()
            if shards == 1:
                return w.contiguous(), b
            return w.unflatten(1, (shards, -1)).transpose(0, 1).contiguous(), b.view(shards, 1, -1)

        def ff_lin(m: torch.nn.Module) -> tuple:
            """lin(m) for a dense layer; (x -> x @ W + b, None) for a block-sparse one (models/sparse_ff.py)."""
            if isinstance(m, torch.nn.Linear):
                return lin(m)
            return partial(_block_sparse_linear, m.mm, m.weight.detach(), m.bias.detach()), None

        d = lambda t: t.detach()  # noqa: E731
        self.blocks = [(d(b.norm1.weight), d(b.norm1.bias), *lin(b.attn.qkv), *lin(b.attn.proj),
                        d(b.norm2.weight), d(b.norm2.bias), *ff_lin(b.ff.fc), *ff_lin(b.ff.proj))
                       for b in model.blocks]
        self.final = (d(model.norm.weight), d(model.norm.bias), *lin(model.head))
        self.tok_emb, self.start = d(model.tok_emb.weight), d(model.start)
        self.lag = None if model.lag is None else (d(model.lag).t(), d(model.token_value))  # ([K, d], [V])

    @torch.no_grad()
    def __call__(self, tokens: torch.Tensor, pos: int) -> torch.Tensor:
        cfg, B = self.cfg, self.caches[0].batch
        d, H, D = cfg.d_model, cfg.n_heads, cfg.head_dim
        linear, norm = self.linear, torch.layer_norm  # torch.layer_norm: F.layer_norm's Python checks cost ~1 us
        x = self.start.expand(B, d) if pos == 0 else self.tok_emb[tokens[:, pos - 1]]
        x = x + self.pos_emb[pos]
        if self.lag is not None and pos:
            lag, value = self.lag
            back = min(pos, cfg.lag_inputs)
            x = x + value[tokens[:, pos - back:pos].flip(1)] @ lag[:back]  # tokens pos - 1, pos - 2, ... times lag
        for (n1w, n1b, qkv_w, qkv_b, pw, pb, n2w, n2b, fw, fb, f2w, f2b), cache in zip(self.blocks, self.caches,
                                                                                           strict=True):
            qkv = linear(norm(x, (d,), n1w, n1b), qkv_w, qkv_b).view(B, 3, H, 1, D)
            y = cache.step(pos, qkv.select(1, 0), qkv.narrow(1, 1, 2).squeeze(3))  # [B, H, 1, D]
            x = x + linear(y.view(B, d), pw, pb)
            h = norm(x, (d,), n2w, n2b)
            h = F.gelu(linear(h, fw, fb) if fb is not None else fw(h), approximate="tanh")
            x = x + (linear(h, f2w, f2b) if f2b is not None else f2w(h))
        nw, nb, hw, hb = self.final
        return linear(norm(x, (d,), nw, nb), hw, hb).float()


def weight_shards(cfg: ModelConfig, threads: int) -> int:
    """The most shards, at most ``threads``, dividing every linear layer's outputs (multiples of d_model or vocab)."""
    common = math.gcd(cfg.d_model, cfg.vocab)
    return max(s for s in range(1, max(1, threads) + 1) if common % s == 0)


def _block_sparse_linear(mm: BlockSparseMatMul, w: torch.Tensor, b: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """x [B, in] @ W + b [out] -> [B, out] for W block-sparse (its blocks w [nnz, block, block]), as the model's
    layer computes it."""
    return mm(x, w) + b


def _addmm(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """x [B, in] @ w [in, out] + b [out] -> [B, out]."""
    return torch.addmm(b, x, w)


def _sharded_addmm(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """x [B, in] @ w [S, in, out / S] + b [S, 1, out / S] -> [B, out]: the S products run on S threads."""
    return torch.baddbmm(b, x.expand(w.shape[0], -1, -1), w).transpose(0, 1).reshape(x.shape[0], -1)
