"""Sampling from a trained model: KV caches, the PyTorch and compiled decoding steps, the sampler, and
media-level helpers (complete a 64x64 image, generate or continue audio)."""

from .completion import MediaProgress, complete_image, generate_audio
from .options import SamplingOptions, card_defaults, choose_tokens, resolve_options
from .sampler import MAX_SEED, Decoder, Progress, decoding_step, generate

__all__ = ["MAX_SEED", "Decoder", "MediaProgress", "Progress", "SamplingOptions", "card_defaults", "choose_tokens",
           "complete_image", "decoding_step", "generate", "generate_audio", "resolve_options"]
