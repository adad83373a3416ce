"""The Sparse Transformer (Child et al. 2019) in one file: config, blocks, model.

``model(tokens)`` with tokens [B, N] int64 in [0, vocab) returns logits [B, N, vocab]
where ``logits[:, t]`` is the distribution of token t given tokens < t: the model
shifts its input right by one internally and feeds a learned start embedding at
position 0, so every token is scored and the loss is ``cross_entropy(logits, tokens)``.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from kernels import BLOCK_SIZES, KINDS, PATTERNS, BlockSparseLinear, Layout, Pattern, gelu, layout_of
from kernels.attention import attention_from_qkv
from kernels.layer_norm import LayerNorm
from media.audio import mu_law_decode

from .sparse_ff import FF_BLOCKS, FF_LAYOUTS, SparseLinear, decode_layout, layer_seed, recipe_layout

SCHEDULES = ("strided", "fixed", "all")  # ModelConfig.pattern: which kind each layer uses
HEAD_DIMS = (32, 64, 128)
BACKENDS = ("auto", "triton", "cpu", "reference")
TOKEN_VALUES = ("linear", "mu_law")  # ModelConfig.token_values: what a token is worth as a signal value
MAX_LAG_INPUTS = 1024


def check_int(name: str, value: object, lo: int, hi: int | None = None) -> int:
    """``value`` if it is an int (not a bool) in [lo, hi] (hi None: unbounded), else a ValueError naming it."""
    if isinstance(value, bool) or not isinstance(value, int) or value < lo or (hi is not None and value > hi):
        bound = f"in [{lo}, {hi}]" if hi is not None else f">= {lo}"
        raise ValueError(f"{name} must be an integer {bound}, got {value!r}")
    return value


def config_from_dict(cls: type, d: object, what: str):
    """``cls(**d)`` for a config dataclass read from a card; ValueError for a non-dict or unknown fields.
    what: the config's name in messages, with its article ("a model config")."""
    if not isinstance(d, dict):
        raise ValueError(f"{what} must be a dict, got {type(d).__name__}")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise ValueError(f"unknown {what.split(' ', 1)[1]} fields {unknown}; known: {sorted(names)}")
    return cls(**d)


