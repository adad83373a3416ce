"""Data readers (ImageNet64 npz, image folders, audio folders) and the batch iterators."""

import json
import logging
import zipfile

import numpy as np
import pytest
import soundfile as sf
import torch
from PIL import Image

import data.audio_folder as audio_folder_mod
from data import (
    AudioFolder,
    Batches,
    ImageFolder,
    ImageNet64,
    eval_batches,
    open_dataset,
    write_imagenet64_npz,
)

RNG = np.random.default_rng(0)


def _images(n, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, 64, 64, 3), dtype=np.uint8)


# ---------------------------------------------------------------- ImageNet64


def test_imagenet64_planes_to_hwc_tokens(tmp_path):
    # official layout written by hand: R plane, G plane, B plane per row
    data = np.zeros((2, 12288), np.uint8)
    r, c = 5, 17
    data[1, 0 * 4096 + r * 64 + c] = 11
    data[1, 1 * 4096 + r * 64 + c] = 22
    data[1, 2 * 4096 + r * 64 + c] = 33
    np.savez(tmp_path / "val_data.npz", data=data, labels=np.array([1, 2]))
    ds = ImageNet64(tmp_path, "val")
    assert len(ds) == 2 and ds.seq_len == 12288 and ds.kind == "image" and ds.skipped == 0
    tok = ds[1]
    assert tok.dtype == np.uint8 and tok.shape == (12288,)
    assert [tok[(r * 64 + c) * 3 + ch] for ch in range(3)] == [11, 22, 33]
    assert tok.sum() == 66 and ds.label(1) == 2
    assert isinstance(ds._arrays[0], np.memmap)  # read in place, not loaded


def test_imagenet64_writer_round_trip_and_parts(tmp_path):
    imgs = _images(7)
    write_imagenet64_npz(tmp_path / "Imagenet64_train_part1.npz", imgs[:3], [1, 2, 3])
    write_imagenet64_npz(tmp_path / "Imagenet64_train_part2.npz", imgs[3:5], [4, 5])
    write_imagenet64_npz(tmp_path / "Imagenet64_train_part10.npz", imgs[5:], [6, 7])
    with np.load(tmp_path / "Imagenet64_train_part1.npz") as z:  # official layout: planes
        np.testing.assert_array_equal(z["data"][0].reshape(3, 64, 64), imgs[0].transpose(2, 0, 1))
    ds = ImageNet64(tmp_path, "train")
    assert len(ds) == 7 and [p.name for p in ds.parts][-1] == "Imagenet64_train_part10.npz"
    for i in range(7):
        np.testing.assert_array_equal(ds[i], imgs[i].reshape(-1))
    np.testing.assert_array_equal(ds[-1], imgs[6].reshape(-1))
    assert [ds.label(i) for i in range(7)] == list(range(1, 8))
    assert all(isinstance(a, np.memmap) for a in ds._arrays)
    with pytest.raises(IndexError):
        ds[7]
    with pytest.raises(ValueError, match="no ImageNet64 val files"):
        ImageNet64(tmp_path, "val")


def test_imagenet64_batch_names_and_single_file(tmp_path):
    imgs = _images(4)
    write_imagenet64_npz(tmp_path / "train_data_batch_2.npz", imgs[2:], [0, 0])
    write_imagenet64_npz(tmp_path / "train_data_batch_1.npz", imgs[:2], [0, 0])
    ds = ImageNet64(tmp_path)
    np.testing.assert_array_equal(ds[2], imgs[2].reshape(-1))
    one = ImageNet64(tmp_path / "train_data_batch_2.npz", "val")
    assert len(one) == 2
    np.testing.assert_array_equal(one[0], imgs[2].reshape(-1))


