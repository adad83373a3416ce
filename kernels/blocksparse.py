"""``BlockSparseMatMul``: y = x @ W for a weight W that is sparse in blocks (OpenAI blocksparse's API).

The weight is stored compactly as w [nnz, block, block], the non-zero blocks of the layout in row-major
order: W[i*b:(i+1)*b, j*b:(j+1)*b] = w[k] for the k-th True entry (i, j) of the layout. Inputs are checked
once here, then one backend runs forward and backward:
  * "triton": CUDA (or Triton's interpreter with TRITON_INTERPRET=1), kernels/blocksparse_triton.py;
  * "cpu": gathered blocks and batched matmuls in PyTorch, kernels/blocksparse_cpu.py;
  * "reference": x @ to_dense(w), the definition the others are tested against;
  * "auto": "triton" on CUDA tensors, else "cpu".
"""

from __future__ import annotations

from functools import cached_property
from types import ModuleType

import torch
from torch.autograd.function import once_differentiable

from . import blocksparse_cpu
from .blocksparse_layouts import as_layout

BSMM_BACKENDS = ("auto", "triton", "cpu", "reference")
BSMM_BLOCKS = (8, 16, 32, 64)
BSMM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


class BlockSparseMatMul:
    """x [..., in_features] @ W [in_features, out_features], W sparse in ``block`` x ``block`` blocks.

    layout: 0/1 array [in_features // block, out_features // block]; layout[i, j] = 1 when input block i
      feeds output block j. block: 8, 16, 32 or 64.
    ``w_shape`` = (nnz, block, block), the weight's shape; ``bsmm(x, w)`` computes the product and is
    differentiable in x and w (w's gradient has the listed blocks only).
    """

    def __init__(self, layout: object, block: int) -> None:
        if isinstance(block, bool) or not isinstance(block, int) or block not in BSMM_BLOCKS:
            raise ValueError(f"block must be one of {BSMM_BLOCKS}, got {block!r}")
        self.layout = as_layout(layout)
        self.block = block
        self.in_blocks, self.out_blocks = self.layout.shape
        self.in_features, self.out_features = self.in_blocks * block, self.out_blocks * block
        nz = self.layout.nonzero()  # row-major: the weight's block order
        self.rows, self.cols = nz[:, 0].contiguous(), nz[:, 1].contiguous()
        self.nnz = self.rows.numel()
        self.w_shape = (self.nnz, block, block)
        self._device_tables: dict[str, tuple[torch.Tensor, ...]] = {}

    @property
    def density(self) -> float:
        """Share of the blocks that are non-zero."""
        return self.nnz / self.layout.numel()

    def __repr__(self) -> str:
        return (f"BlockSparseMatMul(in_features={self.in_features}, out_features={self.out_features}, "
                f"block={self.block}, nnz={self.nnz}, density={self.density:.4g})")

    # --- dense <-> compact ------------------------------------------------------------------------------

    def to_dense(self, w: torch.Tensor) -> torch.Tensor:
        """w [nnz, block, block] -> W [in_features, out_features] (zeros outside the layout); differentiable."""
        self._check_weight(w)
        b = self.block
        dense = w.new_zeros(self.in_blocks, self.out_blocks, b, b).index_put((self.rows, self.cols), w)
        return dense.permute(0, 2, 1, 3).reshape(self.in_features, self.out_features)

    def from_dense(self, weight: torch.Tensor) -> torch.Tensor:
        """W [in_features, out_features] -> w [nnz, block, block]: the layout's blocks (the rest is dropped)."""
        if not isinstance(weight, torch.Tensor) or tuple(weight.shape) != (self.in_features, self.out_features):
            got = tuple(weight.shape) if isinstance(weight, torch.Tensor) else type(weight).__name__
            raise ValueError(f"weight must be a tensor [{self.in_features}, {self.out_features}], got {got}")
        b = self.block
        blocks = weight.reshape(self.in_blocks, b, self.out_blocks, b).permute(0, 2, 1, 3)
        return blocks[self.rows.to(weight.device), self.cols.to(weight.device)].contiguous()

    # --- the product ------------------------------------------------------------------------------------

    def __call__(self, x: torch.Tensor, w: torch.Tensor, backend: str = "auto") -> torch.Tensor:
        """x [..., in_features] @ W -> y [..., out_features] in x's dtype (float32, bfloat16 or float16).

        w: [nnz, block, block] (``w_shape``), x's dtype and device. backend: one of BSMM_BACKENDS.
        """
        if backend not in BSMM_BACKENDS:
            raise ValueError(f"backend must be one of {BSMM_BACKENDS}, got {backend!r}")
        if not isinstance(x, torch.Tensor):
            raise ValueError(f"x must be a torch.Tensor [..., {self.in_features}], got {type(x).__name__}")
        if x.dim() == 0 or x.shape[-1] != self.in_features:
            raise ValueError(f"x must be [..., in_features={self.in_features}] (the layout's "
                             f"{self.in_blocks} input blocks x block {self.block}), got shape {tuple(x.shape)}")
        if x.dtype not in BSMM_DTYPES:
            raise ValueError(f"x has dtype {x.dtype}; supported: float32, bfloat16, float16")
        self._check_weight(w)
        if w.dtype != x.dtype:
            raise ValueError(f"x and w must have the same dtype, got {x.dtype} and {w.dtype}")
        if w.device != x.device:
            raise ValueError(f"x and w must be on the same device, got {x.device} and {w.device}")
        if backend == "auto":
            backend = "triton" if x.device.type == "cuda" else "cpu"
        if backend == "triton":  # triton is optional: imported when asked for
            try:
                from . import blocksparse_triton, triton_attention
            except ImportError as exc:
                raise ValueError(f"backend='triton' needs triton installed ({exc})") from exc
            # compiled kernels for CUDA tensors, interpreted ones for CPU tensors, or why not
            triton_attention.launch_mode(x.device, blocksparse_triton.INTERPRETED)
        if backend == "cpu" and x.device.type != "cpu":
            raise ValueError(f"backend='cpu' needs CPU tensors, got device {x.device}")
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        # The kernels choose their own compute precision: autocast must not recast inside.
        with torch.autocast(x.device.type, enabled=False):
            if backend == "reference":
                y = x2.float() @ self.to_dense(w).float()
                y = y.to(x.dtype)
            else:
                y = _BlockSparseMatMulFn.apply(x2, w, self, backend)
        return y.reshape(*lead, self.out_features)

    def _check_weight(self, w: object) -> None:
        if not isinstance(w, torch.Tensor):
            raise ValueError(f"w must be a torch.Tensor of shape w_shape={self.w_shape}, got {type(w).__name__}")
        if tuple(w.shape) != self.w_shape:
            raise ValueError(f"w has shape {tuple(w.shape)} but the layout has {self.nnz} non-zero blocks of "
                             f"{self.block} x {self.block}: w_shape={self.w_shape}")
        if w.dtype not in BSMM_DTYPES:
            raise ValueError(f"w has dtype {w.dtype}; supported: float32, bfloat16, float16")

    # --- backend plans ----------------------------------------------------------------------------------

    @cached_property
    def cpu_plan(self) -> blocksparse_cpu.CpuPlan:
        """The CPU backend's groups (built on first use)."""
        return blocksparse_cpu.cpu_plan(self.rows, self.cols, self.in_blocks, self.out_blocks, self.block)

    def device_tables(self, device: torch.device) -> tuple[torch.Tensor, ...]:
        """int32 lists on ``device`` for the Triton kernels: per output block (col_ptr, col_rows, col_ids), per
        input block (row_ptr, row_cols, row_ids), and per weight block (rows, cols)."""
        key = str(device)
        if key not in self._device_tables:
            by_col = torch.argsort(self.cols, stable=True)
            col_ptr = torch.cumsum(torch.bincount(self.cols, minlength=self.out_blocks), 0)
            row_ptr = torch.cumsum(torch.bincount(self.rows, minlength=self.in_blocks), 0)
            zero = torch.zeros(1, dtype=torch.long)
            tables = (torch.cat([zero, col_ptr]), self.rows[by_col], by_col,
                      torch.cat([zero, row_ptr]), self.cols, torch.arange(self.nnz), self.rows, self.cols)
            self._device_tables[key] = tuple(t.to(device=device, dtype=torch.int32) for t in tables)
        return self._device_tables[key]


