"""Held-out likelihood: negative log-likelihood of token sequences under a model, in bits."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable, Iterator

import torch
import torch.nn.functional as F

from .lstm import SparseLSTM
from .model import SparseTransformer


@torch.no_grad()
def sequence_bits(model: SparseTransformer | SparseLSTM, batches: Iterable[torch.Tensor],
                  device: torch.device | str = "cpu", dtype: torch.dtype | None = None) -> Iterator[torch.Tensor]:
    """For each batch of tokens [B, N] (any integer dtype), yield the NLL in bits of each sequence,
    float64 [B] (sum over its N tokens). ``dtype`` (e.g. torch.bfloat16) runs the forward under
    autocast; None runs it in the model's own precision. The model is in eval mode meanwhile."""
    was_training = model.training
    model.eval()
    device = torch.device(device)
    try:
        for batch in batches:
            batch = batch.to(device).long()
            ctx = torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()
            with ctx:
                logits = model(batch)
                if isinstance(logits, tuple):  # a SparseLSTM's (logits, state), also through DDP
                    logits = logits[0]
            nats = F.cross_entropy(logits.float().transpose(1, 2), batch, reduction="none").double().sum(1)
            yield nats / math.log(2)
    finally:
        model.train(was_training)
