"""The training loop: set a run up, take its optimizer steps, evaluate and checkpoint on the way, export.

``train(given)`` is the whole run behind train.py: settings, processes, data, the model (fresh, from
--init, or resumed from state.pt), then steps until --steps, --stop-after or SIGINT/SIGTERM (each stop
with a checkpoint), and the export at the end. With --arch lstm the model is the sparse LSTM baseline, and
each sequence runs in chunks of --tbptt tokens, the state carried (detached) from one chunk to the next.
"""

from __future__ import annotations

import contextlib
import math
import signal
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

from data import Batches, open_dataset
from models import CheckpointError, LSTMConfig, ModelConfig, SparseLSTM, SparseTransformer, load_card, load_model
from models.architectures import build_model, training_flops_per_sequence
from models.checkpoint import remove_stale_temporaries
from models.flops import PF_DAY, device_peak_flops, pf_days

from .distributed import (
    Dist,
    close_distributed,
    cpu_threads,
    full_tensor,
    gradient_sync,
    setup_distributed,
    wrap_model,
)
from .ema import EMA
from .errors import TrainingError
from .evaluation import held_out_bits
from .export import earlier_runs, export_checkpoint
from .log import Log
from .memory import keep_freed_memory
from .optim import lr_factor, make_optimizer, set_lr
from .precision import PRECISIONS, autocast, settle_precision
from .settings import model_config, resolve_settings, save_run_settings, training_window
from .state import Parts, Progress, resume_state, save_state


def train(given: dict) -> dict:
    """Run training with the flags ``given`` (train.py's arguments; absent ones take their defaults, or the
    resumed run's); returns a summary (step, tokens_seen, last loss, held-out bits/dim, export path)."""
    s = resolve_settings(given)
    d = setup_distributed(s["device"])
    try:
        return run(s, d)
    finally:
        close_distributed(d)


RUN_FILES = ("state.pt", "run.json", "log.jsonl")  # what a run writes atomically in its --out folder


@dataclass
class Run:
    """One call's run: its settings, processes, model config, data, what trains, and how far it got."""

    s: dict
    d: Dist
    cfg: ModelConfig | LSTMConfig
    out: Path
    train_set: object
    val_set: object
    net: torch.nn.Module  # the model as the steps call it: itself, in DDP, or sharded by FSDP
    parts: Parts
    progress: Progress
    accum: int  # micro-batches per process per step
    window: int  # tokens per training sequence (--window, else the model's seq_len)
    flops_per_seq: float
    peak: float  # peak FLOP/s of one process's device, for MFU
    log: Log


@dataclass
class Stop:
    signum: int | None = None


def run(s: dict, d: Dist) -> dict:
    """Train (set up, resumed if asked) until the end or a stop; export if asked; the summary."""
    r = set_up(s, d)
    try:
        with stop_signals() as stop:
            summary = take_steps(r, stop)
        summary["tokens_seen"] = r.progress.tokens_seen
        if stop.signum is not None and d.main:
            print(f"stopped by signal {stop.signum} at step {r.progress.step}; resume with --resume", file=sys.stderr)
        if s["export"]:
            summary["export"] = export_checkpoint(r.parts.model, r.parts.ema, s, r.cfg, d, r.train_set, r.val_set,
                                                  r.progress)
        if d.main:
            r.log.write(event="end", **summary)
    finally:
        r.log.close()
    return summary


# --- setting up -----------------------------------------------------------------------------------


