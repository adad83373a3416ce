"""The image dataset builder: licences, crops, composites, near duplicates, the split, and a whole build
from synthetic sources (the real Debian packages are not needed)."""

import hashlib

import numpy as np
import pytest
from PIL import Image

from data import build_images as bi
from data.imagenet64 import ImageNet64

COPYRIGHT = """Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/

Files: *
Copyright: someone
License: GPL-3+

Files: src/activities/a/fish1.jpg
 src/activities/a/fish2.jpg
Copyright: a photographer
License: CC-BY-SA-3.0

Files: src/activities/b/*
Copyright: another
License: public-domain
"""


def test_licences_come_from_the_last_matching_copyright_paragraph(tmp_path, monkeypatch):
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "copyright").write_text(COPYRIGHT)
    monkeypatch.setattr(bi, "DOC", tmp_path)
    paragraphs = bi.copyright_licences("pkg")
    assert len(paragraphs) == 3
    assert bi.licence_of(paragraphs, "src/activities/a/fish2.jpg") == "CC-BY-SA-3.0"
    assert bi.licence_of(paragraphs, "src/activities/a/fish2.webp") == "GPL-3+"
    assert bi.licence_of(paragraphs, "src/activities/a/fish2.webp", any_extension=True) == "CC-BY-SA-3.0"
    assert bi.licence_of(paragraphs, "src/activities/b/x/y.png") == "public-domain"
    assert bi.licence_of(paragraphs, "other.png") == "GPL-3+"


def _photo(seed: int, size=(300, 200)) -> Image.Image:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[: size[1], : size[0]]
    base = np.stack([np.sin(x / (7 + seed)), np.cos(y / (5 + seed)), np.sin((x + y) / (11 + seed))], -1)
    arr = (127 + 100 * base + rng.normal(0, 8, base.shape)).clip(0, 255).astype(np.uint8)
    return Image.fromarray(arr)


def test_random_crops_are_64x64_deterministic_and_inside_the_photo():
    im = _photo(1)
    a, box_a = bi.random_crop(im, np.random.default_rng(3), 0.25)
    b, box_b = bi.random_crop(im, np.random.default_rng(3), 0.25)
    assert a.shape == (64, 64, 3) and a.dtype == np.uint8
    assert np.array_equal(a, b) and box_a == box_b
    left, top, side, flipped = box_a
    assert 64 <= side <= 200 and left + side <= 300 and top + side <= 200 and flipped in (0, 1)
    small = Image.new("RGB", (64, 80), (10, 20, 30))  # short side 64: the crop is never upsampled
    c, (_, _, side, _) = bi.random_crop(small, np.random.default_rng(0), 0.25)
    assert side == 64 and (c == [10, 20, 30]).all()


def test_a_composite_keeps_the_cutout_and_the_background():
    background = Image.new("RGB", (400, 300), (0, 0, 255))
    stamp = Image.new("RGBA", (50, 100), (255, 0, 0, 255))
    out, (scale, x, y, _) = bi.composite(background, stamp, np.random.default_rng(0), 0.5)
    assert out.shape == (64, 64, 3)
    red = (out[..., 0] > 200) & (out[..., 2] < 50)
    blue = (out[..., 2] > 200) & (out[..., 0] < 50)
    assert red.any() and blue.any()
    assert 0.45 <= scale <= 0.9 and red.sum() / red.size == pytest.approx(scale * scale / 2, rel=0.25)


def test_colour_variety_separates_photographs_from_flat_drawings():
    flat = np.zeros((64, 64, 4), np.uint8)
    flat[..., 3] = 255
    flat[:32, :, 0] = 200
    photo = np.concatenate([np.asarray(_photo(2, (64, 64))), np.full((64, 64, 1), 255, np.uint8)], -1)
    assert bi.colour_variety(flat) < bi.STAMP_MIN_COLOUR_VARIETY < bi.colour_variety(photo)
    assert bi.colour_variety(np.zeros((4, 4, 4), np.uint8)) == 0.0  # fully transparent


