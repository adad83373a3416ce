"""Sampling from a trained model: KV caches, the PyTorch and compiled decoding steps, the sampler, and
media-level helpers (complete a 64x64 image, generate or continue audio)."""

from .completion import MediaProgress, complete_image, generate_audio
from .options import SamplingOptions, choose_tokens
from .sampler import MAX_SEED, Decoder, Progress, decoding_step, generate

__all__ = ["MAX_SEED", "Decoder", "MediaProgress", "Progress", "SamplingOptions", "choose_tokens", "complete_image",
           "decoding_step", "generate", "generate_audio"]