@dataclass(frozen=True)
class ModelConfig:
    """Everything that fixes the model's shapes and maths (stored in every checkpoint card).

    pattern: "strided" interleaves a local layer (the previous ``stride`` positions)
      with a strided layer (every ``stride``-th position back), layer r using r mod 2;
      "fixed" uses the fixed pattern (own ``stride``-block plus the last ``summary``
      positions of every block) in every layer; "all" is dense causal attention.
    layer_patterns: optional explicit kind per layer ("local", "strided", "fixed", "all"),
      overriding ``pattern``'s schedule; must list ``n_layers`` kinds.
    pos_factors: the learned position embedding is a sum of one table per factor of
      the position's mixed-radix digits, e.g. (64, 64, 3) = (row, column, channel) for
      images and (rows, stride) for audio; their product must cover ``seq_len``.
    ff_layout: "dense" (the default), or block-sparse feed-forward layers (models/sparse_ff.py): "random" or
      "banded" (layouts rebuilt from the recipe: ``ff_density``, ``ff_block``, ``ff_seed``), "pruned" (layouts
      stored in ``ff_masks``, hex, fc then proj of each sparse layer). ``ff_layers`` lists the blocks whose
      feed-forward is sparse (empty: all). A sparse-wide model raises ``ff_mult`` and lowers ``ff_density``:
      ff_mult=8, ff_density=0.5 has the parameters and FLOPs of the dense ff_mult=4.
    lag_inputs: K > 0 adds to each position's input a learned linear map (d x K) of the values of the K tokens
      before it (zeros before the sequence or window starts): a direct view of the recent signal, which attention
      over learned token and position embeddings learns slowly (docs/training.md). ``token_values`` says what a
      token is worth: "linear" (0..vocab-1 evenly over [-1, 1], image intensities) or "mu_law" (the decoded
      amplitude of an 8-bit mu-law sample).
    """

    n_layers: int = 8
    d_model: int = 256
    n_heads: int = 4
    ff_mult: int = 4
    dropout: float = 0.0
    pattern: str = "strided"
    layer_patterns: tuple[str, ...] = ()
    stride: int = 192
    block: int = 32
    summary: int = 16
    distinct_summaries: bool = False
    seq_len: int = 12288
    pos_factors: tuple[int, ...] = (64, 64, 3)
    vocab: int = 256
    ff_layout: str = "dense"
    ff_density: float = 1.0
    ff_block: int = 32
    ff_seed: int = 0
    ff_layers: tuple[int, ...] = ()
    ff_masks: tuple[str, ...] = ()
    lag_inputs: int = 0
    token_values: str = "linear"

    def __post_init__(self) -> None:
        object.__setattr__(self, "pos_factors", tuple(self.pos_factors))
        object.__setattr__(self, "layer_patterns", tuple(self.layer_patterns))
        object.__setattr__(self, "ff_layers", tuple(self.ff_layers))
        object.__setattr__(self, "ff_masks", tuple(self.ff_masks))
        for name in ("n_layers", "d_model", "n_heads", "ff_mult", "stride", "seq_len", "vocab", "summary"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout!r}")
        if self.pattern not in SCHEDULES:
            raise ValueError(f"pattern must be one of {SCHEDULES}, got {self.pattern!r}")
        if self.layer_patterns and (len(self.layer_patterns) != self.n_layers
                                    or any(k not in KINDS for k in self.layer_patterns)):
            raise ValueError(f"layer_patterns must list {self.n_layers} kinds from {KINDS}, "
                             f"got {self.layer_patterns!r}")
        if self.block not in BLOCK_SIZES:
            raise ValueError(f"block must be one of {BLOCK_SIZES}, got {self.block!r}")
        if self.d_model % self.n_heads or self.d_model // self.n_heads not in HEAD_DIMS:
            raise ValueError(f"d_model / n_heads must be a head dim in {HEAD_DIMS}, got "
                             f"{self.d_model} / {self.n_heads}")
        if "fixed" in (self.pattern, *self.layer_patterns) and self.summary > self.stride:
            raise ValueError(f"summary ({self.summary}) must be <= stride ({self.stride})")
        if not self.pos_factors or any(not isinstance(f, int) or f < 1 for f in self.pos_factors):
            raise ValueError(f"pos_factors must be positive integers, got {self.pos_factors!r}")
        if math.prod(self.pos_factors) < self.seq_len:
            raise ValueError(f"pos_factors {self.pos_factors} cover {math.prod(self.pos_factors)} positions, "
                             f"fewer than seq_len={self.seq_len}")
        self._check_ff()
        check_int("lag_inputs", self.lag_inputs, 0, MAX_LAG_INPUTS)
        if self.token_values not in TOKEN_VALUES:
            raise ValueError(f"token_values must be one of {TOKEN_VALUES}, got {self.token_values!r}")
        if self.token_values == "mu_law" and self.vocab != 256:
            raise ValueError(f"token_values 'mu_law' needs vocab 256 (8-bit samples), got vocab {self.vocab}")
        if not self.lag_inputs and self.token_values != "linear":
            raise ValueError("token_values only applies with lag_inputs > 0")

    def _check_ff(self) -> None:
        """The sparse feed-forward fields (see the class notes)."""
        if self.ff_layout not in FF_LAYOUTS:
            raise ValueError(f"ff_layout must be one of {FF_LAYOUTS}, got {self.ff_layout!r}")
        if self.ff_layout == "dense":
            extra = [f.name for f in dataclasses.fields(self)
                     if f.name.startswith("ff_") and f.name not in ("ff_layout", "ff_mult")
                     and getattr(self, f.name) != f.default]
            if extra:
                raise ValueError(f"{', '.join(extra)} only apply to sparse feed-forward layers: set ff_layout to one "
                                 f"of {FF_LAYOUTS[1:]}")
            return
        d = self.ff_density
        if isinstance(d, bool) or not isinstance(d, (int, float)) or not 0 < d <= 1:
            raise ValueError(f"ff_density must be a number in (0, 1], got {d!r}")
        if self.ff_block not in FF_BLOCKS or self.d_model % self.ff_block:
            raise ValueError(f"ff_block must be one of {FF_BLOCKS} dividing d_model ({self.d_model}), got "
                             f"{self.ff_block!r}")
        check_int("ff_seed", self.ff_seed, 0)
        layers = self.ff_layers
        if any(isinstance(i, bool) or not isinstance(i, int) for i in layers) or list(layers) != sorted(set(layers)) \
                or (layers and not 0 <= layers[0] <= layers[-1] < self.n_layers):
            raise ValueError(f"ff_layers must be increasing layer numbers in [0, {self.n_layers}), got {layers!r}")
        wanted = 2 * len(self.sparse_ff_layers) if self.ff_layout == "pruned" else 0
        if len(self.ff_masks) != wanted:
            raise ValueError(f"ff_masks must hold {wanted} layouts (fc and proj of each sparse layer) with "
                             f"ff_layout={self.ff_layout!r}, got {len(self.ff_masks)}")
        if self.ff_layout == "pruned":
            for layer in self.sparse_ff_layers:
                self.ff_layouts(layer)  # decodes (and so checks) the stored layouts

    @property
    def ff_width(self) -> int:
        """The feed-forward hidden size."""
        return self.ff_mult * self.d_model

    @property
    def sparse_ff_layers(self) -> tuple[int, ...]:
        """The layers whose feed-forward is block-sparse."""
        if self.ff_layout == "dense":
            return ()
        return self.ff_layers or tuple(range(self.n_layers))

    def ff_layouts(self, layer: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(fc [d/b, width/b], proj [width/b, d/b]) bool layouts of ``layer``'s feed-forward, None when dense."""
        return _ff_layouts(self, layer)

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    def layer_kind(self, layer: int) -> str:
        """The kernels' layout kind of ``layer``."""
        if self.layer_patterns:
            return self.layer_patterns[layer]
        if self.pattern == "strided":
            return ("local", "strided")[layer % 2]
        return self.pattern

    def layer_pattern(self, layer: int) -> Pattern:
        """The attention pattern of ``layer`` (kernels/patterns.py), from its kind and the stride."""
        return PATTERNS[self.layer_kind(layer)].for_stride(self.stride, self.summary, self.distinct_summaries)

    def layout(self, layer: int, seq_len: int | None = None) -> Layout:
        """The attention layout of ``layer`` for sequences of ``seq_len`` (default: the model's). A strided
        layer whose columns are shorter than the block (a short training window: 4,096 samples are columns of 16
        at stride 256) takes blocks of one column: the same attention (causal within each column), without
        padding the blocks or copying the columns into block order."""
        pattern = self.layer_pattern(layer)
        heads = self.n_heads if pattern.distinct_summaries else 1
        layout = _layout(pattern, self.seq_len if seq_len is None else seq_len, self.block, heads)
        if pattern.permuted and layout.rows < self.block and layout.rows in BLOCK_SIZES:
            layout = _layout(pattern, layout.seq_len, layout.rows, heads)
        return layout

    @property
    def window_offset_step(self) -> int:
        """Window offsets that are multiples of this see the same attention pattern as position 0 does: a
        multiple of the block, and of the stride where a layer's pattern repeats with the stride."""
        kinds = {self.layer_kind(i) for i in range(self.n_layers)}
        return math.lcm(self.block, self.stride) if kinds & {"strided", "fixed"} else self.block

    def deepened(self, n_layers: int) -> ModelConfig:
        """This config with ``n_layers`` (at least its own) layers on the same pattern schedule."""
        check_int("n_layers", n_layers, self.n_layers)
        if self.layer_patterns:
            raise ValueError("a model with explicit layer_patterns has no schedule for new layers; "
                             "give the new config's layer_patterns instead")
        if self.ff_layout != "dense":
            raise ValueError("a model with sparse feed-forward layers cannot be deepened (new blocks would need "
                             "their own layouts)")
        return dataclasses.replace(self, n_layers=n_layers)

    def with_lag_inputs(self, lag_inputs: int, token_values: str) -> ModelConfig:
        """This config with ``lag_inputs`` lag inputs valued by ``token_values``, where it has none."""
        if self.lag_inputs:
            raise ValueError(f"this model already has {self.lag_inputs} lag inputs")
        return dataclasses.replace(self, lag_inputs=lag_inputs, token_values=token_values)

    def to_dict(self) -> dict:
        """JSON-ready fields (tuples as lists). A dense model leaves the ff_* sparse fields out, and a model
        without lag inputs their two fields, so its card is what it was before they existed."""
        d = {**dataclasses.asdict(self), "pos_factors": list(self.pos_factors),
             "layer_patterns": list(self.layer_patterns), "ff_layers": list(self.ff_layers),
             "ff_masks": list(self.ff_masks)}
        if self.ff_layout == "dense":
            d = {k: v for k, v in d.items() if not k.startswith("ff_") or k == "ff_mult"}
        if not self.lag_inputs:
            d = {k: v for k, v in d.items() if k not in ("lag_inputs", "token_values")}
        return d

    @classmethod
    def from_dict(cls, d: dict) -> ModelConfig:
        return config_from_dict(cls, d, "a model config")


def token_value_table(cfg: ModelConfig) -> torch.Tensor:
    """[vocab] float32: each token's value as a signal (cfg.token_values), for the lag inputs."""
    if cfg.token_values == "mu_law":
        return torch.from_numpy(mu_law_decode(np.arange(cfg.vocab, dtype=np.uint8)))
    return torch.linspace(-1.0, 1.0, cfg.vocab)


@lru_cache(maxsize=256)
def _ff_layouts(cfg: ModelConfig, layer: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    check_int("layer", layer, 0, cfg.n_layers - 1)
    if layer not in cfg.sparse_ff_layers:
        return None
    blocks = (cfg.d_model // cfg.ff_block, cfg.ff_width // cfg.ff_block)
    if cfg.ff_layout == "pruned":
        k = 2 * cfg.sparse_ff_layers.index(layer)
        return decode_layout(cfg.ff_masks[k], blocks), decode_layout(cfg.ff_masks[k + 1], blocks[::-1])
    return tuple(recipe_layout(cfg.ff_layout, *shape, cfg.ff_density, layer_seed(cfg.ff_seed, layer, m))
                 for m, shape in enumerate((blocks, blocks[::-1])))


@lru_cache(maxsize=64)
def _layout(pattern: Pattern, n: int, block: int, heads: int) -> Layout:
    """Layouts are cached: they also cache the kernels' per-device tables and plans."""
    return layout_of(pattern, n, block, heads)


class Attention(nn.Module):
    """Multi-head causal attention over one block-sparse pattern. [B, N, d] -> [B, N, d]."""

    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        self.cfg, self.layer = cfg, layer
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model)

    def forward(self, x: torch.Tensor, backend: str = "auto", cache=None) -> torch.Tensor:
        """x [B, N, d] -> [B, N, d]; keys/values also go into ``cache`` (a sampling.kv_cache.LayerCache) if given."""
        B, N, d = x.shape
        H, D = self.cfg.n_heads, self.cfg.head_dim
        qkv = self.qkv(x)  # [B, N, 3d]: q, k, v of each position, each [H, D]
        if cache is not None:
            _, k, v = qkv.view(B, N, 3, H, D).permute(2, 0, 3, 1, 4).unbind(0)  # each [B, H, N, D]
            cache.fill(k, v)
        y = attention_from_qkv(qkv, H, self.cfg.layout(self.layer, N), backend=backend)  # [B, N, d]
        return self.proj(y)


class FeedForward(nn.Module):
    """Linear, GeLU, linear. [B, N, d] -> [B, N, d]. Both linears are block-sparse (models/sparse_ff.py) in the
    layers ``cfg.sparse_ff_layers`` lists."""

    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        layouts = cfg.ff_layouts(layer)
        if layouts is None:
            self.fc = nn.Linear(cfg.d_model, cfg.ff_width)
            self.proj = nn.Linear(cfg.ff_width, cfg.d_model)
        else:
            self.fc = SparseLinear(cfg.d_model, cfg.ff_width, layouts[0], cfg.ff_block)
            self.proj = SparseLinear(cfg.ff_width, cfg.d_model, layouts[1], cfg.ff_block)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(gelu(self.fc(x)))


class Block(nn.Module):
    """Pre-activation residual block: x + drop(attn(norm(x))), then x + drop(ff(norm(x)))."""

    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        self.norm1 = LayerNorm(cfg.d_model)
        self.attn = Attention(cfg, layer)
        self.norm2 = LayerNorm(cfg.d_model)
        self.ff = FeedForward(cfg, layer)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, backend: str = "auto", cache=None) -> torch.Tensor:
        x = x + self.drop(self.attn(self.norm1(x), backend, cache))
        return x + self.drop(self.ff(self.norm2(x)))


class SparseTransformer(nn.Module):
    """Autoregressive Sparse Transformer over a vocabulary of ``cfg.vocab`` tokens."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        if not isinstance(cfg, ModelConfig):
            raise ValueError(f"cfg must be a ModelConfig, got {type(cfg).__name__}")
        self.cfg = cfg
        self.recompute = False  # recompute each block in the backward pass (torch.utils.checkpoint)
        self.backend = "auto"  # attention backend, see kernels.attention
        self.tok_emb = nn.Embedding(cfg.vocab, cfg.d_model)
        self.start = nn.Parameter(torch.zeros(cfg.d_model))
        self.pos_emb = nn.ModuleList(nn.Embedding(f, cfg.d_model) for f in cfg.pos_factors)
        # lag[:, k] weighs the value of the token k + 1 positions back (cfg.lag_inputs)
        self.lag = nn.Parameter(torch.zeros(cfg.d_model, cfg.lag_inputs)) if cfg.lag_inputs else None
        self.register_buffer("token_value", token_value_table(cfg), persistent=False)
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.norm = LayerNorm(cfg.d_model)
        self.head = nn.Linear(cfg.d_model, cfg.vocab)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The paper's initialisation."""
        cfg = self.cfg
        for m in self.modules():
            if isinstance(m, (nn.Linear, BlockSparseLinear)):
                nn.init.normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        for block in self.blocks:  # residual output projections
            block.attn.proj.weight.data.mul_(1.0 / math.sqrt(2 * cfg.n_layers))
            block.ff.proj.weight.data.mul_(1.0 / math.sqrt(2 * cfg.n_layers))
        nn.init.normal_(self.tok_emb.weight, std=0.125 / math.sqrt(cfg.d_model))
        nn.init.normal_(self.start, std=0.125 / math.sqrt(cfg.d_model))
        for emb in self.pos_emb:
            nn.init.normal_(emb.weight, std=0.125 / math.sqrt(cfg.d_model * len(cfg.pos_factors)))
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)
        if self.lag is not None:
            nn.init.zeros_(self.lag)  # like the logits: a model grown with lag inputs computes what it did

    def position_embedding(self, positions: torch.Tensor) -> torch.Tensor:
        """positions [N] int64 -> [N, d]: the sum of one table per mixed-radix digit."""
        out, rest = 0, positions
        for emb, f in zip(reversed(self.pos_emb), reversed(self.cfg.pos_factors), strict=True):
            out = out + emb(rest % f)
            rest = rest // f
        return out

    def embed(self, tokens: torch.Tensor, offset: int = 0) -> torch.Tensor:
        """tokens [B, N] -> block input [B, N, d]: start + shifted token embeddings + positions offset..offset+N-1."""
        B, N = tokens.shape
        x = self.tok_emb(tokens[:, :-1])
        x = torch.cat([self.start.to(x.dtype).expand(B, 1, -1), x], 1)
        x = x + self.position_embedding(torch.arange(offset, offset + N, device=tokens.device))
        return x if self.lag is None else x + self.lag_input(tokens)

    def lag_input(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [B, N] -> [B, N, d]: position t's lag input, sum_k lag[:, k] * value(tokens[:, t - 1 - k]),
        one causal convolution; tokens before the window count as 0."""
        K, N = self.cfg.lag_inputs, tokens.shape[1]
        values = self.token_value[tokens[:, :N - 1]]  # [B, N - 1]: the values of the inputs at positions 1..N-1
        values = nn.functional.pad(values, (K, 0))[:, None]  # [B, 1, K + N - 1]
        weight = self.lag.flip(1)[:, None]  # [d, 1, K]: a convolution's taps run oldest first
        return nn.functional.conv1d(values, weight).transpose(1, 2)  # [B, N, d]

    def forward(self, tokens: torch.Tensor, flat: bool = False, offset: int = 0) -> torch.Tensor:
        """tokens [B, N] int64 (N <= cfg.seq_len) -> logits [B, N, vocab] (logits[:, t] predicts tokens[:, t]).

        flat: logits [B * N, vocab] instead, the same numbers. They are the head's own output, where the [B, N, vocab]
        logits are a view of it (a linear layer on 3-d input computes on 2-d and reshapes): training asks for them
        flat, since FSDP warns on every step when the sharded model returns a view (an in-place op on one would
        skip its all-gather), and the loss flattens them anyway.
        offset: the window's first position in a sequence of cfg.seq_len (offset + N <= cfg.seq_len), for training
        on windows shorter than the model's sequence (train.py --window): the window starts without the context
        before it, as sequence position 0 does. Attention patterns are translation-invariant for offsets that are
        multiples of ``cfg.window_offset_step``.
        """
        self._check_tokens(tokens, offset)
        x = self.embed(tokens, offset)
        for block in self.blocks:
            if self.recompute and torch.is_grad_enabled():
                x = checkpoint(block, x, self.backend, use_reentrant=False)
            else:
                x = block(x, self.backend)
        x = self.norm(x)
        return self.head(x.flatten(0, 1)) if flat else self.head(x)

    @torch.no_grad()
    def prefill(self, tokens: torch.Tensor, caches: list) -> None:
        """Run positions 0..P-1 of ``tokens`` [B, P] in one parallel pass, storing keys/values in ``caches``."""
        self._check_tokens(tokens)
        x = self.embed(tokens)
        for block, cache in zip(self.blocks, caches, strict=True):
            x = block(x, self.backend, cache)

    def _check_tokens(self, tokens: object, offset: int = 0) -> None:
        if not isinstance(tokens, torch.Tensor) or tokens.dim() != 2 or tokens.dtype != torch.int64:
            desc = f"{tokens.dtype} {tuple(tokens.shape)}" if isinstance(tokens, torch.Tensor) else type(tokens)
            raise ValueError(f"tokens must be an int64 tensor [B, N], got {desc}")
        n = tokens.shape[1]
        if not 1 <= n <= self.cfg.seq_len:
            raise ValueError(f"tokens has {n} positions; this model takes 1 to {self.cfg.seq_len}")
        if isinstance(offset, bool) or not isinstance(offset, int) or not 0 <= offset <= self.cfg.seq_len - n:
            raise ValueError(f"offset must be an int in [0, {self.cfg.seq_len - n}] (offset + {n} positions <= "
                             f"seq_len {self.cfg.seq_len}), got {offset!r}")
        if tokens.numel() and (int(tokens.min()) < 0 or int(tokens.max()) >= self.cfg.vocab):
            raise ValueError(f"token values must be in [0, {self.cfg.vocab}), got "
                             f"[{int(tokens.min())}, {int(tokens.max())}]")

    @torch.no_grad()
    def deepened(self, n_layers: int) -> SparseTransformer:
        """A copy of this model with ``n_layers`` blocks that computes the same function.

        Blocks 0..n-1 are this model's; each new block copies the top block of its layer kind
        (the top block where there is none) with its two residual output projections zeroed, so
        it adds nothing until training moves them (growth by stacking).
        """
        cfg = self.cfg
        grown = SparseTransformer(cfg.deepened(n_layers))
        state = self.state_dict()
        for i in range(cfg.n_layers, n_layers):
            same_kind = [j for j in range(cfg.n_layers) if cfg.layer_kind(j) == grown.cfg.layer_kind(i)]
            source = same_kind[-1] if same_kind else cfg.n_layers - 1
            for name, tensor in self.blocks[source].state_dict().items():
                state[f"blocks.{i}.{name}"] = tensor.clone()
            for proj in ("attn.proj", "ff.proj"):
                state[f"blocks.{i}.{proj}.weight"].zero_()
                state[f"blocks.{i}.{proj}.bias"].zero_()
        grown.load_state_dict(state)
        grown.recompute, grown.backend = self.recompute, self.backend
        return grown.to(next(self.parameters()).device)

    @torch.no_grad()
    def with_lag_inputs(self, lag_inputs: int, token_values: str) -> SparseTransformer:
        """A copy of this model with ``lag_inputs`` lag inputs (see ModelConfig), zero-initialised, so it
        computes the same function until training moves them."""
        grown = SparseTransformer(self.cfg.with_lag_inputs(lag_inputs, token_values))
        grown.load_state_dict({**self.state_dict(), "lag": grown.lag.detach().clone()})
        grown.recompute, grown.backend = self.recompute, self.backend
        return grown.to(next(self.parameters()).device)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