def set_up(s: dict, d: Dist) -> Run:
    """Everything a run needs before its first step; writes run.json and the log's start line."""
    out = Path(s["out"])
    threads = cpu_threads(s["threads"], d)
    if d.device.type == "cpu":
        keep_freed_memory()
    precision_how = settle_precision(s, d)
    cfg = model_config(s)
    accum = accumulation(s, d)
    window = training_window(s, cfg)
    train_set, val_set = open_data(s, cfg, window)
    if d.main:
        for p in remove_stale_temporaries(out, RUN_FILES):  # left by a run killed in the middle of a save
            print(f"removed {p}, a temporary file of a killed run", file=sys.stderr)
        save_run_settings(out, s, cfg)
    torch.manual_seed(s["seed"])
    model, progress = new_model(s, cfg, d)
    if isinstance(model, SparseTransformer):
        model.recompute = s["recompute"]
    model.to(d.device)
    net = wrap_model(model, s["fsdp"], d)
    parts = Parts(model=model, optimizer=make_optimizer(model, s["lr"], s["weight_decay"]),
                  scaler=torch.amp.GradScaler(d.device.type, enabled=s["precision"] == "fp16"),
                  ema=EMA(model, s["ema"]) if s["ema"] > 0 else None,
                  batches=batches(train_set, s, d))
    if s["resume"]:
        progress = resume_state(out / "state.pt", parts, s["fsdp"], d)
        if progress.history is None:  # a state.pt written before runs kept their history
            progress.history = earlier_runs(load_card(s["init"])) if s["init"] is not None else []
    flops_per_seq = training_flops_per_sequence(cfg, window)
    peak, peak_how = peak_flops(s, d)
    log = Log(out / "log.jsonl", d.main, progress.step if s["resume"] else None)
    if d.main:
        log.write(event="start", step=progress.step, world_size=d.world, device=str(d.device), threads=threads,
                  parameters=model.num_parameters(),
                  precision=s["precision"], precision_how=precision_how,
                  window=window, flops_per_sequence=flops_per_seq, peak_flops=peak, peak_how=peak_how, accum=accum,
                  train_items=len(train_set), val_items=len(val_set) if val_set is not None else 0,
                  skipped_files=getattr(train_set, "skipped", 0) + getattr(val_set, "skipped", 0))
    return Run(s, d, cfg, out, train_set, val_set, net, parts, progress, accum, window, flops_per_seq, peak, log)


def accumulation(s: dict, d: Dist) -> int:
    """Micro-batches each process runs per optimizer step to make up --batch-size."""
    per_step = s["micro_batch"] * d.world
    if s["batch_size"] % per_step:
        raise TrainingError(f"--batch-size {s['batch_size']} must be a multiple of --micro-batch x processes "
                            f"= {s['micro_batch']} x {d.world}")
    return s["batch_size"] // per_step


def open_data(s: dict, cfg: ModelConfig | LSTMConfig, window: int) -> tuple:
    """The training (sequences of ``window`` tokens) and validation (whole model sequences) sets of --data. The
    validation set is None when the run needs none (--eval-every 0 and no --export) and the data has none (e.g. a
    folder of 3 images)."""
    kw = {"seq_len": cfg.seq_len} if s["kind"] == "audio" else {}
    if s["val_fraction"] is not None:
        kw["val_fraction"] = s["val_fraction"]
    needs_val = s["eval_every"] > 0 or s["export"] is not None
    try:
        train_set = open_dataset(s["kind"], s["data"], "train", **{**kw, **({"seq_len": window} if kw else {})})
    except TypeError:  # a reader without val_fraction
        raise TrainingError(f"--val-fraction is for folders of images or audio files; --data {s['data']} holds its "
                            "own held-out files (ImageNet-64 npz val files)") from None
    except (ValueError, FileNotFoundError) as e:
        raise TrainingError(f"cannot read --data {s['data']}: {e}") from None
    try:
        val_set = open_dataset(s["kind"], s["data"], "val", **kw)
    except (ValueError, FileNotFoundError) as e:
        if needs_val:
            why = "--eval-every" if s["eval_every"] > 0 else "--export"
            raise TrainingError(f"cannot read --data {s['data']}: {e}. {why} needs held-out data: raise "
                                "--val-fraction, or pass --eval-every 0 (without --export)") from None
        val_set = None
    return train_set, val_set


def batches(train_set, s: dict, d: Dist) -> Batches:
    """This process's batches of the training set; a clear error when the set is smaller than one global batch."""
    try:
        return Batches(train_set, s["micro_batch"], seed=s["seed"], rank=d.rank, world_size=d.world)
    except ValueError as e:
        raise TrainingError(f"--data {s['data']}: {e} (--micro-batch {s['micro_batch']} x {d.world} "
                            "process(es)): add data, or lower --micro-batch") from None


def new_model(s: dict, cfg: ModelConfig | LSTMConfig, d: Dist) -> tuple[SparseTransformer | SparseLSTM, Progress]:
    """A new model of ``cfg``; on a new run with --init, holding --init's weights (deepened and given lag inputs
    if asked), with its tokens, compute and history counted in the progress."""
    model, progress = build_model(cfg), Progress()
    if s["init"] is None or s["resume"]:
        return model, progress
    try:
        source = load_model(s["init"])
    except CheckpointError as e:
        raise TrainingError(f"--init: {e}") from None
    progress.tokens_seen = int(source.card.get("tokens_seen") or 0)
    progress.flops = float(source.card.get("compute_pf_days") or 0.0) * PF_DAY
    progress.history = earlier_runs(source.card)
    if source.cfg.n_layers < cfg.n_layers:
        if d.main:
            print(f"--init: {s['init']} deepened from {source.cfg.n_layers} to {cfg.n_layers} layers (new "
                  "blocks copy the top block of their kind, output projections zeroed)", file=sys.stderr)
        source = source.deepened(cfg.n_layers)
    if cfg.lag_inputs != source.cfg.lag_inputs:
        if d.main:
            print(f"--init: {s['init']} given {cfg.lag_inputs} lag inputs (zeroed)", file=sys.stderr)
        source = source.with_lag_inputs(cfg.lag_inputs, cfg.token_values)
    model.load_state_dict(source.state_dict())
    return model, progress