def test_near_duplicates_are_dropped_and_distinct_crops_kept():
    a = np.asarray(_photo(1, (64, 64)))
    shifted = np.clip(a.astype(int) + 3, 0, 255).astype(np.uint8)  # same picture, brighter
    other = np.asarray(_photo(5, (64, 64)))[::-1]
    seen = bi.NearDuplicates(0.25)
    assert seen.is_new(bi.signature(a))
    assert not seen.is_new(bi.signature(shifted))
    assert seen.is_new(bi.signature(other))


def test_copies_of_a_photograph_fall_in_one_group():
    photos = [bi.Photo(k, "pkg", "x", lambda: None) for k in ("a", "b", "c")]
    img = np.asarray(_photo(1, (64, 64)))
    thumbs = {"a": img, "b": np.clip(img.astype(int) - 2, 0, 255).astype(np.uint8),
              "c": np.asarray(_photo(7, (64, 64)))[:, ::-1]}
    groups = bi.photo_groups(photos, thumbs, 0.15)
    assert groups["a"] == groups["b"] != groups["c"]


@pytest.fixture
def synthetic_sources(monkeypatch):
    photos = [bi.Photo(f"pkg/photo{i}.jpg", "pkg", "CC0-1.0", lambda i=i: _photo(i)) for i in range(12)]
    cut = Image.new("RGBA", (40, 40), (0, 0, 0, 0))
    cut.paste((250, 200, 0, 255), (5, 5, 35, 35))
    stamps = [(f"stamps/s{i}.png", "GPL-2", cut) for i in range(10)]
    monkeypatch.setattr(bi, "gcompris_photos", lambda: photos[:6])
    monkeypatch.setattr(bi, "wallpaper_photos", lambda: photos[6:10])
    monkeypatch.setattr(bi, "opencv_photos", lambda: photos[10:])
    monkeypatch.setattr(bi, "stamp_cutouts", lambda: stamps)


def test_a_build_writes_the_imagenet64_layout_split_by_photograph(synthetic_sources, tmp_path):
    s = bi.Settings(crops_train=5, crops_val=3, composites_train=7, composites_val=2, val_fraction=0.3, shard=20)
    summary = bi.build(tmp_path / "a", s)
    train, val = ImageNet64(tmp_path / "a", "train"), ImageNet64(tmp_path / "a", "val")
    assert len(train) == summary["images"]["train"] > 20 and len(val) == summary["images"]["val"] > 0
    assert len(list((tmp_path / "a").glob("train_data_batch_*.npz"))) == -(-len(train) // 20)
    manifest = __import__("json").loads((tmp_path / "a" / "manifest.json").read_text())["images"]
    groups = {sp: {m["group"] for m in manifest[sp]} for sp in ("train", "val")}
    assert not groups["train"] & groups["val"]
    assert sum("stamp" in m for m in manifest["train"]) == 7
    assert (tmp_path / "a" / "README.md").read_text().count("CC0-1.0") == 1
    from data.loader import dataset_description

    description = dataset_description(tmp_path / "a")
    assert description["licences"] == {"CC0-1.0": 12, "GPL-2": 10} and description["images"] == summary["images"]
    assert train[0].shape == (12288,) and train[0].dtype == np.uint8
    bi.build(tmp_path / "b", s)  # the same settings give the same bytes
    for name in ("val_data.npz", "train_data_batch_1.npz"):
        digest = [hashlib.sha256((tmp_path / d / name).read_bytes()).hexdigest() for d in ("a", "b")]
        assert digest[0] == digest[1]


def test_bad_arguments_exit_with_a_message(capsys):
    with pytest.raises(SystemExit):
        bi.parse_args(["--out", "x", "--min-scale", "0"])
    assert "--min-scale must be in (0, 1]" in capsys.readouterr().err
