"""media.measures: spectral flatness tells noise from pitched sound; roughness and speckle tell flat images
from noisy ones."""

import numpy as np
import pytest

from media import image_texture, mu_law_decode, mu_law_encode, spectral_flatness

RATE = 12000


def test_flatness_of_noise_is_about_056_and_of_a_chord_near_zero():
    rng = np.random.default_rng(0)
    assert spectral_flatness(rng.standard_normal(65536)) == pytest.approx(0.56, abs=0.02)
    t = np.arange(65536) / RATE
    chord = np.sin(2 * np.pi * 220 * t) + 0.5 * np.sin(2 * np.pi * 330 * t) + 0.3 * np.sin(2 * np.pi * 440 * t)
    assert spectral_flatness(chord) < 1e-6
    # through 8-bit mu-law, as the models hear it: quantisation noise lifts the floor, still far below noise
    assert spectral_flatness(mu_law_decode(mu_law_encode((0.5 * chord / 1.8).astype(np.float32)))) < 0.01


def test_flatness_looks_at_the_loudest_frames_only():
    rng = np.random.default_rng(1)
    t = np.arange(40960) / RATE
    tone = np.sin(2 * np.pi * 440 * t)
    tone[:8192] = 1e-4 * rng.standard_normal(8192)  # a nearly silent noisy start: 8 of 40 frames
    assert spectral_flatness(tone) < 1e-3
    assert spectral_flatness(tone, loudest=1.0) < spectral_flatness(tone[:8192])


def test_flatness_refuses_what_it_cannot_measure():
    with pytest.raises(ValueError, match="at least one frame"):
        spectral_flatness(np.zeros(1000))
    with pytest.raises(ValueError, match="mono"):
        spectral_flatness(np.zeros((2, 4096)))
    with pytest.raises(ValueError, match="NaN"):
        spectral_flatness(np.full(4096, np.nan))
    with pytest.raises(ValueError, match="loudest"):
        spectral_flatness(np.zeros(4096), loudest=0)


def test_roughness_and_speckle():
    rng = np.random.default_rng(0)
    flat = np.full((2, 64, 64, 3), 90, np.uint8)
    assert image_texture(flat) == {"roughness": 0.0, "speckle": 0.0}
    ramp = np.broadcast_to(np.arange(64, dtype=np.uint8)[None, None, :, None] * 2, (1, 64, 64, 3)).copy()
    assert image_texture(ramp)["roughness"] == pytest.approx(1.0, abs=0.05)  # 2 per column step, 0 per row
    assert image_texture(ramp)["speckle"] == pytest.approx(0.0, abs=1e-9)  # grey: no chroma
    grey_noise = np.repeat(rng.integers(0, 256, (1, 64, 64, 1), dtype=np.uint8), 3, -1)
    colour_noise = rng.integers(0, 256, (1, 64, 64, 3), dtype=np.uint8)
    assert image_texture(grey_noise)["speckle"] < 1e-9 < image_texture(colour_noise)["speckle"]
    assert image_texture(colour_noise)["roughness"] > 40
    with pytest.raises(ValueError, match="uint8"):
        image_texture(np.zeros((64, 64, 3), np.uint8))
