"""The feed-forward's activation, GELU with the tanh approximation: [...] -> [...] of the same shape and dtype.

Training on the CPU runs it in kernels/cpu_kernels.c (gelu_forward / gelu_backward, one pass over memory each,
float32 or bfloat16), faster than PyTorch's tanh GELU there (docs/benchmarks.md, Training). Elsewhere, and
wherever no gradient is needed, it is ``F.gelu(x, approximate="tanh")``, so that evaluation and sampling stay
bit for bit what they were.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import cpu_kernels

COMPILED_DTYPES = {torch.float32: 0, torch.bfloat16: 1}  # dtype -> the kernels' bf16 flag


class CompiledGelu(torch.autograd.Function):
    """GELU (tanh) on a contiguous float32 or bfloat16 CPU tensor through the compiled kernels."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        out = torch.empty_like(x)
        cpu_kernels.check(cpu_kernels.library().gelu_forward(
            x.data_ptr(), out.data_ptr(), x.numel(), COMPILED_DTYPES[x.dtype], torch.get_num_threads()))
        ctx.save_for_backward(x)
        return out

    @staticmethod
    def backward(ctx, dy: torch.Tensor) -> torch.Tensor:
        (x,) = ctx.saved_tensors
        dy = dy.to(x.dtype).contiguous()
        dx = torch.empty_like(x)
        cpu_kernels.check(cpu_kernels.library().gelu_backward(
            dy.data_ptr(), x.data_ptr(), dx.data_ptr(), x.numel(), COMPILED_DTYPES[x.dtype],
            torch.get_num_threads()))
        return dx


def gelu(x: torch.Tensor) -> torch.Tensor:
    """GELU, tanh approximation, of ``x`` (any shape): the compiled kernels where a CPU gradient is coming."""
    if (x.requires_grad and torch.is_grad_enabled() and x.device.type == "cpu" and x.dtype in COMPILED_DTYPES
            and x.is_contiguous() and cpu_kernels.library() is not None):
        return CompiledGelu.apply(x)
    return F.gelu(x, approximate="tanh")
