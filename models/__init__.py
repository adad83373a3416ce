"""Sparse Transformer models and the sparse LSTM baseline: configs, models, named configs, checkpoints and cards,
compute accounting."""

from .architectures import ARCHITECTURES, build_model, config_from_card
from .checkpoint import CheckpointError, card_kind, check_card, load_card, load_model, model_kind, save_model
from .configs import CONFIGS, codec_card, config_for
from .lstm import LSTMConfig, LSTMState, SparseLSTM
from .model import ModelConfig, SparseTransformer

__all__ = ["ARCHITECTURES", "CONFIGS", "CheckpointError", "LSTMConfig", "LSTMState", "ModelConfig", "SparseLSTM",
           "SparseTransformer", "build_model", "card_kind", "check_card", "codec_card", "config_for",
           "config_from_card", "load_card", "load_model", "model_kind", "save_model"]
