"""A byte-level LSTM baseline whose weights are block-sparse with a small-world layout (OpenAI's blocksparse
LSTMs: about 5x wider at the same parameter count), or dense when ``density`` is 1.

``model(tokens, state)`` with tokens [B, N] int64 returns (logits [B, N, vocab], state): the same input
convention as the Sparse Transformer (``logits[:, t]`` predicts ``tokens[:, t]``; position 0 reads a learned
start embedding), and ``state`` (an :class:`LSTMState`) continues the sequence: running a sequence in chunks,
each with the state the previous one returned, gives the logits of one pass over the whole sequence
(truncated backpropagation through time detaches the state between chunks).

Each layer: gates = x W_x + b + r W_h with r = h (plain LSTM) or, multiplicative (Krause et al. 2016),
r = m = (x W_mx) * (h W_mh). Every W is a linear layer (``nn.Linear`` when dense, else
``kernels.BlockSparseLinear``); a sparse square piece [hidden, hidden] has a small-world layout on its
hidden / block blocks (Watts-Strogatz or Barabasi-Albert, kernels/blocksparse_layouts.py) with its own seed,
shared by the gates of its matrix. The layouts are rebuilt from the config and also kept as uint8 buffers
(``layouts``), so a checkpoint whose stored layouts differ from the rebuilt ones is refused.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import nn

from kernels import BSMM_BLOCKS, BlockSparseLinear, small_world_ba, small_world_ws

from .model import check_int, config_from_dict

LAYOUT_KINDS = ("ws", "ba")  # small_world_ws, small_world_ba
ARCHITECTURE = "lstm"  # the model card's "architecture"


@dataclass(frozen=True)
class LSTMConfig:
    """Everything that fixes the LSTM's shapes and maths (stored in its checkpoint card).

    hidden: units per layer (also the embedding width). density: share of non-zero blocks in each weight
    matrix, in (0, 1]; 1 = dense. block: block size of the sparse weights. layout: "ws" (Watts-Strogatz,
    ``rewire_p``) or "ba" (Barabasi-Albert); layout_seed: the first layout's seed (each matrix takes the next).
    multiplicative: mLSTM instead of a plain LSTM. seq_len: the sequence length of the data (training windows,
    the longest sample).
    """

    hidden: int = 512
    n_layers: int = 1
    density: float = 1.0
    block: int = 32
    layout: str = "ws"
    layout_seed: int = 0
    rewire_p: float = 0.1
    multiplicative: bool = False
    seq_len: int = 12288
    vocab: int = 256

    def __post_init__(self) -> None:
        for name in ("hidden", "n_layers", "seq_len", "vocab"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if isinstance(self.density, bool) or not isinstance(self.density, (int, float)) or \
                not 0 < self.density <= 1:
            raise ValueError(f"density must be a number in (0, 1] (1 = dense), got {self.density!r}")
        if not isinstance(self.multiplicative, bool):
            raise ValueError(f"multiplicative must be true or false, got {self.multiplicative!r}")
        if self.layout not in LAYOUT_KINDS:
            raise ValueError(f"layout must be one of {LAYOUT_KINDS} (Watts-Strogatz, Barabasi-Albert), "
                             f"got {self.layout!r}")
        check_int("layout_seed", self.layout_seed, 0)
        if isinstance(self.rewire_p, bool) or not isinstance(self.rewire_p, (int, float)) or \
                not 0 <= self.rewire_p <= 1:
            raise ValueError(f"rewire_p must be in [0, 1], got {self.rewire_p!r}")
        if self.block not in BSMM_BLOCKS:
            raise ValueError(f"block must be one of {BSMM_BLOCKS}, got {self.block!r}")
        if self.sparse:
            if self.hidden % self.block:
                raise ValueError(f"hidden ({self.hidden}) must be a multiple of block ({self.block}) when "
                                 f"density < 1")
            self.layout_degree()  # raises when the density does not fit a small-world graph on the blocks

    @property
    def sparse(self) -> bool:
        return self.density < 1

    @property
    def blocks(self) -> int:
        """Blocks along a hidden vector."""
        return self.hidden // self.block

    def layout_degree(self) -> int:
        """The small-world graph's parameter for ``density``: Watts-Strogatz's even degree k (a block feeds
        itself and k others) or Barabasi-Albert's m (about 2m others on average)."""
        nb = self.blocks
        others = self.density * nb - 1  # blocks per row besides the diagonal
        if self.layout == "ws":
            degree = max(2, 2 * round(others / 2))
            if degree >= nb:
                raise ValueError(f"density {self.density} leaves no room for a Watts-Strogatz graph on {nb} blocks "
                                 f"(degree {degree} must be < {nb}): lower it, or use density 1 (dense)")
            return degree
        m = max(1, round(others / 2))
        if m >= nb:
            raise ValueError(f"density {self.density} leaves no room for a Barabasi-Albert graph on {nb} blocks "
                             f"(m {m} must be < {nb}): lower it, or use density 1 (dense)")
        return m

    @property
    def square_matrices(self) -> int:
        """Square [hidden, hidden] layouts per layer: the input and recurrent weights (and W_mx, W_mh)."""
        return 4 if self.multiplicative else 2

    def square_layout(self, index: int) -> torch.Tensor:
        """bool [blocks, blocks]: the ``index``-th square layout of the model (seed layout_seed + index)."""
        seed = self.layout_seed + index
        if self.layout == "ws":
            return small_world_ws(self.blocks, self.layout_degree(), self.rewire_p, seed=seed)
        return small_world_ba(self.blocks, self.layout_degree(), seed=seed)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> LSTMConfig:
        return config_from_dict(cls, d, "an LSTM config")


