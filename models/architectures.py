"""The model families a checkpoint can hold, by the card's ``architecture`` field (absent: the Sparse
Transformer, so cards written before the field existed load unchanged): config class, model class, FLOPs."""

from __future__ import annotations

from torch import nn

from . import flops, lstm
from .lstm import LSTMConfig, SparseLSTM
from .model import ModelConfig, SparseTransformer

TRANSFORMER = "sparse-transformer"
ARCHITECTURES: dict[str, tuple[type, type[nn.Module]]] = {
    TRANSFORMER: (ModelConfig, SparseTransformer),
    lstm.ARCHITECTURE: (LSTMConfig, SparseLSTM),
}
Config = ModelConfig | LSTMConfig
Model = SparseTransformer | SparseLSTM


def architecture_of(card: dict) -> str:
    """The card's architecture (a key of ARCHITECTURES); ValueError naming the known ones otherwise."""
    name = card.get("architecture", TRANSFORMER)
    if name not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {name!r}; known: {sorted(ARCHITECTURES)}")
    return name


def config_from_card(card: dict) -> Config:
    """The model config a card holds, of its architecture's config class (ValueError/TypeError if invalid)."""
    return ARCHITECTURES[architecture_of(card)][0].from_dict(card["config"])


def architecture_name(cfg: Config) -> str:
    """The architecture of a config: what a card records for it."""
    for name, (config_class, _) in ARCHITECTURES.items():
        if isinstance(cfg, config_class):
            return name
    raise ValueError(f"not a model config: {type(cfg).__name__}")


def build_model(cfg: Config) -> Model:
    """A freshly initialised model of ``cfg``'s architecture."""
    return ARCHITECTURES[architecture_name(cfg)][1](cfg)


def training_flops_per_sequence(cfg: Config, seq_len: int | None = None) -> float:
    """Model FLOPs of one training step on one sequence (models/flops.py for the transformer, models/lstm.py
    for the LSTM)."""
    if isinstance(cfg, LSTMConfig):
        return lstm.training_flops_per_sequence(cfg, seq_len)
    return flops.training_flops_per_sequence(cfg, seq_len)