def _backend(name: str) -> ModuleType:
    """The module of a backend: forward(x, w, plan) -> (y, saved), backward(dy, saved, w, plan, dx?, dw?)."""
    if name == "cpu":
        return blocksparse_cpu
    from . import blocksparse_triton  # Triton is imported only when its backend runs

    return blocksparse_triton


def _plan(mm: BlockSparseMatMul, name: str, device: torch.device) -> object:
    """What the backend's kernels read: the CPU plan, or the Triton kernels' lists on ``device``."""
    return mm.cpu_plan if name == "cpu" else mm.device_tables(device)


class _BlockSparseMatMulFn(torch.autograd.Function):
    """Autograd over one backend's forward(x, w, plan) -> (y, saved) and backward(dy, saved, w, plan, ...)."""

    @staticmethod
    def forward(ctx, x, w, mm: BlockSparseMatMul, backend: str):
        impl = _backend(backend)
        y, saved = impl.forward(x, w, _plan(mm, backend, x.device))
        ctx.save_for_backward(saved, w)
        ctx.mm, ctx.backend = mm, backend
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        saved, w = ctx.saved_tensors
        impl = _backend(ctx.backend)
        plan = _plan(ctx.mm, ctx.backend, dy.device)
        dx, dw = impl.backward(dy, saved, w, plan, *ctx.needs_input_grad[:2])
        return dx, dw, None, None
