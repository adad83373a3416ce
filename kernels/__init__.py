"""Block-sparse attention for the Sparse Transformer patterns: layouts, Triton and CPU kernels."""

from .attention import BACKENDS, attention, attention_decode
from .layout import BLOCK_SIZES, KINDS, Layout, make_layout

__all__ = ["BACKENDS", "BLOCK_SIZES", "KINDS", "Layout", "attention", "attention_decode", "make_layout"]
