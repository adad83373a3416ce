"""Downsampled ImageNet 64x64 (the official npz release), streamed from disk as image tokens.

Each npz holds ``data`` [N, 12288] uint8 as three 64x64 colour planes per row (R, G, B: CHW)
and ``labels`` [N]. Uncompressed members (np.savez) are memory-mapped in place inside the zip;
compressed ones (np.savez_compressed) are unpacked once to a cached .npy and memory-mapped.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import struct
import zipfile
import zlib
from pathlib import Path

import numpy as np

from media.image import IMAGE_CHANNELS, IMAGE_SIZE, IMAGE_TOKENS

from .files import locate
from .splits import check_split

logger = logging.getLogger(__name__)

TRAIN_PATTERNS = ("Imagenet64_train_part*.npz", "train_data_batch_*.npz")
VAL_PATTERNS = ("val_data.npz", "val_data_batch_*.npz", "Imagenet64_val*.npz")
_LOCAL_HEADER = struct.Struct("<4s5H3I2H")  # zip local file header, 30 bytes


def _natural_key(p: Path) -> tuple:
    return tuple(int(t) if t.isdigit() else t for t in re.split(r"(\d+)", p.name))


def find_parts(path: str | Path, split: str) -> list[Path]:
    """The npz files of ``split`` under directory ``path`` (natural order), or [path] for an .npz file."""
    check_split(split)
    path = Path(path)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise ValueError(f"ImageNet64 path {path} is neither an .npz file nor a directory")
    patterns = TRAIN_PATTERNS if split == "train" else VAL_PATTERNS
    found = {p for pat in patterns for p in path.glob(pat) if p.is_file()}
    return sorted(found, key=_natural_key)


def _member_name(zf: zipfile.ZipFile, key: str) -> str:
    for name in (f"{key}.npy", key):
        if name in zf.NameToInfo:
            return name
    raise ValueError(f"no '{key}' array in the npz (members: {zf.namelist()[:8]})")


def _read_npy_header(fp) -> tuple[tuple[int, ...], bool, np.dtype]:
    version = np.lib.format.read_magic(fp)
    if version == (1, 0):
        return np.lib.format.read_array_header_1_0(fp)
    # 2.0 and 3.0 share the layout (3.0 only allows utf-8 field names; ours are ascii).
    return np.lib.format.read_array_header_2_0(fp)


def _stored_offset(npz: Path, info: zipfile.ZipInfo) -> int:
    """Byte offset of an uncompressed member's data inside the zip file."""
    with open(npz, "rb") as f:
        f.seek(info.header_offset)
        raw = f.read(_LOCAL_HEADER.size)
    if len(raw) != _LOCAL_HEADER.size:
        raise ValueError("truncated zip local header")
    sig, *_, name_len, extra_len = _LOCAL_HEADER.unpack(raw)
    if sig != b"PK\x03\x04":
        raise ValueError("bad zip local header signature")
    return info.header_offset + _LOCAL_HEADER.size + name_len + extra_len


def _memmap_member(npz: Path, key: str, cache_dir: Path) -> np.ndarray:
    """Memory-map array ``key`` of ``npz``: in place when stored, else via a cached .npy copy."""
    with zipfile.ZipFile(npz) as zf:
        info = zf.getinfo(_member_name(zf, key))
        if info.compress_type == zipfile.ZIP_STORED:
            start = _stored_offset(npz, info)
            with open(npz, "rb") as f:
                f.seek(start)
                shape, fortran, dtype = _read_npy_header(f)
                offset = f.tell()
            if dtype.hasobject:
                raise ValueError(f"'{key}' holds Python objects; cannot memory-map it")
            if offset - start + int(np.prod(shape)) * dtype.itemsize > info.file_size:
                raise ValueError(f"'{key}' is truncated")
            return np.memmap(npz, dtype=dtype, mode="r", offset=offset, shape=shape, order="F" if fortran else "C")
        st = npz.stat()
        cached = cache_dir / f"{npz.stem}.{key}.{st.st_size}-{st.st_mtime_ns}.npy"
        if not cached.is_file():
            cache_dir.mkdir(parents=True, exist_ok=True)
            logger.info("%s: '%s' is compressed; unpacking it once to %s for memory-mapping", npz, key, cached)
            tmp = cached.with_name(f"{cached.name}.tmp{os.getpid()}")
            try:
                with zf.open(info) as src, open(tmp, "wb") as dst:
                    shutil.copyfileobj(src, dst, 1 << 22)  # streams: never the whole array in memory
                os.replace(tmp, cached)  # atomic: concurrent ranks may both unpack, one file results
            finally:
                tmp.unlink(missing_ok=True)
    return np.load(cached, mmap_mode="r", allow_pickle=False)