def test_imagenet64_compressed_cached(tmp_path, caplog):
    imgs = _images(3)
    write_imagenet64_npz(tmp_path / "val_data.npz", imgs, [1, 2, 3], compressed=True)
    with zipfile.ZipFile(tmp_path / "val_data.npz") as z:
        assert z.getinfo("data.npy").compress_type == zipfile.ZIP_DEFLATED
    with caplog.at_level(logging.INFO, logger="data.imagenet64"):
        ds = ImageNet64(tmp_path, "val")
    assert "compressed" in caplog.text
    assert isinstance(ds._arrays[0], np.memmap)
    assert len(list((tmp_path / ".cache").glob("*.npy"))) == 1
    for i in range(3):
        np.testing.assert_array_equal(ds[i], imgs[i].reshape(-1))
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="data.imagenet64"):
        ImageNet64(tmp_path, "val", cache_dir=tmp_path / ".cache")
    assert "unpacking" not in caplog.text  # reused


def test_imagenet64_corrupt_and_empty(tmp_path, caplog):
    imgs = _images(2)
    write_imagenet64_npz(tmp_path / "Imagenet64_train_part1.npz", imgs, [1, 2])
    (tmp_path / "Imagenet64_train_part2.npz").write_bytes(b"not a zip at all")
    good = (tmp_path / "Imagenet64_train_part1.npz").read_bytes()
    (tmp_path / "Imagenet64_train_part3.npz").write_bytes(good[: len(good) // 2])
    np.savez(tmp_path / "Imagenet64_train_part4.npz", data=np.zeros((2, 100), np.uint8), labels=[1, 2])
    with caplog.at_level(logging.WARNING):
        ds = ImageNet64(tmp_path)
    assert len(ds) == 2 and ds.skipped == 3 and "skipping corrupt" in caplog.text
    np.testing.assert_array_equal(ds[1], imgs[1].reshape(-1))

    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "val_data.npz").write_bytes(b"junk")
    with pytest.raises(ValueError, match="unreadable"):
        ImageNet64(bad, "val")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="val_data.npz"):
        ImageNet64(empty, "val")
    write_imagenet64_npz(empty / "val_data.npz", np.zeros((0, 64, 64, 3), np.uint8), [])
    with pytest.raises(ValueError, match="zero images"):
        ImageNet64(empty, "val")
    with pytest.raises(ValueError, match="split"):
        ImageNet64(empty, "test")
    with pytest.raises(ValueError, match=r"\[N, 64, 64, 3\]"):
        write_imagenet64_npz(empty / "x.npz", np.zeros((2, 32, 32, 3), np.uint8), [1, 2])


# ---------------------------------------------------------------- ImageFolder


