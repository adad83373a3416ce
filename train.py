"""Train a Sparse Transformer (or, with --arch lstm, the sparse LSTM baseline) on 64x64 images or raw audio.

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
import logging
import os
import sys

import training
from models import CONFIGS
from models.checkpoint import WEIGHTS_DTYPES
from training import PRECISIONS, TrainingError


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
    m.add_argument("--seq-len", type=int, help="audio only: the model's sequence, in samples (default 65,536)")
    m.add_argument("--ff-layout", choices=("dense", "random", "banded"),
                   help="block-sparse feed-forward layers from a layout recipe (default dense); sparse-wide at "
                   "the dense parameters and FLOPs: --ff-mult 8 --ff-layout random --ff-density 0.5")
    m.add_argument("--ff-density", type=float, help="share of the feed-forward weight blocks kept, in (0, 1]")
    m.add_argument("--ff-block", type=int, help="feed-forward weight block size: 8, 16, 32 or 64 (default 32; "
                   "the compiled decoding step needs 16 or more)")
    m.add_argument("--ff-seed", type=int, help="seed of the random feed-forward layouts (default 0)")
    m.add_argument("--ff-layers", help="comma-separated layers whose feed-forward is sparse (default all)")
    m.add_argument("--lag-inputs", type=int, metavar="K", help="add to each position's input a learned linear map "
                   "of the values of the K tokens before it (audio: mu-law amplitudes; default 0: none)")
    a = p.add_argument_group("architecture: --arch lstm trains the sparse LSTM baseline (models/lstm.py) with "
                             "--layers, --block, --seq-len and these flags instead of the transformer's")
    a.add_argument("--arch", choices=("transformer", "lstm"), help="model family (default transformer)")
    a.add_argument("--hidden", type=int, help="LSTM units per layer (default 512)")
    a.add_argument("--density", type=float, help="share of non-zero weight blocks, in (0, 1]; 1 = dense (default)")
    a.add_argument("--lstm-layout", choices=("ws", "ba"), help="small-world layout: Watts-Strogatz (default) or "
                   "Barabasi-Albert")
    a.add_argument("--layout-seed", type=int, help="seed of the first layout (default 0)")
    a.add_argument("--multiplicative", action="store_true", help="multiplicative LSTM (mLSTM)")
    a.add_argument("--tbptt", type=int, help="tokens per chunk of truncated backpropagation through time; the "
                   "state is carried, detached, across a sequence's chunks (default 1024)")
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
    o.add_argument("--window", type=int, help="audio only: train on windows of this many samples (default: the "
                   "model's --seq-len), each placed at a random offset of the model's sequence; many more steps per "
                   "token early in training, while the model still samples its whole --seq-len")
    o.add_argument("--seed", type=int)
    o.add_argument("--val-fraction", type=float, help="share of a folder's files held out for evaluation, in [0, 1) "
                   "(default 0.05; ImageNet-64 npz data has its own val files)")
    o.add_argument("--fsdp", action="store_true", help="shard the model with torch's FSDP (fully_shard)")
    o.add_argument("--init", metavar="CHECKPOINT", help="start from this exported checkpoint's weights and config "
                   "(e.g. checkpoints/image64) with a fresh optimizer and schedule; its tokens and compute "
                   "count towards this run's totals; with --layers N above its own, it is deepened to N layers first "
                   "(new blocks start as copies of the top block of their kind with zeroed output projections, "
                   "so the run starts from the same function); --lag-inputs K adds zeroed lag inputs to a model "
                   "without them")
    r = p.add_argument_group("run control")
    r.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    r.add_argument("--stop-after", type=int, help="stop (with a checkpoint) after this many steps of this call")
    r.add_argument("--stop-minutes", type=float, help="stop (with a checkpoint, then --export) after the step that "
                   "passes this many minutes of this call: for equal-time comparisons")
    r.add_argument("--export", metavar="NAME", help="write CHECKPOINTS/NAME.safetensors + .json at the end")
    r.add_argument("--export-dtype", choices=tuple(WEIGHTS_DTYPES), help="how --export stores the weights: "
                   "bfloat16 takes half the bytes (the model still computes in float32; the card's held-out bits "
                   "are those of the rounded weights) (default float32)")
    r.add_argument("--checkpoints", help="folder for --export (default checkpoints)")
    r.add_argument("--eval-every", type=int, help="held-out bits/dim every K steps (default 100; 0 = off: then, "
                   "without --export, the data needs no held-out split)")
    r.add_argument("--eval-items", type=int, help="held-out sequences per evaluation (default 64)")
    r.add_argument("--save-every", type=int, help="checkpoint every K steps (default 100)")
    r.add_argument("--save-minutes", type=float, help="and at least every M minutes (default 10)")
    r.add_argument("--device", choices=("auto", "cpu", "cuda"))
    r.add_argument("--threads", type=int, help="CPU threads per process (default: cores / processes)")
    r.add_argument("--max-nonfinite", type=int, help="stop after this many non-finite steps in a row (default 5)")
    r.add_argument("--peak-tflops", type=float, help="device peak for MFU (default: data sheet or measured)")
    r.add_argument("--quiet", action="store_true", help="no progress bar")
    return p.parse_args(argv)


def train(argv: list[str] | None = None) -> dict:
    """Run training; returns a summary (step, tokens_seen, last loss, held-out bits/dim, export path)."""
    return training.train(vars(parse_args(argv)))


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