class ImageNet64:
    """Official downsampled ImageNet 64x64 npz files as image token sequences (uint8 [12288], HWC order).

    path: a directory with ``Imagenet64_train_part*.npz`` / ``train_data_batch_*.npz`` (train) and
      ``val_data.npz`` (val), or one .npz file (used whatever the split).
    cache_dir: where compressed members are unpacked; default ``<dir>/.cache``.
    Corrupt parts are skipped with a warning and counted in ``skipped``.
    """

    kind = "image"
    seq_len = IMAGE_TOKENS

    def __init__(self, path: str | Path, split: str = "train", cache_dir: str | Path | None = None):
        self.path = Path(path)
        self.split = split
        parts = find_parts(self.path, split)
        if not parts:
            pats = TRAIN_PATTERNS if split == "train" else VAL_PATTERNS
            raise ValueError(f"no ImageNet64 {split} files in {self.path} (looked for {', '.join(pats)})")
        root = self.path if self.path.is_dir() else self.path.parent
        self.cache_dir = Path(cache_dir) if cache_dir is not None else root / ".cache"
        self.skipped = 0
        self.parts: list[Path] = []
        self._arrays: list[np.ndarray] = []
        for p in parts:
            try:
                a = _memmap_member(p, "data", self.cache_dir)
                if a.ndim != 2 or a.shape[1] != IMAGE_TOKENS or a.dtype != np.uint8:
                    raise ValueError(f"'data' must be uint8 [N, {IMAGE_TOKENS}], got {a.dtype} {a.shape}")
            except (ValueError, OSError, EOFError, KeyError, zipfile.BadZipFile, zipfile.LargeZipFile, zlib.error) as e:
                self.skipped += 1
                logger.warning("skipping corrupt ImageNet64 part %s: %s", p, e)
                continue
            self.parts.append(p)
            self._arrays.append(a)
        if not self._arrays:
            raise ValueError(f"all {len(parts)} ImageNet64 {split} files in {self.path} are unreadable")
        self._ends = np.cumsum([len(a) for a in self._arrays])
        if self._ends[-1] == 0:
            raise ValueError(f"ImageNet64 {split} files in {self.path} hold zero images")
        self._labels: list[np.ndarray] | None = None
        logger.info("ImageNet64 %s: %d images from %d files in %s (%d skipped)", split, len(self),
                    len(self.parts), self.path, self.skipped)

    def __len__(self) -> int:
        return int(self._ends[-1])

    def __getitem__(self, i: int) -> np.ndarray:
        """Image i as tokens uint8 [12288] (raster order, channel innermost)."""
        k, j, _ = locate(self._ends, i, "images")
        row = np.asarray(self._arrays[k][j])
        return np.ascontiguousarray(row.reshape(IMAGE_CHANNELS, IMAGE_SIZE, IMAGE_SIZE).transpose(1, 2, 0)).ravel()

    def label(self, i: int) -> int:
        """Class label of image i as stored in the file (the official release counts from 1)."""
        k, j, _ = locate(self._ends, i, "images")
        if self._labels is None:
            self._labels = [_memmap_member(p, "labels", self.cache_dir) for p in self.parts]
        return int(self._labels[k][j])


def write_imagenet64_npz(path: str | Path, images_hwc: np.ndarray, labels: np.ndarray | list[int],
                         compressed: bool = False) -> Path:
    """Write images uint8 [N, 64, 64, 3] and labels [N] in the official layout (``data`` as R, G, B planes).

    Uncompressed by default so that ImageNet64 can memory-map it. Written atomically. Returns the path.
    """
    path = Path(path)
    if path.suffix != ".npz":
        raise ValueError(f"path must end in .npz, got {path}")
    if not isinstance(images_hwc, np.ndarray) or images_hwc.dtype != np.uint8:
        raise ValueError("images_hwc must be a uint8 numpy array [N, 64, 64, 3]")
    if images_hwc.ndim != 4 or images_hwc.shape[1:] != (IMAGE_SIZE, IMAGE_SIZE, IMAGE_CHANNELS):
        raise ValueError(f"images_hwc must be [N, 64, 64, 3], got shape {images_hwc.shape}")
    labels = np.asarray(labels)
    if labels.size == 0:
        labels = labels.astype(np.int64)
    if labels.shape != (len(images_hwc),) or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be {len(images_hwc)} integers, got {labels.dtype} {labels.shape}")
    data = np.ascontiguousarray(images_hwc.transpose(0, 3, 1, 2)).reshape(len(images_hwc), IMAGE_TOKENS)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            (np.savez_compressed if compressed else np.savez)(f, data=data, labels=labels.astype(np.int64))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path
