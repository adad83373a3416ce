"""Block-sparse kernels: attention for the Sparse Transformer patterns (patterns, layouts, Triton and CPU
kernels) and block-sparse weights (matmul, linear and conv layers, layouts)."""

from . import blocksparse_layouts
from .activations import gelu
from .attention import BACKENDS, attention, attention_from_qkv
from .blocksparse import BSMM_BACKENDS, BSMM_BLOCKS, BSMM_DTYPES, BlockSparseMatMul
from .blocksparse_layers import BlockSparseConv2d, BlockSparseLinear
from .blocksparse_layouts import average_path_length, small_world_ba, small_world_ws
from .blocksparse_layouts import banded as banded_layout
from .blocksparse_layouts import density as layout_density
from .blocksparse_layouts import from_dense as layout_from_dense
from .blocksparse_layouts import random as random_layout
from .layer_norm import LayerNorm, layer_norm
from .layout import BLOCK_SIZES, Layout, layout_of, make_layout
from .patterns import KINDS, PATTERNS, All, DecodeSlots, Fixed, Local, Pattern, Strided, make_pattern

__all__ = ["BACKENDS", "BLOCK_SIZES", "BSMM_BACKENDS", "BSMM_BLOCKS", "BSMM_DTYPES", "KINDS", "PATTERNS", "All",
           "BlockSparseConv2d", "BlockSparseLinear", "BlockSparseMatMul", "DecodeSlots", "Fixed", "LayerNorm", "Layout",
           "Local", "Pattern", "Strided", "attention", "attention_from_qkv", "average_path_length", "banded_layout",
           "blocksparse_layouts", "gelu", "layer_norm", "layout_density", "layout_from_dense", "layout_of",
           "make_layout", "make_pattern", "random_layout", "small_world_ba", "small_world_ws"]
