"""Sparse Transformer models: config, model, named configs, checkpoints and cards, compute accounting."""

from .checkpoint import CheckpointError, card_kind, check_card, load_card, load_model, model_kind, save_model
from .configs import CONFIGS, codec_card, config_for
from .model import ModelConfig, SparseTransformer

__all__ = ["CONFIGS", "CheckpointError", "ModelConfig", "SparseTransformer", "card_kind", "check_card", "codec_card",
           "config_for", "load_card", "load_model", "model_kind", "save_model"]