class LSTMState(NamedTuple):
    """Where a sequence stands: h, c [n_layers, B, hidden] after the inputs so far, and ``last`` [B] int64, the
    last token given (the input of the next position)."""

    h: torch.Tensor
    c: torch.Tensor
    last: torch.Tensor

    def detach(self) -> LSTMState:
        return LSTMState(self.h.detach(), self.c.detach(), self.last)


def _linear(cfg: LSTMConfig, layout: torch.Tensor | None, gates: int, bias: bool) -> nn.Module:
    """[hidden] -> [gates * hidden]: dense, or block-sparse with ``layout`` repeated for each gate."""
    out = gates * cfg.hidden
    if layout is None:
        return nn.Linear(cfg.hidden, out, bias=bias)
    return BlockSparseLinear(cfg.hidden, out, layout.repeat(1, gates), cfg.block, bias=bias)


class LSTMLayer(nn.Module):
    """One (m)LSTM layer over a sequence: x [B, N, hidden], (h, c) [B, hidden] -> outputs [B, N, hidden], (h, c)."""

    def __init__(self, cfg: LSTMConfig, layouts: list[torch.Tensor | None]) -> None:
        super().__init__()
        self.cfg = cfg
        H = cfg.hidden
        if cfg.multiplicative:
            lay_x, lay_h, lay_mx, lay_mh = layouts
            self.inp = _linear(cfg, lay_x, 4, bias=True)   # x -> gates
            self.mx = _linear(cfg, lay_mx, 1, bias=False)  # x -> m's input factor
            self.mh = _linear(cfg, lay_mh, 1, bias=False)  # h -> m's recurrent factor
        else:
            lay_x, lay_h = layouts
            self.inp = _linear(cfg, lay_x, 4, bias=True)
        self.rec = _linear(cfg, lay_h, 4, bias=False)  # h (or m) -> gates
        with torch.no_grad():
            self.inp.bias.zero_()
            self.inp.bias[H:2 * H].fill_(1.0)  # forget gate bias 1: remember by default

    def forward(self, x: torch.Tensor, h: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor,
                                                                                   torch.Tensor]:
        pre = self.inp(x)  # [B, N, 4H]: the input part of every step in one product
        mx = self.mx(x) if self.cfg.multiplicative else None
        outs = []
        for t in range(x.shape[1]):
            r = mx[:, t] * self.mh(h) if mx is not None else h
            i, f, o, u = (pre[:, t] + self.rec(r)).chunk(4, dim=-1)
            c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(u)
            h = torch.sigmoid(o) * torch.tanh(c)
            outs.append(h)
        return torch.stack(outs, 1), h, c


