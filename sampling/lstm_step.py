"""The sparse LSTM's decoding step: the recurrent state (h, c) is all it carries from one position to the next,
so there is no KV cache; a prompt is prefilled with one forward pass over it (models/lstm.py)."""

from __future__ import annotations

import torch

from models.lstm import SparseLSTM

from .step import DecodeStep


class LSTMStep(DecodeStep):
    """``self(tokens, pos)`` -> logits [B, vocab] float32 of token ``pos`` for a batch of ``batch`` sequences,
    advancing the state by one input (tokens[:, pos - 1]; pos 0 starts the sequences afresh).
    Positions must come in order: after :meth:`prefill` of P tokens, the next call is for position P."""

    def __init__(self, model: SparseLSTM, batch: int):
        if not isinstance(model, SparseLSTM):
            raise ValueError(f"model must be a SparseLSTM, got {type(model).__name__}")
        self.model, self.batch = model, batch
        self.h, self.c = model.zero_state(batch)
        self.next_pos = 0
        kind = f"density {model.cfg.density:g}, block-sparse" if model.cfg.sparse else "dense"
        self.description = f"PyTorch LSTM step ({kind} weights)"

    @torch.no_grad()
    def prefill(self, tokens: torch.Tensor) -> None:
        """Run the prompt tokens [B, P] in one forward pass; the next step is position P."""
        was_training = self.model.training
        self.model.eval()
        try:
            _, state = self.model(tokens)
        finally:
            self.model.train(was_training)
        self.h, self.c, self.next_pos = state.h, state.c, tokens.shape[1]

    @torch.no_grad()
    def __call__(self, tokens: torch.Tensor, pos: int) -> torch.Tensor:
        if pos == 0:
            self.h, self.c = self.model.zero_state(self.batch)
        elif pos != self.next_pos:
            raise ValueError(f"the LSTM step runs positions in order: position {self.next_pos} is next, got {pos}")
        logits, self.h, self.c = self.model.decode(None if pos == 0 else tokens[:, pos - 1], self.h, self.c)
        self.next_pos = pos + 1
        return logits
