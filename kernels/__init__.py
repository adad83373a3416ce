"""Block-sparse attention for the Sparse Transformer patterns: patterns, layouts, Triton and CPU kernels."""

from .attention import BACKENDS, attention
from .layout import BLOCK_SIZES, Layout, layout_of, make_layout
from .patterns import KINDS, PATTERNS, All, DecodeSlots, Fixed, Local, Pattern, Strided, make_pattern

__all__ = ["BACKENDS", "BLOCK_SIZES", "KINDS", "PATTERNS", "All", "DecodeSlots", "Fixed", "Layout", "Local", "Pattern",
           "Strided", "attention", "layout_of", "make_layout", "make_pattern"]
