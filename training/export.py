"""The shipped checkpoint at the end of a run (--export) and its card: data, compute, held-out bits/dim,
and training_history, the runs behind the weights (the --init checkpoint's, then this one)."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from data.loader import dataset_description
from models import LSTMConfig, ModelConfig, codec_card, save_model
from models.architectures import build_model
from models.checkpoint import round_weights
from models.flops import pf_days

from .distributed import Dist, full_tensor
from .ema import EMA
from .evaluation import held_out_bits
from .state import Progress

# The settings each training_history entry records besides its steps, layers and init
HISTORY_SETTINGS = ("lr", "warmup", "batch_size", "precision", "seed")


def export_checkpoint(model: torch.nn.Module, ema: EMA | None, s: dict, cfg: ModelConfig | LSTMConfig, d: Dist,
                      train_set, val_set, progress: Progress) -> str | None:
    """Write the shipped checkpoint (the EMA's weights if kept, stored as --export-dtype), with held-out bits/dim of
    exactly those weights; its card's training_history is ``progress.history`` (the runs before this one)
    followed by this run.
    A collective: every process calls it; rank 0 writes and gets the card's path, the others None."""
    params = shipped_params(model, ema)
    path = None
    if d.main:
        plain = build_model(cfg)
        with torch.no_grad():
            for dst, src in zip(plain.parameters(), params, strict=True):
                dst.copy_(src.to("cpu", dst.dtype))
        round_weights(plain, s["export_dtype"])  # the held-out bits are those of the weights as stored
        plain.to(d.device)
        bits = held_out_bits(plain, val_set, s, Dist(0, 1, 0, d.device), shard=False)
        card = export_card(s, cfg, d.world, train_set, val_set, progress, bits)
        path = str(save_model(plain.cpu(), Path(s["checkpoints"]) / s["export"], card,
                              weights_dtype=s["export_dtype"]))
        print(f"exported {path} (held-out {bits:.3f} bits/dim)", file=sys.stderr)
    d.barrier()
    return path


def shipped_params(model: torch.nn.Module, ema: EMA | None) -> list[torch.Tensor]:
    """The whole weights to ship: the EMA's if kept and updated, else the model's (gathered from FSDP shards; a
    collective)."""
    if ema is None or not ema.updates:
        return [full_tensor(p.detach()) for p in model.parameters()]
    averaged = ema.averaged()
    if any(hasattr(p, "full_tensor") for p in model.parameters()):  # FSDP: the EMA holds local shards
        from torch.distributed.tensor import DTensor

        return [DTensor.from_local(e, p.device_mesh, p.placements, shape=p.shape, stride=p.stride()).full_tensor()
                for e, p in zip(averaged, model.parameters(), strict=True)]
    return averaged


def export_card(s: dict, cfg: ModelConfig | LSTMConfig, processes: int, train_set, val_set, progress: Progress,
                bits: float) -> dict:
    """The exported model's card (save_model adds the config, parameters and weights' hash)."""
    return {
        "codec": codec_card(s["kind"]),
        "data": {"path": str(s["data"]), "reader": type(train_set).__name__, "train_items": len(train_set),
                 "val_items": len(val_set), "skipped_files": getattr(train_set, "skipped", 0),
                 **data_card(s["data"])},
        "steps": progress.step, "tokens_seen": progress.tokens_seen, "compute_pf_days": pf_days(progress.flops),
        "held_out_bits_per_dim": bits, "held_out_items": min(s["eval_items"], len(val_set)),
        "ema_decay": s["ema"] or None,
        "training": {k: s[k] for k in ("config", "init", "batch_size", "window", "lr", "warmup", "steps", "precision",
                                       "weight_decay", "clip", "seed", "recompute", "arch", "tbptt")}
                    | {"processes": processes},
        "training_history": [*progress.history, run_record(s, cfg, progress.step, processes)],
    }


def run_record(s: dict, cfg: ModelConfig | LSTMConfig, step: int, processes: int) -> dict:
    """This run's entry in a card's training_history: the steps it took and the settings it took them with."""
    return {"steps": step, "schedule_steps": s["steps"], "layers": cfg.n_layers, "init": s["init"],
            "threads": torch.get_num_threads(), "processes": processes,
            **{k: s[k] for k in HISTORY_SETTINGS}, **({"window": s["window"]} if s.get("window") else {})}


def earlier_runs(card: dict) -> list[dict]:
    """The runs that made an --init checkpoint, oldest first, for the next run's training_history to continue:
    its card's own history, or one entry from its steps and settings for a card written before histories."""
    if "training_history" in card:
        return list(card["training_history"])
    training = card.get("training") or {}
    return [{"steps": card.get("steps"), "schedule_steps": training.get("steps"),
             "layers": card["config"].get("n_layers"),
             **{k: training[k] for k in ("init", *HISTORY_SETTINGS) if k in training}}]


def data_card(path: str) -> dict:
    """The data set's name, sources and licences from the dataset.json its builder wrote (if any)."""
    description = dataset_description(path) or {}
    return {k: description[k] for k in ("name", "sources", "licences") if k in description}