class SparseLSTM(nn.Module):
    """Autoregressive (m)LSTM over bytes; see the module docstring."""

    def __init__(self, cfg: LSTMConfig) -> None:
        super().__init__()
        if not isinstance(cfg, LSTMConfig):
            raise ValueError(f"cfg must be an LSTMConfig, got {type(cfg).__name__}")
        self.cfg = cfg
        per_layer = cfg.square_matrices
        if cfg.sparse:
            layouts = [cfg.square_layout(i) for i in range(cfg.n_layers * per_layer)]
            self.register_buffer("layouts", torch.stack(layouts).to(torch.uint8))  # [L * per_layer, nb, nb]
        else:
            layouts = [None] * (cfg.n_layers * per_layer)
        self.tok_emb = nn.Embedding(cfg.vocab, cfg.hidden)
        self.start = nn.Parameter(torch.zeros(cfg.hidden))
        self.layers = nn.ModuleList(LSTMLayer(cfg, layouts[i * per_layer:(i + 1) * per_layer])
                                    for i in range(cfg.n_layers))
        self.head = nn.Linear(cfg.hidden, cfg.vocab)
        nn.init.normal_(self.tok_emb.weight, std=1.0 / math.sqrt(2))
        nn.init.normal_(self.start, std=1.0 / math.sqrt(2))
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def zero_state(self, batch: int, device: torch.device | str | None = None,
                   dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(h, c) zeros [n_layers, batch, hidden]: before the first input."""
        p = self.start
        shape = (self.cfg.n_layers, batch, self.cfg.hidden)
        z = torch.zeros(shape, device=device or p.device, dtype=dtype or p.dtype)
        return z, z.clone()

    def run_inputs(self, x: torch.Tensor, h: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor,
                                                                                      torch.Tensor]:
        """Input embeddings x [B, N, hidden] from (h, c) [n_layers, B, hidden] -> (top outputs [B, N, hidden],
        h, c after them)."""
        hs, cs = [], []
        for layer, h0, c0 in zip(self.layers, h, c, strict=True):
            x, h1, c1 = layer(x, h0, c0)
            hs.append(h1)
            cs.append(c1)
        return x, torch.stack(hs), torch.stack(cs)

    def forward(self, tokens: torch.Tensor, state: LSTMState | None = None,
                flat: bool = False) -> tuple[torch.Tensor, LSTMState]:
        """tokens [B, N] int64 -> (logits [B, N, vocab] (``flat``: [B * N, vocab]), the state after them).

        state: None starts a sequence (position 0 reads the start embedding); a state returned by an earlier
        call continues that sequence (its ``last`` token is this call's first input)."""
        self._check_tokens(tokens)
        B = tokens.shape[0]
        if state is None:
            first = self.start.expand(B, 1, -1)
            h, c = self.zero_state(B)
        else:
            self._check_state(state, B)
            first = self.tok_emb(state.last)[:, None]
            h, c = state.h, state.c
        x = torch.cat([first, self.tok_emb(tokens[:, :-1])], 1)
        out, h, c = self.run_inputs(x, h, c)
        logits = self.head(out.flatten(0, 1)) if flat else self.head(out)
        return logits, LSTMState(h, c, tokens[:, -1])

    @torch.no_grad()
    def decode(self, prev: torch.Tensor | None, h: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor,
                                                                                            torch.Tensor]:
        """One position for decoding: prev [B] int64 (the token before it; None at position 0) from (h, c)
        [n_layers, B, hidden] -> (logits [B, vocab] float32, h, c)."""
        B = h.shape[1]
        x = self.start.expand(B, -1) if prev is None else self.tok_emb(prev)
        out, h, c = self.run_inputs(x[:, None], h, c)
        return self.head(out[:, 0]).float(), h, c

    def _check_tokens(self, tokens: object) -> None:
        if not isinstance(tokens, torch.Tensor) or tokens.dim() != 2 or tokens.dtype != torch.int64 \
                or tokens.shape[1] < 1:
            desc = f"{tokens.dtype} {tuple(tokens.shape)}" if isinstance(tokens, torch.Tensor) else type(tokens)
            raise ValueError(f"tokens must be an int64 tensor [B, N] with N >= 1, got {desc}")
        if tokens.numel() and (int(tokens.min()) < 0 or int(tokens.max()) >= self.cfg.vocab):
            raise ValueError(f"token values must be in [0, {self.cfg.vocab}), got "
                             f"[{int(tokens.min())}, {int(tokens.max())}]")

    def _check_state(self, state: object, batch: int) -> None:
        shape = (self.cfg.n_layers, batch, self.cfg.hidden)
        if not isinstance(state, LSTMState) or tuple(state.h.shape) != shape or tuple(state.c.shape) != shape \
                or state.last.shape != (batch,) or state.last.dtype != torch.int64:
            raise ValueError(f"state must be the LSTMState an earlier call returned for this batch: h and c "
                             f"{list(shape)}, last [{batch}] int64")

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


def matmul_parameters(cfg: LSTMConfig) -> int:
    """Weights that take part in matrix products (the non-zero ones of sparse layers; the head)."""
    H = cfg.hidden
    total = 0
    for i in range(cfg.n_layers * cfg.square_matrices):
        nnz = int(cfg.square_layout(i).sum()) * cfg.block ** 2 if cfg.sparse else H * H
        gates = 1 if cfg.multiplicative and i % 4 >= 2 else 4  # W_mx and W_mh make one vector, not four gates
        total += gates * nnz
    return total + H * cfg.vocab


def training_flops_per_sequence(cfg: LSTMConfig, seq_len: int | None = None) -> float:
    """Model FLOPs of one training step on one sequence: 6 x matrix weights x tokens (forward 2, backward 4);
    the gates' elementwise maths is not counted, as the transformer's norms and GeLUs are not."""
    n = cfg.seq_len if seq_len is None else seq_len
    return 6.0 * matmul_parameters(cfg) * n
