"""Named model configs per data kind: ``config_for("image", "image-cpu")``."""

from __future__ import annotations

import dataclasses

from media.audio import AUDIO_TOKENS, SAMPLE_RATE
from media.image import IMAGE_TOKENS

from .model import ModelConfig

KINDS = ("image", "audio")
IMAGE_FACTORS = (64, 64, 3)  # row, column, channel
AUDIO_STRIDE = 256

# Sizes only; the data kind fills in seq_len, stride and the position factors.
CONFIGS: dict[str, dict] = {
    # For tests: runs a step in well under a second.
    "tiny": dict(n_layers=2, d_model=64, n_heads=2, block=32),
    # The 6M-parameter config of bench/train.py (d=256, 8 layers, 4 heads).
    "small": dict(n_layers=8, d_model=256, n_heads=4, block=32),
    # Sized to learn as much as possible in about 2 hours of a 2-core CPU: 2.8M parameters at about
    # 5,700 tokens/s (bf16, recompute) see about 40M tokens in 2 hours, ~15 tokens per parameter,
    # near the compute-optimal ratio (measured with bench/train.py; see README).
    "image-cpu": dict(n_layers=6, d_model=192, n_heads=3, block=32),
    "audio-cpu": dict(n_layers=6, d_model=192, n_heads=3, block=32),
    # The paper's ImageNet 64x64 model (152M, 48 layers, d=512, 16 heads, stride 128, dropout 0.01)
    # and its 65,536-sample audio model (152M); for users with GPUs.
    "imagenet64-paper": dict(n_layers=48, d_model=512, n_heads=16, dropout=0.01, stride=128, block=64),
    "audio-paper": dict(n_layers=48, d_model=512, n_heads=16, dropout=0.01, block=64),
}


def config_for(kind: str, name: str = "tiny", **overrides) -> ModelConfig:
    """The named config ``name`` for data ``kind`` ("image" or "audio"), with field overrides.

    Images: 12,288 tokens, stride 192 (one image row) unless the config names another,
    position factors (row, column, channel). Audio: 65,536 samples by default (``seq_len``
    may be overridden), stride 256, position factors (row, column) of a [N / 256, 256] matrix.
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if name not in CONFIGS:
        raise ValueError(f"unknown config {name!r}; named configs: {sorted(CONFIGS)}")
    fields = dict(CONFIGS[name])
    if kind == "image":
        if overrides.get("seq_len", IMAGE_TOKENS) != IMAGE_TOKENS:
            raise ValueError(f"image models see whole 64x64x3 images: seq_len is {IMAGE_TOKENS}")
        fields.setdefault("stride", 192)
        fields.update(seq_len=IMAGE_TOKENS, pos_factors=IMAGE_FACTORS)
    else:
        fields.setdefault("stride", AUDIO_STRIDE)
        fields["seq_len"] = overrides.get("seq_len", AUDIO_TOKENS)
    fields.update({k: v for k, v in overrides.items() if v is not None})
    if kind == "audio" and "pos_factors" not in overrides:
        stride = fields["stride"]
        fields["pos_factors"] = (-(-fields["seq_len"] // stride), stride)
    try:
        return ModelConfig(**fields)
    except TypeError as e:  # an unknown field name
        known = [f.name for f in dataclasses.fields(ModelConfig)]
        raise ValueError(f"{e}; config fields: {known}") from None


def codec_card(kind: str) -> dict:
    """How tokens map to media for ``kind``: recorded in every model card."""
    if kind == "image":
        return {"kind": "image", "height": 64, "width": 64, "channels": 3,
                "order": "raster rows, then columns, channel innermost (RGB)", "tokens": IMAGE_TOKENS}
    if kind == "audio":
        return {"kind": "audio", "sample_rate": SAMPLE_RATE, "channels": 1, "encoding": "8-bit mu-law (mu=255)"}
    raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
