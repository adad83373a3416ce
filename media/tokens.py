"""Tokens shared by images and audio: the vocabulary (one byte per token) and the token-array check."""

from __future__ import annotations

import numpy as np
import torch

VOCAB = 256  # every token is one byte: a colour channel's value or a mu-law level


def as_token_array(tokens: object, name: str = "tokens") -> np.ndarray:
    """numpy/torch integer tokens in 0..255 -> uint8 numpy array (same shape)."""
    if isinstance(tokens, torch.Tensor):
        if tokens.dtype.is_floating_point or tokens.dtype.is_complex or tokens.dtype == torch.bool:
            raise ValueError(f"{name} must be an integer tensor with values 0..255, got dtype {tokens.dtype}")
        tokens = tokens.detach().cpu().numpy()
    if not isinstance(tokens, np.ndarray):
        raise ValueError(f"{name} must be a numpy array or torch tensor of integers 0..255, "
                         f"got {type(tokens).__name__}")
    if tokens.dtype == np.uint8:
        return tokens
    if not np.issubdtype(tokens.dtype, np.integer):
        raise ValueError(f"{name} must hold integers 0..255, got dtype {tokens.dtype}")
    if tokens.size and (tokens.min() < 0 or tokens.max() > VOCAB - 1):
        raise ValueError(f"{name} values must be in 0..{VOCAB - 1}, got range {tokens.min()}..{tokens.max()}")
    return tokens.astype(np.uint8)
