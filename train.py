"""Train a Sparse Transformer on 64x64 images or raw audio.

One process:    python train.py image --data PATH --out runs/img [--config image-cpu] [--steps N]
Data parallel:  torchrun --nproc_per_node=N train.py image --data PATH --out runs/img  (DDP: gloo on
                CPU, NCCL on GPU; across nodes with torchrun's own --nnodes/--rdzv-endpoint)
Sharded:        add --fsdp to shard parameters, gradients and optimizer state (torch's fully_shard).
Resume:         the same command with --resume continues exactly where the last checkpoint left off.
Export:         --export NAME writes checkpoints/NAME.safetensors + NAME.json at the end of the run.
                Its card's training_history lists the runs behind the weights, oldest first: with --init,
                the --init card's runs, then this one. To promote the export over the --init checkpoint
                with its history: m = load_model("checkpoints/NAME"); save_model(m, "checkpoints/image64", m.card).

The run directory holds state.pt (the latest training state, written atomically),
run.json (the run's settings) and log.jsonl (one line per step and per evaluation).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

from data import Batches, eval_batches, open_dataset
from data.loader import dataset_description
from models import (
    CONFIGS,
    CheckpointError,
    SparseTransformer,
    codec_card,
    config_for,
    load_card,
    load_model,
    save_model,
)
from models.checkpoint import atomic_path
from models.completion import card_kind
from models.evaluate import sequence_bits
from models.flops import PF_DAY, device_peak_flops, pf_days, training_flops_per_sequence
from models.model import ModelConfig

# Settings a resumed run takes from its checkpoint; changing them would not continue the same run.
RUN_SETTINGS = dict(config=None, layers=None, width=None, heads=None, ff_mult=None, dropout=None, pattern=None,
                    layer_patterns=None, stride=None, block=None, seq_len=None, batch_size=8, micro_batch=1, lr=5e-4,
                    warmup=100, min_lr_ratio=0.1, weight_decay=0.01, clip=1.0, precision="auto", recompute=True,
                    ema=0.0, seed=0, fsdp=False, steps=1000, init=None)
# Settings of this invocation only.
CONTROL = dict(data=None, out=None, resume=False, stop_after=None, export=None, checkpoints="checkpoints",
               eval_every=100, eval_items=64, save_every=100, save_minutes=10.0, device="auto", threads=None,
               max_nonfinite=5, peak_tflops=None, quiet=False)
MODEL_FLAGS = dict(layers="n_layers", width="d_model", heads="n_heads", ff_mult="ff_mult", dropout="dropout",
                   pattern="pattern", layer_patterns="layer_patterns", stride="stride", block="block",
                   seq_len="seq_len")
PRECISIONS = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}
# --precision auto takes bf16 on a CPU only where its matmuls run at least this many times fp32's: below
# that, autocast's casts cost more than the matmuls save
BF16_CPU_SPEEDUP = 2.0
# The settings each training_history entry records besides its steps, layers and init
HISTORY_SETTINGS = ("lr", "warmup", "batch_size", "precision", "seed")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                argument_default=argparse.SUPPRESS)
    p.add_argument("kind", choices=("image", "audio"), help="what the model learns")
    p.add_argument("--data", help="ImageNet-64 npz file/folder, a folder of images, or a folder of audio files")
    p.add_argument("--out", help="run directory (checkpoint, settings, JSONL log)")
    m = p.add_argument_group("model (default config: image-cpu / audio-cpu)")
    m.add_argument("--config", choices=sorted(CONFIGS), help="named config; flags below override its fields")
    m.add_argument("--layers", type=int)
    m.add_argument("--width", type=int, help="d_model")
    m.add_argument("--heads", type=int)
    m.add_argument("--ff-mult", type=int)
    m.add_argument("--dropout", type=float)
    m.add_argument("--pattern", choices=("strided", "fixed", "all"))
    m.add_argument("--layer-patterns", help="comma-separated kind per layer (local, strided, fixed, all), "
                   "e.g. local,strided,local,all; overrides --pattern")
    m.add_argument("--stride", type=int)
    m.add_argument("--block", type=int)
    m.add_argument("--seq-len", type=int, help="audio only: samples per training window (default 65,536)")
    o = p.add_argument_group("optimisation")
    o.add_argument("--steps", type=int, help="total optimizer steps (default 1000)")
    o.add_argument("--batch-size", type=int, help="sequences per optimizer step, all processes (default 8)")
    o.add_argument("--micro-batch", type=int, help="sequences per forward pass per process (default 1); "
                   "gradients are accumulated to --batch-size")
    o.add_argument("--lr", type=float, help="peak learning rate (default 5e-4)")
    o.add_argument("--warmup", type=int, help="linear warmup steps, then cosine decay (default 100)")
    o.add_argument("--min-lr-ratio", type=float, help="final lr / peak lr (default 0.1)")
    o.add_argument("--weight-decay", type=float, help="AdamW weight decay on matrices (default 0.01)")
    o.add_argument("--clip", type=float, help="gradient norm clip (default 1.0)")
    o.add_argument("--precision", choices=("auto", *PRECISIONS),
                   help="autocast dtype (default auto: bf16 where this device runs it natively and fast, else "
                   "fp32 on a CPU and fp16 on a GPU; fp16 uses dynamic loss scaling)")
    o.add_argument("--no-recompute", dest="recompute", action="store_false",
                   help="keep activations instead of recomputing each block in the backward pass")
    o.add_argument("--ema", type=float, help="EMA decay of the weights, e.g. 0.999; exported if set (default off)")
    o.add_argument("--seed", type=int)
    o.add_argument("--fsdp", action="store_true", help="shard the model with torch's FSDP (fully_shard)")
    o.add_argument("--init", metavar="CHECKPOINT", help="start from this exported checkpoint's weights and config "
                   "(e.g. checkpoints/image64) with a fresh optimizer and schedule; its tokens and compute "
                   "count towards this run's totals; with --layers N above its own, it is deepened to N layers first "
                   "(new blocks start as copies of the top block of their kind with zeroed output projections, "
                   "so the run starts from the same function)")
    r = p.add_argument_group("run control")
    r.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    r.add_argument("--stop-after", type=int, help="stop (with a checkpoint) after this many steps of this call")
    r.add_argument("--export", metavar="NAME", help="write CHECKPOINTS/NAME.safetensors + .json at the end")
    r.add_argument("--checkpoints", help="folder for --export (default checkpoints)")
    r.add_argument("--eval-every", type=int, help="held-out bits/dim every K steps (default 100; 0 = off)")
    r.add_argument("--eval-items", type=int, help="held-out sequences per evaluation (default 64)")
    r.add_argument("--save-every", type=int, help="checkpoint every K steps (default 100)")
    r.add_argument("--save-minutes", type=float, help="and at least every M minutes (default 10)")
    r.add_argument("--device", choices=("auto", "cpu", "cuda"))
    r.add_argument("--threads", type=int, help="CPU threads per process (default: cores / processes)")
    r.add_argument("--max-nonfinite", type=int, help="stop after this many non-finite steps in a row (default 5)")
    r.add_argument("--peak-tflops", type=float, help="device peak for MFU (default: data sheet or measured)")
    r.add_argument("--quiet", action="store_true", help="no progress bar")
    return p.parse_args(argv)


class TrainingError(RuntimeError):
    """A run cannot start or continue; the message says why and what to do."""


# --- distributed set-up -----------------------------------------------------------------


@dataclass
class Dist:
    rank: int
    world: int
    local_rank: int
    device: torch.device

    @property
    def main(self) -> bool:
        return self.rank == 0

    def all_reduce(self, t: torch.Tensor, op=dist.ReduceOp.SUM) -> torch.Tensor:
        if self.world > 1:
            dist.all_reduce(t, op=op)
        return t

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()


def setup_distributed(device: str) -> Dist:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if device == "cuda" and not torch.cuda.is_available():
        raise TrainingError("--device cuda was asked for but CUDA is not available")
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    dev = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    return Dist(rank, world, local_rank, dev)


# --- settings ------------------------------------------------------------------------------


def resolve_settings(args: argparse.Namespace) -> dict:
    """Defaults < saved run settings (on --resume) < flags given now; model flags may not change on resume."""
    given = dict(vars(args))
    if given.get("resume") and given.get("precision") == "auto":
        del given["precision"]  # a resumed run keeps the precision it chose
    settings = {"kind": given["kind"], **RUN_SETTINGS, **CONTROL}
    settings.update(given)
    for key in ("data", "out"):
        if not settings[key]:
            raise TrainingError(f"--{key} is required")
    run_json = Path(settings["out"]) / "run.json"
    if settings["resume"]:
        if not run_json.is_file():
            raise TrainingError(f"--resume: no run to resume in {settings['out']} (no run.json)")
        saved = json.loads(run_json.read_text())
        if saved["kind"] != settings["kind"]:
            raise TrainingError(f"--resume: the run in {settings['out']} trains {saved['kind']}, "
                                f"not {settings['kind']}")
        for key in RUN_SETTINGS:
            saved.setdefault(key, RUN_SETTINGS[key])  # runs started before a setting existed
            if key in given and key != "steps" and given[key] != saved[key]:
                raise TrainingError(f"--resume: --{key.replace('_', '-')} was {saved[key]!r} in this run; "
                                    f"it cannot change to {given[key]!r} (start a new --out instead)")
            if key not in given:
                settings[key] = saved[key]
    elif (Path(settings["out"]) / "state.pt").exists():
        raise TrainingError(f"{settings['out']} already holds a run: pass --resume to continue it, or "
                            "choose another --out")
    if settings["init"] is not None:
        given_model = [f"--{k.replace('_', '-')}" for k in ("config", *MODEL_FLAGS)
                       if k != "layers" and given.get(k) is not None]
        if given_model and not settings["resume"]:
            raise TrainingError(f"--init takes the model from {settings['init']} (--layers may deepen it); "
                                f"drop {', '.join(given_model)}")
    if settings["config"] is None:
        settings["config"] = f"{settings['kind']}-cpu"
    positive = ("steps", "batch_size", "micro_batch", "eval_items", "save_every", "max_nonfinite")
    for key in positive:
        if settings[key] is None or settings[key] < 1:
            raise TrainingError(f"--{key.replace('_', '-')} must be >= 1, got {settings[key]}")
    if settings["lr"] <= 0 or settings["warmup"] < 0 or settings["clip"] <= 0 or settings["weight_decay"] < 0:
        raise TrainingError("--lr and --clip must be > 0, --warmup and --weight-decay >= 0")
    if not 0 <= settings["min_lr_ratio"] <= 1 or not 0 <= settings["ema"] < 1:
        raise TrainingError("--min-lr-ratio must be in [0, 1] and --ema in [0, 1)")
    if settings["stop_after"] is not None and settings["stop_after"] < 1:
        raise TrainingError(f"--stop-after must be >= 1, got {settings['stop_after']}")
    return settings


def model_config(s: dict):
    if s["init"] is not None:
        try:
            card = load_card(s["init"])
        except CheckpointError as e:
            raise TrainingError(f"--init: {e}") from None
        cfg = ModelConfig.from_dict(card["config"])
        if card_kind(card, cfg) != s["kind"]:
            raise TrainingError(f"--init: {s['init']} is not an {s['kind']} model")
        if s["layers"] is None or s["layers"] == cfg.n_layers:
            return cfg
        try:
            return cfg.deepened(s["layers"])
        except ValueError as e:
            raise TrainingError(f"--layers {s['layers']}: --init can only add layers to {s['init']} "
                                f"({cfg.n_layers} layers): {e}") from None
    overrides = {field: s[flag] for flag, field in MODEL_FLAGS.items() if s[flag] is not None}
    if "layer_patterns" in overrides:
        overrides["layer_patterns"] = tuple(k.strip() for k in overrides["layer_patterns"].split(","))
    if s["kind"] == "image" and "seq_len" in overrides:
        raise TrainingError("--seq-len is for audio; image models see whole 64x64x3 images (12,288 tokens)")
    try:
        return config_for(s["kind"], s["config"], **overrides)
    except ValueError as e:
        raise TrainingError(f"invalid model settings: {e}") from None


# --- optimisation pieces ---------------------------------------------------------------------


def lr_factor(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Linear warmup over ``warmup`` steps, then cosine decay to ``min_ratio`` at ``total``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def make_optimizer(model: torch.nn.Module, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW; weight decay on matrices only (not biases, norms, embeddings, the start vector)."""
    decay, rest = [], []
    for name, p in model.named_parameters():
        is_matrix = p.dim() == 2 and "emb" not in name
        (decay if is_matrix else rest).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), eps=1e-8)


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def _full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a (possibly FSDP-sharded) parameter; a collective under FSDP."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


