"""Media: images and audio to uint8 tokens and back, image and audio files in, WAV files and pictures out.

The lowest floor beside kernels/: it imports nothing else of this project. Images are 64x64 RGB, 12,288
tokens in raster order (media.image); audio is 12 kHz 8-bit mu-law, one token per sample (media.audio);
media.pictures draws completion grids and waveforms + spectrograms of samples; media.measures puts numbers
on what a listener hears and a viewer sees (spectral flatness, roughness, colour speckle).
"""

from .audio import (
    AUDIO_TOKENS,
    SAMPLE_RATE,
    audio_to_tokens,
    load_audio,
    mu_law_decode,
    mu_law_encode,
    resample,
    save_wav,
    tokens_to_audio,
    tokens_to_pcm16,
)
from .image import (
    IMAGE_CHANNELS,
    IMAGE_SIZE,
    IMAGE_TOKENS,
    MAX_IMAGE_PIXELS,
    image_to_tokens,
    load_image,
    to_rgb,
    tokens_to_image,
)
from .measures import image_texture, spectral_flatness
from .pictures import GRID_GAP, GRID_SCALE, LINE_COLOR, audio_picture, make_grid, masked_prompt
from .tokens import VOCAB, as_token_array

__all__ = ["AUDIO_TOKENS", "GRID_GAP", "GRID_SCALE", "IMAGE_CHANNELS", "IMAGE_SIZE", "IMAGE_TOKENS", "LINE_COLOR",
           "MAX_IMAGE_PIXELS", "SAMPLE_RATE", "VOCAB", "as_token_array", "audio_picture", "audio_to_tokens",
           "image_texture", "image_to_tokens", "load_audio", "load_image", "make_grid", "masked_prompt",
           "mu_law_decode", "mu_law_encode", "resample", "save_wav", "spectral_flatness", "to_rgb", "tokens_to_audio",
           "tokens_to_image", "tokens_to_pcm16"]
