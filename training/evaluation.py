"""Held-out bits per dimension during and at the end of a run."""

from __future__ import annotations

import torch

from data import eval_batches
from models.evaluate import sequence_bits

from .distributed import Dist
from .precision import PRECISIONS


def held_out_bits(model: torch.nn.Module, val, s: dict, d: Dist, shard: bool) -> float:
    """Mean bits per token over the first ``eval_items`` validation sequences.

    shard: each process takes every world-th item (DDP / one process); FSDP needs every
    process in every forward, so there all evaluate all batches.
    Validation sequences are whole model sequences; with training windows shorter than that (--window), a
    batch holds as many tokens as a training micro-batch (at least one sequence).
    """
    total = torch.zeros(2, dtype=torch.float64, device=d.device)
    rank, world = (d.rank, d.world) if shard else (0, 1)
    batch = max(1, s["micro_batch"] * (s.get("window") or val.seq_len) // val.seq_len)
    batches = eval_batches(val, batch, s["eval_items"], rank=rank, world_size=world)
    for bits in sequence_bits(model, batches, d.device, PRECISIONS[s["precision"]]):
        total[0] += bits.sum()
        total[1] += bits.numel() * val.seq_len
    if shard:
        d.all_reduce(total)
    return float(total[0] / total[1])