class EMA:
    """Exponential moving average of the parameters (fp32, sharded like them under FSDP)."""

    def __init__(self, model: torch.nn.Module, decay: float) -> None:
        self.decay = decay
        self.names = [n for n, _ in model.named_parameters()]
        self.params = [_local(p.detach()).float().clone() for p in model.parameters()]

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        current = [_local(p.detach()).float() for p in model.parameters()]
        torch._foreach_lerp_(self.params, current, 1.0 - self.decay)

    def state_dict(self) -> dict:
        return {"decay": self.decay, "params": self.params}

    def load_state_dict(self, state: dict) -> None:
        for dst, src in zip(self.params, state["params"], strict=True):
            dst.copy_(src)


# --- checkpoints -------------------------------------------------------------------------------


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


# --- evaluation ---------------------------------------------------------------------------------


def held_out_bits(model: torch.nn.Module, val, s: dict, d: Dist, shard: bool) -> float:
    """Mean bits per token over the first ``eval_items`` validation sequences.

    shard: each process takes every world-th item (DDP / one process); FSDP needs every
    process in every forward, so there all evaluate all batches.
    """
    total = torch.zeros(2, dtype=torch.float64, device=d.device)
    rank, world = (d.rank, d.world) if shard else (0, 1)
    batches = eval_batches(val, s["micro_batch"], s["eval_items"], rank=rank, world_size=world)
    for bits in sequence_bits(model, batches, d.device, PRECISIONS[s["precision"]]):
        total[0] += bits.sum()
        total[1] += bits.numel() * val.seq_len
    if shard:
        d.all_reduce(total)
    return float(total[0] / total[1])


