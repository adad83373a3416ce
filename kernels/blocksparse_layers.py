"""Layers on ``BlockSparseMatMul``: a linear layer and a 2-D convolution, sparse in blocks of features/channels.

Both store their weight compactly, [nnz, block, block], and initialise it as torch's dense layers do
(uniform in +-1/sqrt(fan_in)) with each output's *own* fan-in: (number of blocks feeding it) x block
(x kernel area for the convolution). The output variance then matches that of a dense layer whose fan-in
equals the sparse one, whatever the density.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .blocksparse import BSMM_BACKENDS, BlockSparseMatMul


def _check_features(name: str, n: object, block: int, blocks: int) -> int:
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"{name} must be a positive int, got {n!r}")
    if n % block:
        raise ValueError(f"{name}={n} is not a multiple of the block {block}")
    if n // block != blocks:
        raise ValueError(f"{name}={n} is {n // block} blocks of {block}, but the layout has {blocks} "
                         f"({'rows' if name.startswith('in') else 'columns'})")
    return n


def _check_backend(backend: str) -> str:
    if backend not in BSMM_BACKENDS:
        raise ValueError(f"backend must be one of {BSMM_BACKENDS}, got {backend!r}")
    return backend


def _pair(name: str, v: object) -> tuple[int, int]:
    pair = (v, v) if isinstance(v, int) else tuple(v) if isinstance(v, (tuple, list)) else ()
    if len(pair) != 2 or any(isinstance(p, bool) or not isinstance(p, int) for p in pair):
        raise ValueError(f"{name} must be an int or a pair of ints, got {v!r}")
    return pair


def _init_uniform(weight: torch.Tensor, bias: torch.Tensor | None, mm: BlockSparseMatMul) -> None:
    """U(-1/sqrt(fan_in), 1/sqrt(fan_in)) per output block, fan_in = (blocks feeding it) x block; the bias
    likewise (0 where nothing feeds the block)."""
    fan_in = mm.layout.sum(0).double() * mm.block
    bound = torch.where(fan_in > 0, fan_in.clamp(min=1).rsqrt(), torch.zeros_like(fan_in))
    with torch.no_grad():
        weight.uniform_(-1, 1).mul_(bound[mm.cols].to(weight.device, weight.dtype)[:, None, None])
        if bias is not None:
            bias.uniform_(-1, 1).mul_(bound.repeat_interleave(mm.block).to(bias.device, bias.dtype))


class BlockSparseLinear(nn.Module):
    """y = x @ W + b with W [in_features, out_features] sparse in ``block`` x ``block`` blocks.

    layout: 0/1 [in_features // block, out_features // block]. x [..., in_features] -> y [..., out_features].
    ``weight`` [nnz, block, block] (``BlockSparseMatMul`` order), ``bias`` [out_features].
    """

    def __init__(self, in_features: int, out_features: int, layout: object, block: int, bias: bool = True,
                 backend: str = "auto", device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.mm = BlockSparseMatMul(layout, block)
        self.in_features = _check_features("in_features", in_features, block, self.mm.in_blocks)
        self.out_features = _check_features("out_features", out_features, block, self.mm.out_blocks)
        self.backend = _check_backend(backend)
        self.weight = nn.Parameter(torch.empty(self.mm.w_shape, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.empty(out_features, device=device, dtype=dtype)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        _init_uniform(self.weight, self.bias, self.mm)

    def dense_weight(self) -> torch.Tensor:
        """W [in_features, out_features], zeros outside the layout (differentiable)."""
        return self.mm.to_dense(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.mm(x, self.weight, backend=self.backend)
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, block={self.mm.block}, "
                f"density={self.mm.density:.4g}, bias={self.bias is not None}, backend={self.backend!r}")


class BlockSparseConv2d(nn.Module):
    """A 2-D convolution whose channels connect in blocks: input channel block i feeds output channel
    block j only when layout[i, j]; every kernel position of a connected pair is kept.

    layout: 0/1 [in_channels // block, out_channels // block]. x [N, in_channels, H, W] ->
    y [N, out_channels, H', W'] (channels-last memory). It runs as one ``BlockSparseMatMul`` over the
    input patches, whose layout is ``layout`` repeated for each kernel position (kh * kw row bands).
    ``weight`` [kh * kw * nnz, block, block]: kernel position (row-major) first, then the layout's order.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int | tuple[int, int], layout: object,
                 block: int, stride: int | tuple[int, int] = 1, padding: int | tuple[int, int] = 0,
                 dilation: int | tuple[int, int] = 1, bias: bool = True, backend: str = "auto",
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        base = BlockSparseMatMul(layout, block)
        self.in_channels = _check_features("in_channels", in_channels, block, base.in_blocks)
        self.out_channels = _check_features("out_channels", out_channels, block, base.out_blocks)
        self.kernel_size = _pair("kernel_size", kernel_size)
        self.stride, self.padding, self.dilation = (_pair(n, v) for n, v in
                                                    (("stride", stride), ("padding", padding), ("dilation", dilation)))
        if min(self.kernel_size) < 1 or min(self.stride) < 1 or min(self.dilation) < 1 or min(self.padding) < 0:
            raise ValueError("kernel_size, stride and dilation must be >= 1 and padding >= 0")
        self.backend = _check_backend(backend)
        self.area = self.kernel_size[0] * self.kernel_size[1]
        self.mm = BlockSparseMatMul(base.layout.repeat(self.area, 1), block)
        self.weight = nn.Parameter(torch.empty(self.mm.w_shape, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.empty(out_channels, device=device, dtype=dtype)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        _init_uniform(self.weight, self.bias, self.mm)  # the kernel area is in the layout

    def dense_weight(self) -> torch.Tensor:
        """[out_channels, in_channels, kh, kw] as torch's conv2d takes it, zeros between unconnected blocks."""
        kh, kw = self.kernel_size
        dense = self.mm.to_dense(self.weight)  # [(kh, kw, in_channels), out_channels]
        return dense.view(kh, kw, self.in_channels, self.out_channels).permute(3, 2, 0, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.shape[1] != self.in_channels:
            got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"x must be [N, in_channels={self.in_channels}, H, W], got {got}")
        n, _, h, w = x.shape
        (kh, kw), (sh, sw), (ph, pw), (dh, dw) = self.kernel_size, self.stride, self.padding, self.dilation
        oh = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1
        ow = (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1
        if oh < 1 or ow < 1:
            raise ValueError(f"input {h}x{w} is smaller than the kernel {kh}x{kw} (dilation {dh}x{dw}, padding "
                             f"{ph}x{pw})")
        patches = F.unfold(x, self.kernel_size, self.dilation, self.padding, self.stride)  # [N, C * kh * kw, L]
        patches = patches.view(n, self.in_channels, self.area, -1).permute(0, 3, 2, 1)  # [N, L, kh * kw, C]
        y = self.mm(patches.reshape(n * oh * ow, self.area * self.in_channels), self.weight, backend=self.backend)
        if self.bias is not None:
            y = y + self.bias
        return y.view(n, oh, ow, self.out_channels).permute(0, 3, 1, 2)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, dilation={self.dilation}, block={self.mm.block}, "
                f"density={self.mm.density:.4g}, bias={self.bias is not None}, backend={self.backend!r}")

