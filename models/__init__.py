"""Sparse Transformer models: config, model, named configs, checkpoint I/O, compute accounting."""

from .checkpoint import CheckpointError, load_card, load_model, save_model
from .configs import CONFIGS, codec_card, config_for
from .model import ModelConfig, SparseTransformer

__all__ = ["CONFIGS", "CheckpointError", "ModelConfig", "SparseTransformer", "codec_card", "config_for", "load_card",
           "load_model", "save_model"]
