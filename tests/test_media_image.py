"""media.image: image tokens and load_image; media.tokens: the vocabulary."""

import numpy as np
import pytest
import torch
from PIL import Image

from media.image import IMAGE_TOKENS, image_to_tokens, load_image, tokens_to_image
from media.tokens import VOCAB

RNG = np.random.default_rng(0)


def test_constants():
    assert (IMAGE_TOKENS, VOCAB) == (12288, 256)


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


# ---------------------------------------------------------------- large images, reduced (issue 30, defect 2)


def _full_size_result(path, size=64):
    """What load_image gave before large images were reduced: every conversion at full size."""
    from PIL import ImageOps

    from media.image import _square_resize

    with Image.open(path) as im:
        im.load()
        return _square_resize(ImageOps.exif_transpose(im), size)


def _large_images(tmp_path) -> dict[str, Image.Image]:
    h, w = 1100, 1500  # over 8 x 64 on the short side: reduced by 2 before the box resample
    y, x = np.mgrid[0:h, 0:w]
    rgba = np.stack([x % 256, y % 256, (x * y) % 256, (x + y) % 256], -1).astype(np.uint8)
    grey16 = ((x * 40 + y * 7) % 65536).astype(np.uint16)
    grey_float = (x / w * 0.9 + y / h * 0.1).astype(np.float32)
    grey_float[0, :10] = np.nan
    return {"rgba.png": Image.fromarray(rgba, "RGBA"), "grey16.png": Image.fromarray(grey16),
            "float.tif": Image.fromarray(grey_float, "F"),
            "palette.png": Image.fromarray(rgba[..., :3]).convert("P", palette=Image.Palette.ADAPTIVE),
            "big_ints.tif": Image.fromarray((x * 100 + y).astype(np.int32), "I")}


def test_large_images_are_converted_a_strip_at_a_time(tmp_path, monkeypatch):
    import media.image

    converted = []
    real = media.image.to_rgb

    def to_rgb(im, *args, **kw):
        converted.append(im.width * im.height)
        return real(im, *args, **kw)

    for name, im in _large_images(tmp_path).items():
        im.save(tmp_path / name)
        expected = _full_size_result(tmp_path / name)
        converted.clear()
        monkeypatch.setattr(media.image, "to_rgb", to_rgb)
        got = load_image(tmp_path / name)
        monkeypatch.undo()
        assert converted and max(converted) <= 2 * media.image.STRIP_PIXELS, name  # never the whole image at once
        assert got.shape == (64, 64, 3) and got.dtype == np.uint8
        diff = np.abs(got.astype(int) - expected.astype(int))
        assert diff.mean() < 1.0 and diff.max() <= 40, (name, diff.mean(), diff.max())  # the same picture


def test_large_images_keep_their_exif_orientation(tmp_path):
    h, w = 1100, 1500
    a = np.zeros((h, w, 3), np.uint8)
    a[: h // 2, : w // 2] = 255  # white top-left quarter
    for orientation in range(1, 9):
        exif = Image.Exif()
        exif[0x0112] = orientation
        Image.fromarray(a).save(tmp_path / "o.png", exif=exif)
        expected = _full_size_result(tmp_path / "o.png")
        got = load_image(tmp_path / "o.png")
        diff = np.abs(got.astype(int) - expected.astype(int))
        assert diff.mean() < 1.0 and diff.max() <= 40, orientation  # a wrong turn would differ by 255 in places
