"""The arithmetic a run trains in: bf16 or fp16 autocast (fp16 with dynamic loss scaling), or fp32."""

from __future__ import annotations

import contextlib
import sys

import torch

from models.flops import device_peak_flops

from .distributed import Dist

PRECISIONS = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}
# --precision auto takes bf16 on a CPU only where its matmuls run at least this many times fp32's: much below
# that, autocast's casts cost more than the matmuls save. On a 2-core AMD EPYC with AVX512-BF16 they ran 2.0x
# fp32's and the 16-layer image64 trained 1.4x faster in bf16 (4,600-4,700 tokens/s against 3,200-3,300), so
# 2.0 itself would leave the choice to noise there.
BF16_CPU_SPEEDUP = 1.5
PROBES = 2  # each dtype measured this many times, in turn, the best kept: a burst of other work does not decide


def choose_precision(device: torch.device) -> tuple[str, str]:
    """``--precision auto``: (precision, why) for training on ``device``.

    CUDA: bf16 where the GPU runs it natively, else fp16. CPU: bf16 where a measured bf16 matmul runs
    at least ``BF16_CPU_SPEEDUP`` times fp32's (native bf16: AMX or AVX512-BF16), else fp32; without
    native support torch emulates bf16 matmuls, 100x or more slower than fp32. Each is measured ``PROBES``
    times, alternating, and its best taken.
    """
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported(including_emulation=False):
            return "bf16", f"{torch.cuda.get_device_name(device)} runs bf16 natively"
        return "fp16", f"{torch.cuda.get_device_name(device)} has no native bf16"
    bf16 = fp32 = 0.0
    for _ in range(PROBES):
        bf16 = max(bf16, device_peak_flops(device, torch.bfloat16)[0])
        fp32 = max(fp32, device_peak_flops(device, torch.float32)[0])
    speeds = f"bf16 matmuls at {bf16 / 1e9:,.0f} GFLOP/s, fp32 at {fp32 / 1e9:,.0f} on this CPU"
    if bf16 >= BF16_CPU_SPEEDUP * fp32:
        return "bf16", speeds
    return "fp32", speeds


def settle_precision(s: dict, d: Dist) -> str:
    """Replace ``s["precision"]`` "auto" by a choice (the first process's, on every process); how it was set."""
    if s["precision"] != "auto":
        return "set by --precision or the resumed run"
    s["precision"], how = choose_precision(d.device)
    # every process must run the same precision: the first one's (index into PRECISIONS)
    choice = d.all_reduce(torch.tensor([list(PRECISIONS).index(s["precision"]) if d.main else 0], device=d.device))
    s["precision"] = list(PRECISIONS)[int(choice)]
    if d.main and not s["quiet"]:
        print(f"--precision auto: {s['precision']} ({how})", file=sys.stderr)
    return how


def autocast(device: torch.device, precision: str):
    """The forward pass's context for ``precision`` (bf16, fp16 or fp32) on ``device``."""
    dtype = PRECISIONS[precision]
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)