def _img(seed=0, w=80, h=60):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def _image_tree(root):
    (root / "sub" / "deeper").mkdir(parents=True)
    _img(1).save(root / "a.png")
    _img(2).save(root / "b.jpg")
    _img(3).save(root / "sub" / "c.bmp")
    _img(4).save(root / "sub" / "deeper" / "d.gif")
    (root / "sub" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nbroken")
    (root / "notes.txt").write_text("hello")


def test_image_folder_reads_and_skips(tmp_path, caplog):
    _image_tree(tmp_path)
    with caplog.at_level(logging.WARNING):
        ds = ImageFolder(tmp_path, "train", val_fraction=0.0)
    assert len(ds) == 4 and ds.skipped == 2 and ds.kind == "image" and ds.seq_len == 12288
    assert "broken.png" in caplog.text and "notes.txt" in caplog.text
    assert ds.files == ["a.png", "b.jpg", "sub/c.bmp", "sub/deeper/d.gif"]
    from media.image import image_to_tokens, load_image

    np.testing.assert_array_equal(ds[0], image_to_tokens(load_image(tmp_path / "a.png")))
    for i in range(4):
        assert ds[i].shape == (12288,) and ds[i].dtype == np.uint8
    assert open_dataset("image", tmp_path, "train", val_fraction=0.0).files == ds.files
    with pytest.raises(ValueError, match="no readable images"):
        ImageFolder(tmp_path, "val", val_fraction=0.0)


def test_image_folder_failure_at_read_time(tmp_path):
    for i in range(3):
        _img(i).save(tmp_path / f"{i}.png")
    ds = ImageFolder(tmp_path, "train", val_fraction=0.0)
    (tmp_path / "1.png").write_bytes(b"gone bad")
    np.testing.assert_array_equal(ds[1], ds[2])  # the next good one
    assert ds.skipped == 1
    ds[1]
    assert ds.skipped == 1  # counted once


def test_image_folder_split_stable(tmp_path):
    for i in range(40):
        _img(i, 8, 8).save(tmp_path / f"img{i:02d}.png")
    train = ImageFolder(tmp_path, "train", val_fraction=0.3)
    val = ImageFolder(tmp_path, "val", val_fraction=0.3)
    assert set(train.files).isdisjoint(val.files) and len(train) + len(val) == 40
    assert 3 <= len(val) <= 20
    assert ImageFolder(tmp_path, "val", val_fraction=0.3).files == val.files
    for i in range(40, 60):
        _img(i, 8, 8).save(tmp_path / f"img{i:02d}.png")
    val2 = ImageFolder(tmp_path, "val", val_fraction=0.3)
    train2 = ImageFolder(tmp_path, "train", val_fraction=0.3)
    assert set(val.files) <= set(val2.files) and set(train.files) <= set(train2.files)
    assert ImageFolder(tmp_path, "val", val_fraction=0.3, seed=1).files != val2.files


# ---------------------------------------------------------------- AudioFolder


def _tone(sr, seconds, freq=440.0, channels=1):
    x = 0.5 * np.sin(2 * np.pi * freq * np.arange(int(sr * seconds)) / sr)
    return np.stack([x] * channels, 1).astype(np.float32)


def _audio_tree(root):
    (root / "sub").mkdir(parents=True)
    sf.write(root / "a.wav", _tone(8000, 1.0), 8000)  # 12000 samples at 12 kHz
    sf.write(root / "b.flac", _tone(44100, 0.8, channels=2), 44100)  # 9600
    sf.write(root / "sub" / "c.ogg", _tone(48000, 1.5, channels=2), 48000)  # 18000
    sf.write(root / "short.wav", _tone(12000, 0.2), 12000)  # 2400 < 4096
    (root / "sub" / "bad.wav").write_bytes(b"RIFF\x00\x00garbage" * 10)


def test_audio_folder(tmp_path, caplog):
    _audio_tree(tmp_path)
    with caplog.at_level(logging.WARNING):
        ds = AudioFolder(tmp_path, "train", seq_len=4096, val_fraction=0.0)
    assert ds.kind == "audio" and ds.seq_len == 4096
    assert ds.files == ["a.wav", "b.flac", "sub/c.ogg"]
    assert ds.skipped == 2 and ds.too_short == 1 and "bad.wav" in caplog.text
    assert abs(ds.lengths[0] - 12000) <= 1 and abs(ds.lengths[1] - 9600) <= 1
    assert len(ds) == 2 + 2 + 4
    for i in range(len(ds)):
        w = ds[i]
        assert w.shape == (4096,) and w.dtype == np.uint8
        assert w.min() < 40 and w.max() > 215  # a 0.5 sine in mu-law spans most levels
    assert len(list((tmp_path / ".cache").glob("*.npy"))) == 4  # the short one is cached too
    assert len(list((tmp_path / ".cache").glob("*.failed"))) == 1  # bad.wav is not retried


def test_audio_folder_cache_reused(tmp_path, monkeypatch):
    _audio_tree(tmp_path)
    ds = AudioFolder(tmp_path, "train", seq_len=4096, val_fraction=0.0, jitter=False)
    # nothing is decoded again, not even bad.wav (its failure is remembered)
    monkeypatch.setattr(audio_folder_mod, "load_audio", lambda *a, **k: pytest.fail("decoded again"))
    ds2 = open_dataset("audio", tmp_path, "train", seq_len=4096, val_fraction=0.0, jitter=False)
    assert ds2.files == ds.files and ds2.skipped == 2 and ds2.too_short == 1
    for i in range(len(ds)):
        np.testing.assert_array_equal(ds[i], ds2[i])
    np.testing.assert_array_equal(ds[1], np.load(ds._caches[0])[4096:8192])  # no jitter: plain windows


def test_audio_folder_jitter_deterministic(tmp_path):
    sf.write(tmp_path / "long.wav", _tone(12000, 3.0, freq=3.0), 12000)
    a = AudioFolder(tmp_path, "train", seq_len=4096, val_fraction=0.0)
    b = AudioFolder(tmp_path, "train", seq_len=4096, val_fraction=0.0)
    assert len(a) == 36000 // 4096
    starts0 = [a.window_start(i)[1] for i in range(len(a))]
    assert starts0 == [b.window_start(i)[1] for i in range(len(b))]
    assert all(0 <= s <= 36000 - 4096 for s in starts0)
    a.set_epoch(1)
    assert [a.window_start(i)[1] for i in range(len(a))] != starts0
    val = AudioFolder(tmp_path, "val", seq_len=4096, val_fraction=1.0)
    assert [val.window_start(i)[1] for i in range(len(val))] == [4096 * i for i in range(len(val))]


def test_audio_folder_full_window_and_errors(tmp_path):
    sf.write(tmp_path / "x.wav", _tone(24000, 6.0), 24000)
    ds = open_dataset("audio", tmp_path, "train", val_fraction=0.0)
    assert ds.seq_len == 65536 and len(ds) == 1 and ds[0].shape == (65536,)
    with pytest.raises(ValueError, match=r"shorter than seq_len=100000 .* the longest has 72000"):
        AudioFolder(tmp_path, "train", seq_len=100000, val_fraction=0.0)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="no readable audio"):
        AudioFolder(empty, "train")
    with pytest.raises(ValueError, match="seq_len"):
        AudioFolder(tmp_path, "train", seq_len=0)


