"""Layer norm over the last dimension: [..., d] -> [..., d].

Training on the CPU runs it in kernels/cpu_kernels.c (norm_forward / norm_backward, one pass over the rows each):
under bfloat16 autocast it writes its output in bfloat16 straight away, the dtype the linear layers after it
cast to, where PyTorch's layer norm writes float32 and the cast is one more pass (docs/benchmarks.md,
Training). Elsewhere, and wherever no gradient is needed, it is ``F.layer_norm``, so that evaluation and
sampling stay bit for bit what they were.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import cpu_kernels
from .activations import COMPILED_DTYPES

ROWS_PER_ITEM = 64  # rows a thread item; the backward's partial sums of dw and db come one per item


class CompiledLayerNorm(torch.autograd.Function):
    """Layer norm of a contiguous float32 CPU tensor x [..., d] with weight and bias [d] (float32), output in
    ``dtype`` (float32 or bfloat16), through the compiled kernels."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float,
                dtype: torch.dtype) -> torch.Tensor:
        d = x.shape[-1]
        rows = x.numel() // d
        y = torch.empty(x.shape, dtype=dtype)
        mean, rstd = torch.empty(rows), torch.empty(rows)
        cpu_kernels.check(cpu_kernels.library().norm_forward(
            x.data_ptr(), weight.data_ptr(), bias.data_ptr(), y.data_ptr(), mean.data_ptr(), rstd.data_ptr(), rows,
            ROWS_PER_ITEM, d, eps, COMPILED_DTYPES[dtype], torch.get_num_threads()))
        ctx.save_for_backward(x, weight, mean, rstd)
        return y

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x, weight, mean, rstd = ctx.saved_tensors
        d = x.shape[-1]
        rows = x.numel() // d
        dy = dy.contiguous()
        dx = torch.empty_like(x)
        dwb = torch.empty(-(-rows // ROWS_PER_ITEM), 2, d)
        cpu_kernels.check(cpu_kernels.library().norm_backward(
            dy.data_ptr(), x.data_ptr(), weight.data_ptr(), mean.data_ptr(), rstd.data_ptr(), dx.data_ptr(),
            dwb.data_ptr(), rows, ROWS_PER_ITEM, d, COMPILED_DTYPES[dy.dtype], torch.get_num_threads()))
        dw, db = dwb.sum(0)
        return dx, dw, db, None, None


def _output_dtype() -> torch.dtype:
    """What the compiled layer norm writes: bfloat16 under CPU bfloat16 autocast, else float32."""
    if torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16:
        return torch.bfloat16
    return torch.float32


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
    """Layer norm of ``x`` [..., d] over d, with ``weight`` and ``bias`` [d]: the compiled kernels where a CPU
    gradient is coming (their output in bfloat16 under bfloat16 autocast), else ``F.layer_norm``."""
    d = x.shape[-1]
    grad = torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad or bias.requires_grad)
    if (grad and x.device.type == "cpu" and x.dtype == weight.dtype == bias.dtype == torch.float32
            and x.is_contiguous() and weight.shape == bias.shape == (d,) and x.numel() > 0
            and (vector := cpu_kernels.vector_floats()) and d % vector == 0):
        return CompiledLayerNorm.apply(x, weight, bias, eps, _output_dtype())
    return F.layer_norm(x, (d,), weight, bias, eps)


class LayerNorm(nn.LayerNorm):
    """``nn.LayerNorm`` (same parameters and state dict) through :func:`layer_norm` where it normalizes the last
    dimension with a weight and a bias; other shapes and settings are nn.LayerNorm's own."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if len(self.normalized_shape) != 1 or self.weight is None or self.bias is None:
            return super().forward(x)
        return layer_norm(x, self.weight, self.bias, self.eps)