def peak_flops(s: dict, d: Dist) -> tuple[float, str]:
    """This device's peak FLOP/s for MFU, and where the figure comes from."""
    if s["peak_tflops"]:
        return s["peak_tflops"] * 1e12, "given by --peak-tflops"
    return device_peak_flops(d.device, PRECISIONS[s["precision"]] or torch.float32)


@contextlib.contextmanager
def stop_signals() -> Iterator[Stop]:
    """While inside, SIGINT and SIGTERM are recorded (not raised): the run stops after its step, saved."""
    stop = Stop()

    def on_signal(signum, _frame):
        stop.signum = signum

    old_handlers = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield stop
    finally:
        for sig, handler in old_handlers.items():
            signal.signal(sig, handler)


# --- the steps ------------------------------------------------------------------------------------


def take_steps(r: Run, stop: Stop) -> dict:
    """Steps until --steps, --stop-after, --stop-minutes or a signal, evaluating and saving as asked; the summary
    so far."""
    s, d, p = r.s, r.d, r.progress
    bar = tqdm(total=s["steps"], initial=p.step, disable=s["quiet"] or not d.main, unit="step", dynamic_ncols=True)
    last_save, start_step, consecutive_bad = time.monotonic(), p.step, 0
    start_time = last_save
    summary = {"step": p.step, "loss": None, "held_out_bits_per_dim": None}
    r.net.train()
    try:
        while p.step < s["steps"]:
            record = take_step(r)
            report(r, record, bar)
            summary.update(step=p.step, loss=record["loss"])
            consecutive_bad = consecutive_bad + 1 if record.get("event") == "nonfinite" else 0
            if consecutive_bad >= s["max_nonfinite"]:
                raise TrainingError(f"{consecutive_bad} non-finite losses in a row (step {p.step}): stopping. The "
                                    f"last checkpoint in {r.out} is intact; try a lower --lr, --precision fp32, or "
                                    "check the data")
            if s["eval_every"] and p.step % s["eval_every"] == 0:
                summary["held_out_bits_per_dim"] = evaluate(r)
            signalled, overdue, out_of_time = agree_on_stop(r, stop, last_save, start_time)
            done_here = out_of_time or (s["stop_after"] is not None and p.step - start_step >= s["stop_after"])
            if p.step % s["save_every"] == 0 or overdue or signalled or done_here or p.step == s["steps"]:
                save_state(r.out / "state.pt", r.parts, p, s["fsdp"], d)
                last_save = time.monotonic()
            if signalled or done_here:
                break
    finally:
        bar.close()
    return summary


def take_step(r: Run) -> dict:
    """One optimizer step of --batch-size sequences at the schedule's learning rate, skipped if its loss or
    gradient is not finite; advances the progress; the step's log record."""
    s, d, p, parts = r.s, r.d, r.progress, r.parts
    t0 = time.perf_counter()
    lr = s["lr"] * lr_factor(p.step, s["warmup"], s["steps"], s["min_lr_ratio"])
    set_lr(parts.optimizer, lr)
    loss_mean = accumulate_gradients(r)
    parts.scaler.unscale_(parts.optimizer)
    grad_norm = float(full_tensor(torch.nn.utils.clip_grad_norm_(parts.model.parameters(), s["clip"])))
    finite = math.isfinite(loss_mean) and (math.isfinite(grad_norm) or s["precision"] == "fp16")
    if finite:
        parts.scaler.step(parts.optimizer)  # fp16: skipped by the scaler itself on an overflow
        if parts.ema is not None:
            parts.ema.update(parts.model)
    else:
        p.nonfinite_total += 1
    parts.scaler.update()
    parts.optimizer.zero_grad(set_to_none=True)
    p.step += 1
    tokens = s["batch_size"] * r.window
    p.tokens_seen += tokens
    p.flops += r.flops_per_seq * s["batch_size"]
    dt = time.perf_counter() - t0
    record = dict(step=p.step, loss=loss_mean, bits_per_dim=loss_mean / math.log(2), lr=lr, grad_norm=grad_norm,
                  tokens_per_s=tokens / dt, seconds=dt, tokens_seen=p.tokens_seen, pf_days=pf_days(p.flops),
                  mfu=r.flops_per_seq * s["batch_size"] / dt / (r.peak * d.world))
    if not finite:
        record["event"] = "nonfinite"
    return record