def test_open_dataset_dispatch(tmp_path):
    write_imagenet64_npz(tmp_path / "val_data.npz", _images(2), [1, 2])
    assert isinstance(open_dataset("image", tmp_path, "val"), ImageNet64)
    assert isinstance(open_dataset("image", tmp_path / "val_data.npz", "train"), ImageNet64)
    with pytest.raises(ValueError, match="kind"):
        open_dataset("text", tmp_path, "train")
    with pytest.raises(ValueError, match="12288"):
        open_dataset("image", tmp_path, "val", seq_len=100)
    with pytest.raises(ValueError, match="does not exist"):
        open_dataset("image", tmp_path / "nope", "val")


# ---------------------------------------------------------------- Batches


class Toy:
    """Item i is [i, i, i, i] mod 256 (uint8); records set_epoch calls."""

    kind = "image"
    seq_len = 4
    skipped = 0

    def __init__(self, n):
        self.n = n
        self.epochs = []

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return np.full(4, i % 256, np.uint8)

    def set_epoch(self, e):
        self.epochs.append(e)


def _ids(b):
    return b[:, 0].tolist()


def test_batches_deterministic_and_epochs():
    ds = Toy(10)
    b = Batches(ds, 3, seed=5)
    first = [next(b) for _ in range(7)]
    assert first[0].dtype == torch.long and first[0].shape == (3, 4)
    again = Batches(Toy(10), 3, seed=5)
    assert all(torch.equal(x, next(again)) for x in first)
    # 3 batches per epoch (the last item dropped), distinct items within an epoch
    epoch0 = sum((_ids(x) for x in first[:3]), [])
    epoch1 = sum((_ids(x) for x in first[3:6]), [])
    assert len(set(epoch0)) == 9 and len(set(epoch1)) == 9 and epoch0 != epoch1
    assert b.epoch == 2 and b.position == 1 and ds.epochs[-1] == 2 and set(ds.epochs) == {0, 1, 2}
    other = Batches(Toy(10), 3, seed=6)
    assert [_ids(next(other)) for _ in range(3)] != [_ids(x) for x in first[:3]]


