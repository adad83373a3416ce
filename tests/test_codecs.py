"""Media codecs: image tokens, load_image, mu-law, resampling, load_audio, WAV output."""

import math

import numpy as np
import pytest
import soundfile as sf
import torch
from PIL import Image

from models.codecs import (
    AUDIO_TOKENS,
    IMAGE_TOKENS,
    SAMPLE_RATE,
    VOCAB,
    audio_to_tokens,
    image_to_tokens,
    load_audio,
    load_image,
    mu_law_decode,
    mu_law_encode,
    resample,
    save_wav,
    tokens_to_audio,
    tokens_to_image,
    tokens_to_pcm16,
)

RNG = np.random.default_rng(0)


def test_constants():
    assert (IMAGE_TOKENS, SAMPLE_RATE, AUDIO_TOKENS, VOCAB) == (12288, 12000, 65536, 256)


# ---------------------------------------------------------------- image tokens


def test_image_round_trip_exact():
    img = RNG.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    tok = image_to_tokens(img)
    assert tok.shape == (12288,) and tok.dtype == np.uint8
    np.testing.assert_array_equal(tokens_to_image(tok), img)
    batch = RNG.integers(0, 256, (5, 64, 64, 3), dtype=np.uint8)
    np.testing.assert_array_equal(tokens_to_image(image_to_tokens(batch)), batch)
    np.testing.assert_array_equal(tokens_to_image(torch.from_numpy(tok).long()), img)


def test_token_order():
    img = RNG.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    tok = image_to_tokens(img)
    for r, c, ch in [(0, 0, 0), (0, 1, 2), (5, 17, 1), (63, 63, 2), (31, 0, 0)]:
        assert tok[(r * 64 + c) * 3 + ch] == img[r, c, ch]


def test_token_errors():
    with pytest.raises(ValueError, match="uint8"):
        image_to_tokens(np.zeros((64, 64, 3), np.float32))
    with pytest.raises(ValueError, match="64, 64, 3"):
        image_to_tokens(np.zeros((32, 32, 3), np.uint8))
    with pytest.raises(ValueError, match="12288"):
        tokens_to_image(np.zeros(100, np.uint8))
    with pytest.raises(ValueError, match="0..255"):
        tokens_to_image(np.full(12288, 256))
    with pytest.raises(ValueError, match="0..255"):
        tokens_to_image(torch.full((12288,), -1))
    with pytest.raises(ValueError, match="integer"):
        tokens_to_image(torch.zeros(12288))


# ---------------------------------------------------------------- load_image


def _rgb(w, h):
    return Image.fromarray(RNG.integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB")


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L", "P", "CMYK", "I;16", "1", "LA"])
@pytest.mark.parametrize("size", [(1, 1), (63, 200), (300, 64), (1000, 700)])
def test_load_image_modes_and_sizes(tmp_path, mode, size):
    im = _rgb(*size)
    if mode == "I;16":
        a = RNG.integers(0, 65536, (size[1], size[0]), dtype=np.uint16)
        im = Image.fromarray(a)
    else:
        im = im.convert(mode)
    ext = {"CMYK": "jpg"}.get(mode, "png")
    path = tmp_path / f"x.{ext}"
    im.save(path)
    out = load_image(path)
    assert out.shape == (64, 64, 3) and out.dtype == np.uint8


def test_load_image_formats_and_sources(tmp_path):
    im = _rgb(90, 70)
    for ext in ["jpg", "bmp", "gif", "webp", "tiff"]:
        im.save(tmp_path / f"a.{ext}")
        assert load_image(tmp_path / f"a.{ext}").shape == (64, 64, 3)
    assert load_image(im).shape == (64, 64, 3)
    assert load_image(np.asarray(im)).shape == (64, 64, 3)
    assert load_image(str(tmp_path / "a.bmp"), size=32).shape == (32, 32, 3)


def test_load_image_16bit_scaled(tmp_path):
    Image.fromarray(np.full((8, 8), 65535, np.uint16)).save(tmp_path / "w.png")
    Image.fromarray(np.full((8, 8), 32896, np.uint16)).save(tmp_path / "g.png")
    assert (load_image(tmp_path / "w.png") == 255).all()
    assert (load_image(tmp_path / "g.png") == 128).all()


def test_load_image_alpha_on_white(tmp_path):
    a = np.zeros((64, 64, 4), np.uint8)
    a[..., 0] = 255  # red, fully transparent -> white
    Image.fromarray(a, "RGBA").save(tmp_path / "t.png")
    assert (load_image(tmp_path / "t.png") == 255).all()
    a[..., 3] = 255
    Image.fromarray(a, "RGBA").save(tmp_path / "o.png")
    np.testing.assert_array_equal(load_image(tmp_path / "o.png")[0, 0], [255, 0, 0])
    Image.new("RGB", (9, 9), (255, 0, 0)).save(tmp_path / "key.png", transparency=(255, 0, 0))  # colour key
    assert (load_image(tmp_path / "key.png") == 255).all()
    p = Image.new("P", (9, 9))
    p.putpalette([255, 0, 0] * 256)
    p.save(tmp_path / "p.gif", transparency=0)
    assert (load_image(tmp_path / "p.gif") == 255).all()


def test_load_image_centre_crop():
    for w, h in [(200, 100), (100, 200), (201, 100)]:
        a = np.zeros((h, w, 3), np.uint8)
        a[..., 0] = 255  # red margins
        s = min(w, h)
        top, left = (h - s) // 2, (w - s) // 2
        a[top: top + s, left: left + s] = (0, 0, 255)  # blue centre square
        out = load_image(a)
        assert (out == np.array([0, 0, 255], np.uint8)).all(), (w, h)


def test_load_image_box_downsample():
    a = RNG.integers(0, 256, (128, 128, 3), dtype=np.uint8)
    want = a.astype(np.float64).reshape(64, 2, 64, 2, 3).mean(axis=(1, 3))
    assert np.abs(load_image(a).astype(np.float64) - want).max() <= 1.0


def test_load_image_exif_orientation(tmp_path):
    a = np.zeros((40, 80, 3), np.uint8)
    a[:, :40] = (255, 0, 0)  # left half red, right half blue, landscape
    a[:, 40:] = (0, 0, 255)
    im = Image.fromarray(a)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 CW on display: left half becomes the top
    im.save(tmp_path / "r.png", exif=exif)
    b = load_image(tmp_path / "r.png", size=8)  # displayed 40 wide, 80 tall: red on top, blue below
    assert b[0, -1, 0] > 200 and b[0, -1, 2] < 50  # top right is red (it would be blue unrotated)
    assert b[-1, 0, 2] > 200 and b[-1, 0, 0] < 50


def test_load_image_errors(tmp_path):
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 50)
    (tmp_path / "note.txt").write_text("not an image")
    good = tmp_path / "g.png"
    _rgb(100, 100).save(good)
    (tmp_path / "trunc.png").write_bytes(good.read_bytes()[:200])
    for name in ["bad.png", "note.txt", "trunc.png", "missing.png"]:
        with pytest.raises(ValueError, match="cannot read image"):
            load_image(tmp_path / name)
    with pytest.raises(ValueError, match="size"):
        load_image(good, size=0)
    with pytest.raises(ValueError, match="uint8"):
        load_image(np.zeros((8, 8, 3), np.float32))


def test_load_image_bomb_guard(tmp_path):
    Image.new("1", (9000, 8000)).save(tmp_path / "big.png")  # 72 M pixels, tiny file
    with pytest.raises(ValueError, match="pixels"):
        load_image(tmp_path / "big.png")


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
