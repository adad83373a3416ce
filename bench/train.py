"""Benchmark training throughput: tokens/s, seconds per 64x64 image, model FLOP utilisation.

Run: ``python -m bench.train [--quick] [--configs small,image-cpu,image-cpu:24] [--batch B] [--repeats R]``; on a
GPU machine ``python -m bench.train --gpu-only`` runs the GPU row alone.
Prints a table; the LAST line printed is one line of JSON with the figures.

A config is a named image config, or NAME:LAYERS for it at another depth (image-cpu:24 is the shipped
image64's). Each row times full optimizer steps of training's pieces (forward, cross-entropy, backward,
AdamW, no data loading) on --batch 64x64x3 images (12,288 tokens each; default 1) per step: the median of
--repeats steps after one warm-up step. Settings per row: autocast dtype and whether each
residual block is recomputed in the backward pass (torch.utils.checkpoint).
MFU = model FLOPs per step (models/flops.py: 6 x matmul parameters x tokens + attention
FLOPs of the computed blocks; recompute not counted) / step time / peak. The CPU peak is
measured (best of large bf16 matmuls, see models.flops.device_peak_flops), so CPU MFU is
against an attainable peak, not a data sheet.
GPU (only when CUDA is available): the same for the paper's ImageNet-64 config, batch 4, bf16 autocast,
recompute on (its attention runs the Triton kernels); MFU against the data-sheet dense bf16 peak.
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F

from bench.common import CpuContention, cpu_name, fmt, median_time, print_table, sig
from models import ModelConfig, SparseTransformer, config_for
from models.flops import device_peak_flops, matmul_parameters, training_flops_per_sequence
from training import autocast, keep_freed_memory, make_optimizer

CPU_VARIANTS = (("bf16", True), ("bf16", False), ("fp32", True))
GPU_CONFIG, GPU_BATCH = "imagenet64-paper", 4


def config_of(spec: str) -> ModelConfig:
    """"NAME" or "NAME:LAYERS" -> that named image config (at LAYERS layers); ValueError otherwise."""
    name, colon, layers = spec.partition(":")
    if colon and not (layers.isdigit() and int(layers) > 0):
        raise ValueError(f"config {spec!r}: the layers after ':' must be a positive whole number")
    return config_for("image", name, **({"n_layers": int(layers)} if layers else {}))


def step_time(name: str, precision: str, recompute: bool, batch: int, device: torch.device, repeats: int) -> dict:
    """Median seconds of one training step of config ``name`` (see :func:`config_of`) on ``batch`` random images."""
    cfg = config_of(name)
    torch.manual_seed(0)
    model = SparseTransformer(cfg).to(device)
    model.recompute = recompute
    optimizer = make_optimizer(model, 3e-4, 0.01)
    tokens = torch.randint(0, 256, (batch, cfg.seq_len), device=device)

    def step() -> None:
        with autocast(device, precision):
            logits = model(tokens)
        F.cross_entropy(logits.float().flatten(0, 1), tokens.flatten()).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    seconds = median_time(step, repeats)
    flops = training_flops_per_sequence(cfg) * batch
    return {"config": name, "precision": precision, "recompute": recompute, "batch": batch,
            "params_m": model.num_parameters() / 1e6, "matmul_params_m": matmul_parameters(cfg) / 1e6,
            "seconds_per_step": seconds, "tokens_per_s": batch * cfg.seq_len / seconds,
            "seconds_per_image": seconds / batch, "tflops": flops / seconds / 1e12}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="one timed step per row, bf16 rows only")
    p.add_argument("--configs", default="small,image-cpu,image-cpu:24",
                   help="image configs to time on the CPU: names, or NAME:LAYERS at another depth")
    p.add_argument("--batch", type=int, default=1, help="images per CPU step, in one forward pass (default 1)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--gpu-only", action="store_true", help="only the GPU row (no CPU rows)")
    args = p.parse_args()
    if args.batch < 1:
        p.error(f"--batch must be >= 1, got {args.batch}")
    for spec in args.configs.split(","):
        try:
            config_of(spec)
        except ValueError as e:
            p.error(str(e))
    repeats = 1 if args.quick else args.repeats
    variants = CPU_VARIANTS[:2] if args.quick else CPU_VARIANTS
    cpu = torch.device("cpu")
    keep_freed_memory()  # as train.py does on the CPU
    rows, peak, busy = [], None, None
    if args.gpu_only:
        print("CPU rows: skipped (--gpu-only)")
    else:
        peak, how = device_peak_flops(cpu, torch.bfloat16)
        print(f"CPU: {cpu_name()}, {torch.get_num_threads()} threads, torch {torch.__version__}; "
              f"peak {peak / 1e9:.0f} GFLOP/s ({how})")
        contention = CpuContention()
        for name in args.configs.split(","):
            for precision, recompute in variants:
                r = step_time(name, precision, recompute, args.batch, cpu, repeats)
                r["mfu"] = r["tflops"] * 1e12 / peak
                rows.append(r)
        busy = contention.other_cores()
        print_table(f"Training step on the CPU ({args.batch} x 12,288 tokens per step)",
                    ["config", "params", "dtype", "recompute", "s/image", "tokens/s", "GFLOP/s", "MFU"],
                    [[r["config"], f"{r['params_m']:.1f}M", r["precision"], "yes" if r["recompute"] else "no",
                      fmt(r["seconds_per_image"], ".3f"), fmt(r["tokens_per_s"], ",.0f"),
                      fmt(r["tflops"] * 1e3, ".1f"), fmt(r["mfu"], ".1%")] for r in rows])
        if busy is not None:
            print(f"(other processes used {busy:.2f} cores on average while this ran)")
    gpu = []
    if torch.cuda.is_available():
        dev = torch.device("cuda")
        gpu_peak, gpu_how = device_peak_flops(dev, torch.bfloat16)
        r = step_time(GPU_CONFIG, "bf16", True, GPU_BATCH, dev, repeats)
        r["mfu"] = r["tflops"] * 1e12 / gpu_peak
        gpu.append(r)
        print_table(f"GPU: {torch.cuda.get_device_name(dev)} (peak {gpu_how})",
                    ["config", "batch", "tokens/s", "TFLOP/s", "MFU"],
                    [[r["config"], str(r["batch"]), fmt(r["tokens_per_s"], ",.0f"), fmt(r["tflops"], ".1f"),
                      fmt(r["mfu"], ".1%")]])
    else:
        print("\nGPU: none here (the paper's ImageNet-64 config is timed when CUDA is available)")
    keep = ("config", "precision", "recompute", "batch", "tokens_per_s", "seconds_per_image", "mfu")
    print(json.dumps({"cpu": cpu_name(), "cpu_peak_gflops": sig(peak / 1e9) if peak else None,
                      "other_cores_busy": sig(busy, 2),
                      "cpu_rows": [{k: sig(r[k]) if isinstance(r[k], float) else r[k] for k in keep} for r in rows],
                      "gpu_rows": [{k: sig(r[k]) if isinstance(r[k], float) else r[k] for k in keep} for r in gpu]}))


if __name__ == "__main__":
    main()
