"""media.audio: mu-law, resampling, load_audio, WAV output."""

import math

import numpy as np
import pytest
import soundfile as sf
import torch
from helpers import count_frames_read, long_tone_with_counted_reads

from media.audio import (
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

RNG = np.random.default_rng(0)


def test_constants():
    assert (SAMPLE_RATE, AUDIO_TOKENS) == (12000, 65536)


# ---------------------------------------------------------------- mu-law


def test_mu_law_round_trip_within_one_step():
    x = np.linspace(-1, 1, 200001)
    t = mu_law_encode(x)
    assert t.dtype == np.uint8
    levels = mu_law_decode(np.arange(256)).astype(np.float64)
    assert np.all(np.diff(levels) > 0)
    y = mu_law_decode(t).astype(np.float64)
    # the quantisation step around x: distance between the two levels bracketing it
    hi = np.clip(np.searchsorted(levels, x), 1, 255)
    step = levels[hi] - levels[hi - 1]
    assert np.all(np.abs(y - x) <= step + 1e-7)
    # rounds to nearest: never farther than half a step in the companded domain
    comp = lambda v: np.sign(v) * np.log1p(255 * np.abs(v)) / np.log1p(255)  # noqa: E731
    assert np.abs(comp(y) - comp(x)).max() <= 1 / 255 + 1e-9


def test_mu_law_properties():
    x = np.linspace(-1, 1, 10001)
    t = mu_law_encode(x).astype(int)
    assert np.all(np.diff(t) >= 0)
    assert t[0] == 0 and t[-1] == 255
    assert mu_law_encode(np.array([-5.0, 5.0])).tolist() == [0, 255]  # clipped
    z = mu_law_encode(np.zeros(10))
    assert (z == z[0]).all() and z[0] in (127, 128)
    assert mu_law_encode(np.array([-0.0]))[0] == z[0] == mu_law_encode(torch.zeros(3))[1]
    assert set(np.unique(mu_law_encode(np.linspace(-1, 1, 100001)))) == set(range(256))
    d = tokens_to_audio(np.arange(256, dtype=np.uint8))
    assert d.dtype == np.float32 and d[0] == -1 and d[-1] == 1
    np.testing.assert_array_equal(audio_to_tokens(d), np.arange(256))  # levels are fixed points


def test_pcm16_and_save_wav(tmp_path):
    tok = np.array([0, 128, 255], np.uint8)
    pcm = tokens_to_pcm16(tok)
    assert pcm.dtype == np.int16 and pcm[0] == -32767 and pcm[2] == 32767 and abs(pcm[1]) < 5
    save_wav(tmp_path / "t.wav", torch.from_numpy(tok).long())
    data, sr = sf.read(tmp_path / "t.wav", dtype="int16")
    assert sr == SAMPLE_RATE and data.tolist() == pcm.tolist()
    assert sf.info(str(tmp_path / "t.wav")).subtype == "PCM_16"
    save_wav(tmp_path / "f.wav", np.array([0.5, -2.0], np.float32), sample_rate=8000)
    data, sr = sf.read(tmp_path / "f.wav", dtype="int16")
    assert sr == 8000 and data.tolist() == [16384, -32767]
    with pytest.raises(ValueError, match="mono"):
        save_wav(tmp_path / "x.wav", np.zeros((2, 10), np.float32))


# ---------------------------------------------------------------- resample


def _tone(freq, sr, seconds, amp=0.5):
    return (amp * np.sin(2 * np.pi * freq * np.arange(int(sr * seconds)) / sr)).astype(np.float32)


def _amplitude_db(y):
    y = y[len(y) // 10: -len(y) // 10]
    return 20 * np.log10(np.sqrt(2) * y.std() / 0.5 + 1e-12)


def test_resample_sine_44100_to_12000():
    x = _tone(440, 44100, 1.0)
    y = resample(x, 44100, 12000)
    assert y.dtype == np.float32 and len(y) == math.ceil(len(x) * 12000 / 44100)
    spec = np.abs(np.fft.rfft(y * np.hanning(len(y))))
    assert abs(np.argmax(spec) * 12000 / len(y) - 440) <= 1.0
    mid = y[1000:-1000]
    assert abs(np.abs(mid).max() - 0.5) < 0.005
    want = 0.5 * np.sin(2 * np.pi * 440 * np.arange(len(y)) / 12000)
    assert np.abs(y - want)[200:-200].max() < 0.005  # phase kept: sample j is time j / new_sr


@pytest.mark.parametrize("orig_sr, new_sr", [(44100, 12000), (48000, 12000), (22050, 12000), (12000, 44100),
                                              (8000, 12000), (12000, 48000)])
def test_resample_sine_keeps_frequency_and_level(orig_sr, new_sr):
    x = _tone(440, orig_sr, 1.0)
    y = resample(x, orig_sr, new_sr)
    assert y.dtype == np.float32 and y.shape == (math.ceil(len(x) * new_sr / orig_sr),)
    spec = np.abs(np.fft.rfft(y * np.hanning(len(y))))
    assert abs(np.argmax(spec) * new_sr / len(y) - 440) <= new_sr / len(y)  # the peak within one bin
    mid = y[len(y) // 10: -len(y) // 10].astype(np.float64)
    rms_in = np.sqrt(np.mean(x[len(x) // 10: -len(x) // 10].astype(np.float64) ** 2))
    assert abs(np.sqrt(np.mean(mid**2)) / rms_in - 1) < 0.01  # the level within 1 %


def test_resample_inputs_keep_their_contract():
    x = RNG.standard_normal((3, 999)).astype(np.float64)
    y = resample(torch.from_numpy(x), 44100, 12000)
    assert isinstance(y, np.ndarray) and y.dtype == np.float32 and y.shape == (3, math.ceil(999 * 12000 / 44100))
    np.testing.assert_allclose(y[2], resample(x[2].astype(np.float32), 44100, 12000), atol=1e-6)
    assert resample(np.arange(10, dtype=np.int16), 8000, 16000).dtype == np.float32
    assert resample(np.zeros((2, 0), np.float32), 8000, 12000).shape == (2, 0)
    with pytest.raises(ValueError, match="float"):
        resample(np.array(["a", "b"]), 8000, 12000)
    with pytest.raises(ValueError, match="orig_sr"):
        resample(x, True, 12000)


def test_resample_band_limit():
    y5 = resample(_tone(5000, 24000, 1.0), 24000, 12000)
    assert abs(_amplitude_db(y5)) < 0.09  # within 1 %
    y8 = resample(_tone(8000, 24000, 1.0), 24000, 12000)
    assert _amplitude_db(y8) < -40  # its alias at 4 kHz is suppressed
    up = resample(_tone(3000, 8000, 1.0), 8000, 12000)
    assert abs(_amplitude_db(up)) < 0.09
    spec = np.abs(np.fft.rfft(up[1200:-1200] * np.hanning(len(up) - 2400)))
    f = np.fft.rfftfreq(len(up) - 2400, 1 / 12000)
    assert spec[f > 4100].max() < 1e-3 * spec.max()  # no image of the tone above the old Nyquist


def test_resample_shapes_and_identity():
    x = RNG.standard_normal((2, 1000)).astype(np.float32)
    np.testing.assert_array_equal(resample(x, 16000, 16000), x)
    y = resample(x, 48000, 12000)
    assert y.shape == (2, 250)
    np.testing.assert_allclose(y[1], resample(x[1], 48000, 12000), atol=1e-6)
    for T, a, b in [(1, 44100, 12000), (7, 8000, 12000), (12345, 22050, 12000), (5, 12000, 48000)]:
        assert len(resample(np.zeros(T, np.float32), a, b)) == math.ceil(T * b / a)
    assert len(resample(np.zeros(0, np.float32), 44100, 12000)) == 0
    with pytest.raises(ValueError, match="orig_sr"):
        resample(x, 0, 12000)
    with pytest.raises(ValueError, match="new_sr"):
        resample(x, 12000, 1.5)
    with pytest.raises(ValueError, match="shape"):
        resample(np.zeros((1, 2, 3), np.float32), 2, 1)


# ---------------------------------------------------------------- load_audio


@pytest.mark.parametrize("fmt", ["wav", "flac", "ogg"])
@pytest.mark.parametrize("sr", [8000, 22050, 44100, 48000])
@pytest.mark.parametrize("channels", [1, 2, 6])
def test_load_audio(tmp_path, fmt, sr, channels):
    x = _tone(440, sr, 0.5)
    data = np.stack([x] * channels, axis=1)
    path = tmp_path / f"a.{fmt}"
    sf.write(path, data, sr)
    y = load_audio(path)
    assert y.dtype == np.float32 and y.ndim == 1
    assert abs(len(y) - 0.5 * SAMPLE_RATE) <= 1
    mid = y[len(y) // 4: -len(y) // 4]
    spec = np.abs(np.fft.rfft(mid * np.hanning(len(mid))))
    assert abs(np.argmax(spec) * SAMPLE_RATE / len(mid) - 440) <= 4
    if fmt != "ogg":  # lossless: the amplitude survives downmix and resampling
        assert abs(np.abs(mid).max() - 0.5) < 0.01


def test_load_audio_downmix_and_rate(tmp_path):
    left, right = _tone(440, 12000, 0.2), np.zeros(2400, np.float32)
    sf.write(tmp_path / "s.wav", np.stack([left, right], 1), 12000, subtype="FLOAT")
    np.testing.assert_allclose(load_audio(tmp_path / "s.wav"), left / 2, atol=1e-6)
    assert len(load_audio(tmp_path / "s.wav", sample_rate=6000)) == 1200


def test_load_audio_errors(tmp_path):
    sf.write(tmp_path / "empty.wav", np.zeros((0, 1), np.float32), 12000)
    (tmp_path / "zero.wav").write_bytes(b"")
    (tmp_path / "junk.wav").write_bytes(RNG.integers(0, 256, 5000, dtype=np.uint8).tobytes())
    for name in ["empty.wav", "zero.wav", "junk.wav", "missing.flac"]:
        with pytest.raises(ValueError, match=name):
            load_audio(tmp_path / name)
    with pytest.raises(ValueError, match="sample_rate"):
        load_audio(tmp_path / "junk.wav", sample_rate=0)


# ---------------------------------------------------------------- load_audio: bounded decode (issue 30, defect 1)


def test_load_audio_seconds_decodes_only_the_start(tmp_path, monkeypatch):
    sr = 192000
    counts = long_tone_with_counted_reads(tmp_path / "long.flac", monkeypatch, seconds=20, sr=sr)  # 1 s is asked for
    y = load_audio(tmp_path / "long.flac", seconds=1.0)
    assert len(y) == SAMPLE_RATE
    assert sum(counts) <= 1.05 * sr  # the first second and a little margin for the resampler, not 20 s
    assert max(counts) <= 1 << 16  # decoded a block at a time
    whole = load_audio(tmp_path / "long.flac")
    np.testing.assert_allclose(y, whole[:SAMPLE_RATE], atol=1e-6)  # the same samples as a whole read
    assert len(load_audio(tmp_path / "long.flac", seconds=60.0)) == 20 * SAMPLE_RATE  # shorter than asked: all


def test_load_audio_refuses_absurd_files_before_decoding(tmp_path, monkeypatch):
    sf.write(tmp_path / "rate.wav", np.zeros(10, np.int16), 1_000_000)
    sf.write(tmp_path / "channels.wav", np.zeros((10, 65), np.int16), 12000)
    sf.write(tmp_path / "long.wav", np.zeros(3 * 8000, np.int16), 8000)
    counts = count_frames_read(monkeypatch)
    with pytest.raises(ValueError, match=r"rate.wav: its sample rate of 1,000,000 Hz is not in 1..384,000 Hz"):
        load_audio(tmp_path / "rate.wav")
    with pytest.raises(ValueError, match=r"channels.wav: it has 65 channels, more than 64"):
        load_audio(tmp_path / "channels.wav", seconds=1.0)
    with pytest.raises(ValueError, match=r"long.wav: it is 3.0 s long, more than the 2 s this reads whole"):
        load_audio(tmp_path / "long.wav", max_seconds=2)
    assert counts == []  # refused from the header, nothing decoded
    assert len(load_audio(tmp_path / "long.wav", seconds=1.0, max_seconds=2)) == SAMPLE_RATE  # a prefix is fine
    for bad in (0, -1.0, float("nan"), float("inf"), "1"):
        with pytest.raises(ValueError, match="seconds must be a positive number"):
            load_audio(tmp_path / "long.wav", seconds=bad)
