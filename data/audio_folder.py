"""A folder of audio files (recursive) as windows of 12 kHz 8-bit mu-law tokens."""

from __future__ import annotations

import hashlib
import logging
import os
from collections import OrderedDict
from pathlib import Path

import numpy as np

from media.audio import AUDIO_TOKENS, SAMPLE_RATE, audio_to_tokens, load_audio

from .files import list_files, locate
from .splits import check_fraction, check_split, hash_split

logger = logging.getLogger(__name__)

_OPEN_FILES = 64  # memory maps kept open (LRU)


class AudioFolder:
    """Every file soundfile reads under ``path`` (recursive), as windows uint8 [seq_len] of mu-law tokens.

    Split by file with a stable hash of (seed, relative path). Each file is decoded once (mono,
    ``sample_rate``, mu-law) to ``cache_dir/<key>.npy`` (default ``<path>/.cache``; the key hashes
    relative path, size, mtime and rate) and memory-mapped. ``len`` is the number of non-overlapping
    windows, floor(length / seq_len) per file. Window w of a file starts at w * seq_len, plus, when
    ``jitter`` (default: train split only), an offset uniform in [-seq_len/2, seq_len/2] drawn from
    (seed, epoch, i) and clipped to the file; ``set_epoch(e)`` picks the epoch. Unreadable files and
    files shorter than seq_len are skipped (both counted in ``skipped``; the short ones also in
    ``too_short``).
    """

    kind = "audio"

    def __init__(self, path: str | Path, split: str = "train", seq_len: int = AUDIO_TOKENS,
                 val_fraction: float = 0.05, seed: int = 0, sample_rate: int = SAMPLE_RATE,
                 cache_dir: str | Path | None = None, jitter: bool | None = None):
        self.path = Path(path)
        self.split = check_split(split)
        self.val_fraction = check_fraction(val_fraction)
        if isinstance(seq_len, bool) or not isinstance(seq_len, (int, np.integer)) or seq_len < 1:
            raise ValueError(f"seq_len must be a positive int, got {seq_len!r}")
        if isinstance(sample_rate, bool) or not isinstance(sample_rate, (int, np.integer)) or sample_rate < 1:
            raise ValueError(f"sample_rate must be a positive int, got {sample_rate!r}")
        if not self.path.is_dir():
            raise ValueError(f"audio folder {self.path} is not a directory")
        self.seq_len = int(seq_len)
        self.sample_rate = int(sample_rate)
        self.seed = seed
        self.jitter = split == "train" if jitter is None else bool(jitter)
        self.cache_dir = Path(cache_dir) if cache_dir is not None else self.path / ".cache"
        self.epoch = 0
        names = [r for r in list_files(self.path) if hash_split(r, self.val_fraction, seed) == split]
        self.skipped = 0
        self.too_short = 0
        longest = 0
        self.files: list[str] = []
        self._caches: list[Path] = []
        lengths = []
        for n, rel in enumerate(names):
            try:
                cache, length = self._cached(rel)
            except ValueError as e:
                self.skipped += 1
                logger.warning("skipping %s: %s", self.path / rel, e)
                continue
            longest = max(longest, length)
            if length < self.seq_len:
                self.skipped += 1
                self.too_short += 1
                logger.info("skipping %s: %d samples, shorter than seq_len=%d", self.path / rel, length, self.seq_len)
                continue
            self.files.append(rel)
            self._caches.append(cache)
            lengths.append(length)
            if (n + 1) % 100 == 0:
                logger.info("AudioFolder %s: %d/%d files ready", split, n + 1, len(names))
        if not self.files:
            if self.too_short:
                raise ValueError(f"all {self.too_short} readable audio files of split {split!r} in {self.path} are "
                                 f"shorter than seq_len={self.seq_len} samples ({self.seq_len / self.sample_rate:.2f}"
                                 f" s at {self.sample_rate} Hz); the longest has {longest} samples")
            raise ValueError(f"no readable audio files for split {split!r} in {self.path} ({len(names)} files in "
                             f"the split, {self.skipped} unreadable; val_fraction={self.val_fraction})")
        self.lengths = np.array(lengths, dtype=np.int64)
        self._ends = np.cumsum(self.lengths // self.seq_len)
        self._open: OrderedDict[int, np.ndarray] = OrderedDict()
        logger.info("AudioFolder %s: %d windows of %d from %d files in %s (%d skipped, %d of them too short)",
                    split, len(self), self.seq_len, len(self.files), self.path, self.skipped, self.too_short)

    def _cached(self, rel: str) -> tuple[Path, int]:
        """Decode ``rel`` to its cached token .npy if needed; (cache path, number of samples)."""
        src = self.path / rel
        st = src.stat()
        key = hashlib.sha1(f"{rel}|{st.st_size}|{st.st_mtime_ns}|{self.sample_rate}|mulaw8".encode()).hexdigest()
        cache = self.cache_dir / f"{key[:24]}.npy"
        failed = cache.with_suffix(".failed")  # remembers files that could not be decoded
        if failed.is_file():
            raise ValueError(f"{failed.read_text(errors='replace').strip()} (cached; delete {failed} to retry)")
        if cache.is_file():
            try:
                return cache, len(np.load(cache, mmap_mode="r"))
            except (ValueError, OSError, EOFError) as e:
                logger.warning("rebuilding unreadable cache %s: %s", cache, e)
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        try:
            tokens = audio_to_tokens(load_audio(src, self.sample_rate))
        except ValueError as e:
            failed.write_text(str(e))
            raise
        tmp = cache.with_name(f"{cache.name}.tmp{os.getpid()}")
        try:
            with open(tmp, "wb") as f:
                np.save(f, tokens)
            os.replace(tmp, cache)  # atomic: ranks decoding the same file concurrently agree
        finally:
            tmp.unlink(missing_ok=True)
        return cache, len(tokens)

    def set_epoch(self, epoch: int) -> None:
        """Epoch for the window jitter (Batches calls this)."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return int(self._ends[-1])

    def _array(self, k: int) -> np.ndarray:
        a = self._open.get(k)
        if a is None:
            a = np.load(self._caches[k], mmap_mode="r")
            self._open[k] = a
            if len(self._open) > _OPEN_FILES:
                self._open.popitem(last=False)
        else:
            self._open.move_to_end(k)
        return a

    def window_start(self, i: int) -> tuple[int, int]:
        """(file index, start sample) of window i in the current epoch."""
        k, w, i = locate(self._ends, i, "windows")
        start = w * self.seq_len
        if self.jitter:
            half = self.seq_len // 2
            start += int(np.random.default_rng([self.seed, self.epoch, i]).integers(-half, half + 1))
            start = min(max(start, 0), int(self.lengths[k]) - self.seq_len)
        return k, start

    def __getitem__(self, i: int) -> np.ndarray:
        """Window i as mu-law tokens uint8 [seq_len]."""
        k, start = self.window_start(i)
        return np.array(self._array(k)[start: start + self.seq_len], dtype=np.uint8)