def choose_precision(device: torch.device) -> tuple[str, str]:
    """``--precision auto``: (precision, why) for training on ``device``.

    CUDA: bf16 where the GPU runs it natively, else fp16. CPU: bf16 where a measured bf16 matmul runs
    at least ``BF16_CPU_SPEEDUP`` times fp32's (native bf16: AMX or AVX512-BF16), else fp32; without
    native support torch emulates bf16 matmuls, 100x or more slower than fp32.
    """
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported(including_emulation=False):
            return "bf16", f"{torch.cuda.get_device_name(device)} runs bf16 natively"
        return "fp16", f"{torch.cuda.get_device_name(device)} has no native bf16"
    bf16, _ = device_peak_flops(device, torch.bfloat16)
    fp32, _ = device_peak_flops(device, torch.float32)
    speeds = f"bf16 matmuls at {bf16 / 1e9:,.0f} GFLOP/s, fp32 at {fp32 / 1e9:,.0f} on this CPU"
    if bf16 >= BF16_CPU_SPEEDUP * fp32:
        return "bf16", speeds
    return "fp32", speeds


def autocast(device: torch.device, precision: str):
    dtype = PRECISIONS[precision]
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


# --- the run ------------------------------------------------------------------------------------


class Log:
    """log.jsonl on rank 0; on resume, lines past the checkpoint's step are dropped (they get redone)."""

    def __init__(self, path: Path, enabled: bool, resume_step: int | None) -> None:
        self.path, self.enabled = path, enabled
        if enabled and resume_step is not None and path.exists():
            kept = [ln for ln in path.read_text().splitlines() if ln and json.loads(ln).get("step", 0) <= resume_step]
            path.write_text("".join(ln + "\n" for ln in kept))
        self.file = open(path, "a") if enabled else None

    def write(self, **record) -> None:
        if self.file:
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()

    def close(self) -> None:
        if self.file:
            self.file.close()