def test_batches_rank_slicing():
    single = Batches(Toy(50), 8, seed=1)
    r0 = Batches(Toy(50), 4, seed=1, rank=0, world_size=2)
    r1 = Batches(Toy(50), 4, seed=1, rank=1, world_size=2)
    for _ in range(15):  # crosses epoch boundaries (6 global batches per epoch)
        assert torch.equal(torch.cat([next(r0), next(r1)]), next(single))


def test_batches_resume():
    b = Batches(Toy(23), 4, seed=3)
    for _ in range(7):
        next(b)
    state = json.loads(json.dumps(b.state_dict()))  # survives a JSON checkpoint
    assert {"epoch", "position", "seed"} <= state.keys() and state["epoch"] == 1
    expected = [next(b) for _ in range(10)]
    resumed = Batches(Toy(23), 4, seed=0)
    resumed.load_state_dict(state)
    assert all(torch.equal(x, next(resumed)) for x in expected)
    with pytest.raises(ValueError, match="state"):
        resumed.load_state_dict({"epoch": 0})


def test_batches_errors():
    with pytest.raises(ValueError, match="global batch"):
        Batches(Toy(5), 4, world_size=2)
    with pytest.raises(ValueError, match="rank"):
        Batches(Toy(50), 4, rank=2, world_size=2)
    with pytest.raises(ValueError, match="batch_size"):
        Batches(Toy(50), 0)
    with pytest.raises(ValueError, match="seq_len"):
        Batches([1, 2, 3], 1)


def test_eval_batches():
    ev = eval_batches(Toy(10), 4, max_items=9)
    got = [_ids(x) for x in ev]
    assert got == [[0, 1, 2, 3], [4, 5, 6, 7], [8]] and len(ev) == 3
    assert [_ids(x) for x in ev] == got  # re-iterable, same items
    assert sum((_ids(x) for x in eval_batches(Toy(10), 4)), []) == list(range(10))
    r0 = sum((_ids(x) for x in eval_batches(Toy(10), 2, 9, rank=0, world_size=2)), [])
    r1 = sum((_ids(x) for x in eval_batches(Toy(10), 2, 9, rank=1, world_size=2)), [])
    assert sorted(r0 + r1) == list(range(9))


def test_batches_over_real_dataset(tmp_path):
    imgs = _images(6)
    write_imagenet64_npz(tmp_path / "val_data.npz", imgs, list(range(6)))
    ds = ImageNet64(tmp_path, "val")
    b = next(Batches(ds, 2, seed=0))
    assert b.shape == (2, 12288) and b.dtype == torch.long and 0 <= b.min() and b.max() <= 255
    perm = np.random.default_rng([0, 0]).permutation(6)
    np.testing.assert_array_equal(b.numpy(), imgs[perm[:2]].reshape(2, -1))


def test_dataset_description_is_found_in_the_folder_or_the_one_above(tmp_path):
    from data.loader import dataset_description

    (tmp_path / "build" / "audio").mkdir(parents=True)
    assert dataset_description(tmp_path / "build" / "audio") is None
    (tmp_path / "build" / "dataset.json").write_text('{"name": "x", "licences": {"MIT": 1}}')
    assert dataset_description(tmp_path / "build" / "audio")["name"] == "x"  # build_audio's OUT/audio
    assert dataset_description(tmp_path / "build")["licences"] == {"MIT": 1}
    (tmp_path / "build" / "audio" / "dataset.json").write_text("not json")
    assert dataset_description(tmp_path / "build" / "audio") is None
