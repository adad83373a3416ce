"""state.pt: all a run needs to continue exactly where it stopped, written atomically by rank 0.

It holds the full (unsharded) model and optimizer state, the fp16 loss scaler, the data position, the EMA,
the counters (step, tokens seen, FLOPs, non-finite steps), every process's RNG state, and the runs behind
the weights (training_history).
"""

from __future__ import annotations

import pickle
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

from data import Batches
from models.checkpoint import atomic_path

from .distributed import Dist
from .ema import EMA
from .errors import TrainingError


@dataclass
class Progress:
    """The counters a run carries from step to step and across restarts."""

    step: int = 0
    tokens_seen: int = 0
    flops: float = 0.0
    nonfinite_total: int = 0
    history: list[dict] | None = field(default_factory=list)  # None: a state.pt written before histories


@dataclass
class Parts:
    """The objects a training step changes: the (unwrapped) model, its optimizer, the loss scaler, the
    batches (their position in the data) and the EMA, if kept."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    ema: EMA | None
    batches: Batches


def atomic_torch_save(obj: object, path: Path) -> None:
    """torch.save to a temporary file in the same folder, fsync, rename: a kill never leaves half a file."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        torch.save(obj, f)


def _state_dict_options(full: bool, **kw):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=full, cpu_offload=full, **kw)


def gather_state(model, optimizer, fsdp: bool) -> tuple[dict, dict]:
    """Full (unsharded) model and optimizer state dicts; under FSDP only rank 0's are filled."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    return get_state_dict(model, optimizer, options=_state_dict_options(fsdp))


def restore_state(model, optimizer, model_sd: dict, optim_sd: dict, fsdp: bool) -> None:
    from torch.distributed.checkpoint.state_dict import set_state_dict

    opts = _state_dict_options(fsdp, broadcast_from_rank0=fsdp and dist.is_initialized())
    set_state_dict(model, optimizer, model_state_dict=model_sd, optim_state_dict=optim_sd, options=opts)


def save_state(path: Path, parts: Parts, progress: Progress, fsdp: bool, d: Dist) -> None:
    """Write state.pt; a collective: every process calls it, rank 0 writes."""
    model_sd, optim_sd = gather_state(parts.model, parts.optimizer, fsdp)
    rng = {"cpu": torch.get_rng_state(),
           "cuda": torch.cuda.get_rng_state(d.device) if d.device.type == "cuda" else None}
    ema_state = parts.ema.state_dict() if parts.ema is not None else None
    rngs = d.all_gather_object(rng)
    if fsdp and ema_state is not None:  # each process's EMA holds its own shards
        ema_state = d.all_gather_object(ema_state)
    if d.main:
        atomic_torch_save({"model": model_sd, "optimizer": optim_sd, "scaler": parts.scaler.state_dict(),
                           "data": parts.batches.state_dict(), "ema": ema_state, "step": progress.step,
                           "tokens_seen": progress.tokens_seen, "flops": progress.flops,
                           "nonfinite_total": progress.nonfinite_total, "rng": rngs, "history": progress.history},
                          path)
    d.barrier()


def load_state(path: Path) -> dict:
    """The contents of state.pt, read as tensors and plain data only (torch.load's weights_only): a file
    that holds any other object is refused, never unpickled (unpickling can run code stored in the file)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
        what = f" ({found.group(1)})" if found else ""
        raise TrainingError(f"--resume: {path} holds objects other than tensors and plain data{what}, which no "
                            "state.pt written by train.py does; it was not loaded, since unpickling it could run "
                            "code stored in it") from None
    except Exception as e:  # a torn or foreign file: torch raises RuntimeError, EOFError, KeyError, ...
        raise TrainingError(f"--resume: {path} cannot be read: the file is corrupt "
                            f"({type(e).__name__}: {e})") from None
    if not isinstance(state, dict):
        raise TrainingError(f"--resume: {path} is not a training state (it holds a {type(state).__name__})")
    return state


def resume_state(path: Path, parts: Parts, fsdp: bool, d: Dist) -> Progress:
    """Load state.pt into ``parts`` and this process's RNG; the counters to continue from."""
    if not path.is_file():
        raise TrainingError(f"--resume: {path} is missing (the run never reached a checkpoint)")
    state = load_state(path)
    restore_state(parts.model, parts.optimizer, state["model"], state["optimizer"], fsdp)
    parts.scaler.load_state_dict(state["scaler"])
    parts.batches.load_state_dict(state["data"])
    if parts.ema is not None:
        parts.ema.load_state_dict(state["ema"][d.rank] if fsdp else state["ema"])
    rng = state["rng"]
    if len(rng) == d.world:
        torch.set_rng_state(rng[d.rank]["cpu"])
        if d.device.type == "cuda" and rng[d.rank].get("cuda") is not None:
            torch.cuda.set_rng_state(rng[d.rank]["cuda"], d.device)
    return Progress(step=state["step"], tokens_seen=state["tokens_seen"], flops=state["flops"],
                    nonfinite_total=state["nonfinite_total"], history=state.get("history"))