def accumulate_gradients(r: Run) -> float:
    """Forward and backward passes over this process's micro-batches of one step (gradients synchronised on
    the last); the step's mean loss over all processes."""
    s, d = r.s, r.d
    loss_sum = torch.zeros((), dtype=torch.float64, device=d.device)
    for micro in range(r.accum):
        batch = next(r.parts.batches).to(d.device)
        if isinstance(r.cfg, LSTMConfig):
            loss_sum += lstm_backward(r, batch, sync=micro == r.accum - 1)
            continue
        offset = window_offset(r, micro)
        with gradient_sync(r.net, s["fsdp"], d, sync=micro == r.accum - 1):
            with autocast(d.device, s["precision"]):
                logits = r.net(batch, flat=True, offset=offset)  # [B * N, vocab]: not a view (FSDP warns about those)
            loss = F.cross_entropy(logits.float(), batch.flatten())
            r.parts.scaler.scale(loss / r.accum).backward()
        loss_sum += loss.detach().double()
    return float(d.all_reduce(loss_sum) / (r.accum * d.world))


def window_offset(r: Run, micro: int) -> int:
    """Where micro-batch ``micro`` of this step sits in the model's sequence: 0 for whole sequences; for --window, a
    multiple of the config's window_offset_step drawn uniformly, from (seed, step, process, micro) so that a
    resumed run draws the same."""
    slots = (r.cfg.seq_len - r.window) // r.cfg.window_offset_step + 1
    if slots == 1:
        return 0
    draw = np.random.default_rng([r.s["seed"], r.progress.step, r.d.rank, micro]).integers(slots)
    return int(draw) * r.cfg.window_offset_step


def lstm_backward(r: Run, batch: torch.Tensor, sync: bool) -> torch.Tensor:
    """Truncated backpropagation through time over one micro-batch [B, N]: chunks of --tbptt tokens, each
    starting from the state the previous chunk ended in (detached); gradients are those of the mean loss over
    all N tokens, synchronised after the last chunk when ``sync``. Returns that loss (float64, detached)."""
    s, d = r.s, r.d
    chunks = batch.split(s["tbptt"], dim=1)
    state, total = None, torch.zeros((), dtype=torch.float64, device=d.device)
    for j, chunk in enumerate(chunks):
        with gradient_sync(r.net, s["fsdp"], d, sync=sync and j == len(chunks) - 1):
            with autocast(d.device, s["precision"]):
                logits, state = r.net(chunk, state, flat=True)
            loss = F.cross_entropy(logits.float(), chunk.flatten(), reduction="sum") / batch.numel()
            r.parts.scaler.scale(loss / r.accum).backward()
        state = state.detach()
        total += loss.detach().double()
    return total


def report(r: Run, record: dict, bar: tqdm) -> None:
    """A step's log line, progress bar, and a warning for a skipped step."""
    loss = record["loss"]
    if record.get("event") == "nonfinite" and r.d.main:
        tqdm.write(f"step {record['step']}: non-finite loss {loss} / grad norm {record['grad_norm']}: step skipped",
                   file=sys.stderr)
    r.log.write(**record)
    bar.update(1)
    bar.set_postfix(loss=f"{loss:.3f}", bpd=f"{loss / math.log(2):.3f}", tok_s=f"{record['tokens_per_s']:,.0f}",
                    refresh=False)


def evaluate(r: Run) -> float:
    """Held-out bits/dim now, logged."""
    s = r.s
    bits = held_out_bits(r.parts.model if not s["fsdp"] else r.net, r.val_set, s, r.d, shard=not s["fsdp"])
    r.log.write(event="eval", step=r.progress.step, held_out_bits_per_dim=bits,
                items=min(s["eval_items"], len(r.val_set)))
    return bits


def agree_on_stop(r: Run, stop: Stop, last_save: float, start_time: float) -> tuple[bool, bool, bool]:
    """(a signal came to any process, any process is past --save-minutes since the last save, any process is
    past --stop-minutes since this call's first step): every process takes the same decisions."""
    now, budget = time.monotonic(), r.s["stop_minutes"]
    flags = torch.tensor([stop.signum is not None, now - last_save > 60 * r.s["save_minutes"],
                          budget is not None and now - start_time > 60 * budget], dtype=torch.int32, device=r.d.device)
    r.d.all_reduce(flags, op=dist.ReduceOp.MAX)
    return bool(flags[0]), bool(flags[1]), bool(flags[2])
