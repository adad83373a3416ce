"""Compute accounting: model FLOPs per sequence, PF-days, and the device's peak for MFU.

Model FLOPs follow the paper's method: 6 x (parameters in matrix multiplies) x tokens
for a training step (forward 2, backward 4), plus the attention FLOPs of the blocks
the kernels compute (forward 4 x d x computed scores per head: QK^T and PV; training
3x that). Embedding tables are lookups and cost no FLOPs. Recompute is not counted
(it is overhead, not model work), so MFU is comparable across recompute settings.
"""

from __future__ import annotations

import time

import torch

from .model import ModelConfig

PF_DAY = 1e15 * 86400

# Dense bf16 tensor-core peaks (FLOP/s) of common GPUs, from the vendors' data sheets.
GPU_PEAKS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12, "V100": 125e12,
             "4090": 165e12, "3090": 71e12}


def matmul_parameters(cfg: ModelConfig) -> int:
    """Parameters that take part in matrix multiplies (all linear weights and the lag inputs' d x K); a
    block-sparse feed-forward layer counts only its non-zero blocks."""
    d = cfg.d_model
    total = cfg.n_layers * (4 + 2 * cfg.ff_mult) * d * d + d * cfg.vocab + d * cfg.lag_inputs
    for layer in cfg.sparse_ff_layers:
        fc, proj = cfg.ff_layouts(layer)
        total += (int(fc.sum()) + int(proj.sum())) * cfg.ff_block**2 - 2 * cfg.ff_width * d
    return total


def attention_scores(cfg: ModelConfig, seq_len: int | None = None) -> int:
    """Score entries the kernels compute for one sequence, summed over layers, per head."""
    total = 0
    for layer in range(cfg.n_layers):
        lay = cfg.layout(layer, seq_len)
        total += lay.computed_scores() // lay.heads
    return total


def training_flops_per_sequence(cfg: ModelConfig, seq_len: int | None = None) -> float:
    """Model FLOPs of one training step on one sequence (forward + backward; the lag inputs' backward has no
    input gradient, so they count 4 FLOPs a weight and token, not 6)."""
    n = cfg.seq_len if seq_len is None else seq_len
    return (6.0 * matmul_parameters(cfg) - 2.0 * cfg.d_model * cfg.lag_inputs) * n \
        + 12.0 * cfg.d_model * attention_scores(cfg, n)


def pf_days(flops: float) -> float:
    return flops / PF_DAY


def device_peak_flops(device: torch.device | str, dtype: torch.dtype = torch.bfloat16) -> tuple[float, str]:
    """(peak FLOP/s, how it was obtained) for MFU.

    CUDA: the data-sheet dense peak of a known GPU, else a measured large matmul.
    CPU: no portable data sheet exists, so square matmuls in ``dtype`` on the threads torch uses,
    grown from 256 until one takes 20 ms (at most 4096), the best of 5 at each size, and the fastest
    size taken: an attainable peak; MFU against it is an upper bound of the true hardware utilisation.
    """
    device = torch.device(device)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, peak in GPU_PEAKS.items():
            if key in name:
                return peak, f"data sheet ({name}, dense bf16)"

    def seconds(n: int, repeats: int) -> float:
        a = torch.randn(n, n, device=device).to(dtype)
        b = torch.randn(n, n, device=device).to(dtype)
        best = float("inf")
        for _ in range(repeats):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            a @ b
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            best = min(best, time.perf_counter() - t0)
        return best

    # grow the matmul while one takes under 20 ms: a CPU without native bf16 runs bf16 at ~1 GFLOP/s,
    # where a fixed 1024^3 matmul would take seconds
    n, best, best_n = 256, 0.0, 256
    while True:
        t = seconds(n, 5)
        if 2 * n**3 / t > best:
            best, best_n = 2 * n**3 / t, n
        if n >= 4096 or t >= 0.02:
            break
        n *= 2
    return best, f"measured {best_n}x{best_n} {str(dtype).removeprefix('torch.')} matmul on {device.type}"