def train(argv: list[str] | None = None) -> dict:
    """Run training; returns a summary (step, tokens_seen, last loss, held-out bits/dim, export path)."""
    args = parse_args(argv)
    s = resolve_settings(args)
    d = setup_distributed(s["device"])
    try:
        return _train(s, d)
    finally:
        if d.world > 1 and dist.is_initialized():
            dist.destroy_process_group()


def _train(s: dict, d: Dist) -> dict:
    out = Path(s["out"])
    threads = s["threads"] or max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", d.world)))
    if d.device.type == "cpu":
        torch.set_num_threads(threads)
    if s["precision"] == "auto":
        s["precision"], precision_how = choose_precision(d.device)
        # every process must run the same precision: the first one's (index into PRECISIONS)
        choice = d.all_reduce(torch.tensor([list(PRECISIONS).index(s["precision"]) if d.main else 0],
                                           device=d.device))
        s["precision"] = list(PRECISIONS)[int(choice)]
        if d.main and not s["quiet"]:
            print(f"--precision auto: {s['precision']} ({precision_how})", file=sys.stderr)
    else:
        precision_how = "set by --precision or the resumed run"
    cfg = model_config(s)
    per_step = s["micro_batch"] * d.world
    if s["batch_size"] % per_step:
        raise TrainingError(f"--batch-size {s['batch_size']} must be a multiple of --micro-batch x processes "
                            f"= {s['micro_batch']} x {d.world}")
    accum = s["batch_size"] // per_step
    seq_kw = {"seq_len": cfg.seq_len} if s["kind"] == "audio" else {}
    try:
        train_set = open_dataset(s["kind"], s["data"], "train", **seq_kw)
        val_set = open_dataset(s["kind"], s["data"], "val", **seq_kw)
    except (ValueError, FileNotFoundError) as e:
        raise TrainingError(f"cannot read --data {s['data']}: {e}") from None
    if d.main:
        out.mkdir(parents=True, exist_ok=True)
        run = {k: s[k] for k in ("kind", *RUN_SETTINGS)}
        (out / "run.json").write_text(json.dumps({**run, "model": cfg.to_dict()}, indent=2) + "\n")

    torch.manual_seed(s["seed"])
    model = SparseTransformer(cfg)
    step, tokens_seen, flops_done, nonfinite_total, history = 0, 0, 0.0, 0, []
    if s["init"] is not None and not s["resume"]:
        try:
            source = load_model(s["init"])
        except CheckpointError as e:
            raise TrainingError(f"--init: {e}") from None
        tokens_seen = int(source.card.get("tokens_seen") or 0)
        flops_done = float(source.card.get("compute_pf_days") or 0.0) * PF_DAY
        history = earlier_runs(source.card)
        if source.cfg.n_layers < cfg.n_layers:
            if d.main:
                print(f"--init: {s['init']} deepened from {source.cfg.n_layers} to {cfg.n_layers} layers (new "
                      "blocks copy the top block of their kind, output projections zeroed)", file=sys.stderr)
            source = source.deepened(cfg.n_layers)
        model.load_state_dict(source.state_dict())
    model.recompute = s["recompute"]
    model.to(d.device)
    if s["fsdp"]:
        from torch.distributed.fsdp import fully_shard

        for block in model.blocks:
            fully_shard(block)
        fully_shard(model)
        net = model
    elif d.world > 1:
        from torch.nn.parallel import DistributedDataParallel

        net = DistributedDataParallel(model, device_ids=[d.device.index] if d.device.type == "cuda" else None)
    else:
        net = model
    optimizer = make_optimizer(model, s["lr"], s["weight_decay"])
    scaler = torch.amp.GradScaler(d.device.type, enabled=s["precision"] == "fp16")
    ema = EMA(model, s["ema"]) if s["ema"] > 0 else None
    batches = Batches(train_set, s["micro_batch"], seed=s["seed"], rank=d.rank, world_size=d.world)

    state_path = out / "state.pt"
    if s["resume"]:
        if not state_path.is_file():
            raise TrainingError(f"--resume: {state_path} is missing (the run never reached a checkpoint)")
        state = torch.load(state_path, map_location="cpu", weights_only=False)
        restore_state(model, optimizer, state["model"], state["optimizer"], s["fsdp"])
        scaler.load_state_dict(state["scaler"])
        batches.load_state_dict(state["data"])
        if ema is not None:
            ema.load_state_dict(state["ema"][d.rank] if s["fsdp"] else state["ema"])
        step, tokens_seen, flops_done = state["step"], state["tokens_seen"], state["flops"]
        nonfinite_total = state["nonfinite_total"]
        if "history" in state:
            history = state["history"]
        elif s["init"] is not None:  # a state.pt written before runs kept their history
            history = earlier_runs(load_card(s["init"]))
        rng = state["rng"]
        if len(rng) == d.world:
            torch.set_rng_state(rng[d.rank]["cpu"])
            if d.device.type == "cuda" and rng[d.rank].get("cuda") is not None:
                torch.cuda.set_rng_state(rng[d.rank]["cuda"], d.device)
        del state

    flops_per_seq = training_flops_per_sequence(cfg)
    if s["peak_tflops"]:
        peak, peak_how = s["peak_tflops"] * 1e12, "given by --peak-tflops"
    else:
        peak, peak_how = device_peak_flops(d.device, PRECISIONS[s["precision"]] or torch.float32)
    log = Log(out / "log.jsonl", d.main, step if s["resume"] else None)
    if d.main:
        log.write(event="start", step=step, world_size=d.world, device=str(d.device), threads=threads,
                  parameters=model.num_parameters(),
                  precision=s["precision"], precision_how=precision_how,
                  flops_per_sequence=flops_per_seq, peak_flops=peak, peak_how=peak_how, accum=accum,
                  train_items=len(train_set), val_items=len(val_set),
                  skipped_files=getattr(train_set, "skipped", 0) + getattr(val_set, "skipped", 0))

    stop = {"signal": None}

    def on_signal(signum, _frame):
        stop["signal"] = signum

    old_handlers = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}

    def save() -> None:
        model_sd, optim_sd = gather_state(model, optimizer, s["fsdp"])
        rng = {"cpu": torch.get_rng_state(),
               "cuda": torch.cuda.get_rng_state(d.device) if d.device.type == "cuda" else None}
        rngs = [None] * d.world
        ema_state = ema.state_dict() if ema is not None else None
        if d.world > 1:
            dist.all_gather_object(rngs, rng)
            if s["fsdp"] and ema is not None:
                emas = [None] * d.world
                dist.all_gather_object(emas, ema_state)
                ema_state = emas
        else:
            rngs = [rng]
        if d.main:
            atomic_torch_save({"model": model_sd, "optimizer": optim_sd, "scaler": scaler.state_dict(),
                               "data": batches.state_dict(), "ema": ema_state, "step": step,
                               "tokens_seen": tokens_seen, "flops": flops_done, "nonfinite_total": nonfinite_total,
                               "rng": rngs, "history": history}, state_path)
        d.barrier()

    bar = tqdm(total=s["steps"], initial=step, disable=s["quiet"] or not d.main, unit="step", dynamic_ncols=True)
    last_save, start_step, consecutive_bad = time.monotonic(), step, 0
    summary = {"step": step, "loss": None, "held_out_bits_per_dim": None}
    net.train()
    try:
        while step < s["steps"]:
            t0 = time.perf_counter()
            lr = s["lr"] * lr_factor(step, s["warmup"], s["steps"], s["min_lr_ratio"])
            for group in optimizer.param_groups:
                group["lr"] = lr
            loss_sum = torch.zeros((), dtype=torch.float64, device=d.device)
            for micro in range(accum):
                batch = next(batches).to(d.device)
                sync = micro == accum - 1
                ctx = contextlib.nullcontext()
                if d.world > 1 and not s["fsdp"] and not sync:
                    ctx = net.no_sync()
                elif s["fsdp"]:
                    net.set_requires_gradient_sync(sync)
                with ctx:
                    with autocast(d.device, s["precision"]):
                        logits = net(batch)
                    loss = F.cross_entropy(logits.float().flatten(0, 1), batch.flatten())
                    scaler.scale(loss / accum).backward()
                loss_sum += loss.detach().double()
            loss_mean = float(d.all_reduce(loss_sum) / (accum * d.world))
            scaler.unscale_(optimizer)
            grad_norm = float(_full(torch.nn.utils.clip_grad_norm_(model.parameters(), s["clip"])))
            finite = math.isfinite(loss_mean) and (math.isfinite(grad_norm) or s["precision"] == "fp16")
            if finite:
                scaler.step(optimizer)  # fp16: skipped by the scaler itself on an overflow
                consecutive_bad = 0
                if ema is not None:
                    ema.update(model)
            else:
                consecutive_bad += 1
                nonfinite_total += 1
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            tokens = s["batch_size"] * cfg.seq_len
            tokens_seen += tokens
            flops_done += flops_per_seq * s["batch_size"]
            dt = time.perf_counter() - t0
            record = dict(step=step, loss=loss_mean, bits_per_dim=loss_mean / math.log(2), lr=lr,
                          grad_norm=grad_norm, tokens_per_s=tokens / dt, seconds=dt, tokens_seen=tokens_seen,
                          pf_days=pf_days(flops_done), mfu=flops_per_seq * s["batch_size"] / dt / (peak * d.world))
            if not finite:
                record["event"] = "nonfinite"
                if d.main:
                    tqdm.write(f"step {step}: non-finite loss {loss_mean} / grad norm {grad_norm}: step skipped",
                               file=sys.stderr)
            log.write(**record)
            summary.update(step=step, loss=loss_mean)
            bar.update(1)
            bar.set_postfix(loss=f"{loss_mean:.3f}", bpd=f"{loss_mean / math.log(2):.3f}",
                            tok_s=f"{tokens / dt:,.0f}", refresh=False)
            if consecutive_bad >= s["max_nonfinite"]:
                raise TrainingError(f"{consecutive_bad} non-finite losses in a row (step {step}): stopping. The last "
                                    f"checkpoint in {out} is intact; try a lower --lr, --precision fp32, or "
                                    "check the data")
            if s["eval_every"] and step % s["eval_every"] == 0:
                bits = held_out_bits(model if not s["fsdp"] else net, val_set, s, d, shard=not s["fsdp"])
                summary["held_out_bits_per_dim"] = bits
                log.write(event="eval", step=step, held_out_bits_per_dim=bits, items=min(s["eval_items"],
                                                                                             len(val_set)))
            flags = torch.tensor([stop["signal"] is not None, time.monotonic() - last_save > 60 * s["save_minutes"]],
                                 dtype=torch.int32, device=d.device)
            d.all_reduce(flags, op=dist.ReduceOp.MAX)
            done_here = s["stop_after"] is not None and step - start_step >= s["stop_after"]
            if step % s["save_every"] == 0 or flags[1] or flags[0] or done_here or step == s["steps"]:
                save()
                last_save = time.monotonic()
            if flags[0] or done_here:
                break
    finally:
        bar.close()
        for sig, handler in old_handlers.items():
            signal.signal(sig, handler)
    summary["tokens_seen"] = tokens_seen
    if stop["signal"] is not None and d.main:
        print(f"stopped by signal {stop['signal']} at step {step}; resume with --resume", file=sys.stderr)
    if s["export"]:
        summary["export"] = export(model, ema, s, cfg, d, train_set, val_set, step, tokens_seen, flops_done,
                                   history)
    if d.main:
        log.write(event="end", **summary)
    log.close()
    return summary


