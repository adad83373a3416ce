"""The public entry points ``attention`` and ``attention_from_qkv``: check their inputs once, then run one backend.

Decoding one position at a time reads the caches of sampling/kv_cache.py, not this function."""

from __future__ import annotations

import math

import torch

from .cpu_attention import cpu_attention, packed_attention, runs_packed
from .layout import Layout
from .reference import reference_attention

BACKENDS = ("auto", "triton", "cpu", "reference")
HEAD_DIMS = (32, 64, 128)
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
FP32_PRECISIONS = ("ieee", "tf32x3")


def _check_operand(name: str, x: object, ndim: int, shape_doc: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor {shape_doc}, got {type(x).__name__}")
    if x.dim() != ndim:
        raise ValueError(f"{name} must be {shape_doc}, got shape {tuple(x.shape)}")
    if x.dtype not in DTYPES:
        raise ValueError(f"{name} has dtype {x.dtype}; supported: float32, bfloat16, float16")
    return x


def _check_common(q: torch.Tensor, others: dict[str, torch.Tensor], layout: object, heads: int,
                  scale: float | None) -> float:
    """Checks of the operands against each other and the layout; returns the softmax scale."""
    for name, t in others.items():
        if t.dtype != q.dtype:
            raise ValueError(f"q and {name} must have the same dtype, got {q.dtype} and {t.dtype}")
        if t.device != q.device:
            raise ValueError(f"q and {name} must be on the same device, got {q.device} and {t.device}")
    d = q.shape[-1]
    if d not in HEAD_DIMS:
        raise ValueError(f"head dim D must be one of {HEAD_DIMS}, got {d}")
    if not isinstance(layout, Layout):
        raise ValueError(f"layout must be a kernels.Layout from make_layout, got {type(layout).__name__}")
    if layout.heads not in (1, heads):
        raise ValueError(f"layout was built for heads={layout.heads}, but the input has H={heads} heads "
                         "(build it with heads=H, or heads=1 to share it)")
    if scale is None:
        return 1.0 / math.sqrt(d)
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale <= 0:
        raise ValueError(f"scale must be a positive finite number, got {scale!r}")
    return float(scale)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: Layout, scale: float | None = None,
              backend: str = "auto", fp32_precision: str = "ieee") -> torch.Tensor:
    """Causal block-sparse self-attention following ``layout``; differentiable.

    q, k, v: [B, H, N, D], D in {32, 64, 128}, float32/bfloat16/float16, one device.
    scale: softmax scale, default 1/sqrt(D).
    backend: "auto" (Triton on CUDA, the CPU path on the CPU), "triton", "cpu", or
      "reference" (dense N x N masked softmax, for tests).
    fp32_precision: how the Triton backend multiplies fp32 inputs: "ieee" (exact fp32, CUDA cores; the
      default) or "tf32x3" (three tf32 tensor-core products, about fp32's accuracy). The CPU path and the
      reference always compute in fp32; 16-bit inputs use the tensor cores' native precision.
    Returns [B, H, N, D] in q's dtype.
    """
    scale, backend = _checked(q, k, v, layout, scale, backend, fp32_precision)
    # The kernels choose their own compute precision (fp32 accumulation): autocast must not recast inside.
    with torch.autocast(q.device.type, enabled=False):
        return _dispatch(q, k, v, layout, scale, backend, fp32_precision)


def attention_from_qkv(qkv: torch.Tensor, heads: int, layout: Layout, scale: float | None = None,
                       backend: str = "auto", fp32_precision: str = "ieee") -> torch.Tensor:
    """:func:`attention` from a qkv projection's output, in its layout; differentiable.

    qkv: [B, N, 3 H D], per position q, k and v in turn, each [H, D] (``nn.Linear(d, 3 d)``'s output);
    heads: H. The other arguments as :func:`attention`. Returns [B, N, H D] in qkv's dtype, ready for the
    output projection. On the CPU, where the compiled band kernels run the layout whole, q, k and v are
    never unpacked (kernels/cpu_attention.py PackedBand); elsewhere this is :func:`attention` on views.
    """
    if isinstance(heads, bool) or not isinstance(heads, int) or heads < 1:
        raise ValueError(f"heads must be a positive integer, got {heads!r}")
    qkv = _check_operand("qkv", qkv, 3, "of shape [B, N, 3 H D]")
    B, N, width = qkv.shape
    if width % (3 * heads):
        raise ValueError(f"qkv's last dimension ({width}) must be 3 x heads ({heads}) x the head dim")
    q, k, v = qkv.view(B, N, 3, heads, width // (3 * heads)).permute(2, 0, 3, 1, 4).unbind(0)  # each [B, H, N, D]
    scale, backend = _checked(q, k, v, layout, scale, backend, fp32_precision)
    if backend == "cpu" and runs_packed(qkv, layout, heads):
        with torch.autocast("cpu", enabled=False):
            return packed_attention(qkv, layout, scale, heads)
    with torch.autocast(q.device.type, enabled=False):
        y = _dispatch(q, k, v, layout, scale, backend, fp32_precision)
    return y.transpose(1, 2).reshape(B, N, width // 3)


def _checked(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: Layout, scale: float | None, backend: str,
             fp32_precision: str) -> tuple[float, str]:
    """All of :func:`attention`'s checks; (the softmax scale, the backend "auto" resolves to)."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if fp32_precision not in FP32_PRECISIONS:
        raise ValueError(f"fp32_precision must be one of {FP32_PRECISIONS}, got {fp32_precision!r}")
    shape_doc = "of shape [B, H, N, D]"
    q = _check_operand("q", q, 4, shape_doc)
    k = _check_operand("k", k, 4, shape_doc)
    v = _check_operand("v", v, 4, shape_doc)
    if k.shape != q.shape or v.shape != q.shape:
        raise ValueError("q, k and v must have the same shape [B, H, N, D] (causal self-attention: keys are "
                         f"the queries' own positions); got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    scale = _check_common(q, {"k": k, "v": v}, layout, q.shape[1], scale)
    if layout.seq_len != q.shape[2]:
        raise ValueError(f"layout was built for seq_len={layout.seq_len}, but the input has N={q.shape[2]}")
    if backend == "auto":
        backend = "triton" if q.device.type == "cuda" else "cpu"
    return scale, backend


def _dispatch(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: Layout, scale: float,
              backend: str, fp32_precision: str) -> torch.Tensor:
    if backend == "triton":
        try:
            from . import triton_attention
        except ImportError as exc:
            raise ValueError(f"backend='triton' needs triton installed ({exc})") from exc
        triton_attention.launch_mode(q.device)  # compiled for CUDA tensors, interpreted for CPU ones, or ValueError
        return triton_attention.triton_attention(q, k, v, layout, scale, fp32_precision)
    if backend == "cpu":
        if q.device.type != "cpu":
            raise ValueError(f"backend='cpu' needs CPU tensors, got device {q.device}")
        return cpu_attention(q, k, v, layout, scale)
    return reference_attention(q, k, v, layout, scale)