def export(model, ema, s, cfg, d: Dist, train_set, val_set, step, tokens_seen, flops_done,
           history: list[dict]) -> str | None:
    """Write the shipped checkpoint (EMA weights if kept), with held-out bits/dim of exactly those weights;
    its card's training_history is ``history`` (the runs before this one) followed by this run."""
    if ema is None:
        params = [_full(p.detach()) for p in model.parameters()]
    elif any(hasattr(p, "full_tensor") for p in model.parameters()):  # FSDP: the EMA holds local shards
        from torch.distributed.tensor import DTensor

        params = [DTensor.from_local(e, p.device_mesh, p.placements, shape=p.shape, stride=p.stride()).full_tensor()
                  for e, p in zip(ema.params, model.parameters(), strict=True)]
    else:
        params = ema.params
    path = None
    if d.main:
        plain = SparseTransformer(cfg)
        with torch.no_grad():
            for dst, src in zip(plain.parameters(), params, strict=True):
                dst.copy_(src.to("cpu", dst.dtype))
        plain.to(d.device)
        solo = Dist(0, 1, 0, d.device)
        bits = held_out_bits(plain, val_set, s, solo, shard=False)
        card = {
            "codec": codec_card(s["kind"]),
            "data": {"path": str(s["data"]), "reader": type(train_set).__name__, "train_items": len(train_set),
                     "val_items": len(val_set), "skipped_files": getattr(train_set, "skipped", 0),
                     **data_card(s["data"])},
            "steps": step, "tokens_seen": tokens_seen, "compute_pf_days": pf_days(flops_done),
            "held_out_bits_per_dim": bits, "held_out_items": min(s["eval_items"], len(val_set)),
            "ema_decay": s["ema"] or None,
            "training": {k: s[k] for k in ("config", "init", "batch_size", "lr", "warmup", "steps", "precision",
                                           "weight_decay", "clip", "seed", "recompute")} | {"processes": d.world},
            "training_history": [*history, run_record(s, cfg, step, d.world)],
        }
        path = str(save_model(plain.cpu(), Path(s["checkpoints"]) / s["export"], card))
        print(f"exported {path} (held-out {bits:.3f} bits/dim)", file=sys.stderr)
    d.barrier()
    return path


def run_record(s: dict, cfg: ModelConfig, step: int, processes: int) -> dict:
    """This run's entry in a card's training_history: the steps it took and the settings it took them with."""
    return {"steps": step, "schedule_steps": s["steps"], "layers": cfg.n_layers, "init": s["init"],
            "threads": torch.get_num_threads(), "processes": processes,
            **{k: s[k] for k in HISTORY_SETTINGS}}


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


def main(argv: list[str] | None = None) -> int:
    if os.environ.get("RANK", "0") == "0":  # data readers report skipped files through logging
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        train(argv)
    except TrainingError as e:
        print(f"train.py: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
