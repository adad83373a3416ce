"""A folder of arbitrary images (recursive) as 64x64 image token sequences."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import numpy as np
from PIL import Image

from media.image import IMAGE_TOKENS, MAX_IMAGE_PIXELS, image_to_tokens, load_image

from .files import list_files
from .splits import check_fraction, check_split, hash_split

logger = logging.getLogger(__name__)


def _valid_image(path: Path) -> str | None:
    """None if Pillow can open and verify ``path`` within the pixel limit, else the reason."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                w, h = im.size
                if w * h > MAX_IMAGE_PIXELS:
                    return f"{w}x{h} is over the {MAX_IMAGE_PIXELS:,}-pixel limit"
                im.verify()
    except Exception as e:  # noqa: BLE001 - Pillow raises many types for bad files; each one means "skip"
        return f"{type(e).__name__}: {e}"
    return None


class ImageFolder:
    """Every image Pillow reads under ``path`` (recursive; hidden files and folders ignored), as uint8 [12288].

    Each image goes through media.image.load_image (EXIF orientation, centre crop, box resample to
    64x64) and image_to_tokens. The train/val split is a stable hash of (seed, relative path), so adding
    files never moves existing ones across it. Files failing the validating scan at construction are
    skipped (counted in ``skipped``, logged); one failing later is replaced by the next good item.
    """

    kind = "image"
    seq_len = IMAGE_TOKENS

    def __init__(self, path: str | Path, split: str = "train", val_fraction: float = 0.05, seed: int = 0):
        self.path = Path(path)
        self.split = check_split(split)
        self.val_fraction = check_fraction(val_fraction)
        self.seed = seed
        if not self.path.is_dir():
            raise ValueError(f"image folder {self.path} is not a directory")
        names = [r for r in list_files(self.path) if hash_split(r, self.val_fraction, seed) == split]
        self.skipped = 0
        self.files: list[str] = []
        for rel in names:
            reason = _valid_image(self.path / rel)
            if reason is None:
                self.files.append(rel)
            else:
                self.skipped += 1
                logger.warning("skipping %s: not a readable image (%s)", self.path / rel, reason)
        if not self.files:
            raise ValueError(f"no readable images for split {split!r} in {self.path} ({len(names)} files in the "
                             f"split, {self.skipped} unreadable; val_fraction={self.val_fraction})")
        self._bad: set[int] = set()
        logger.info("ImageFolder %s: %d images in %s (%d skipped)", split, len(self.files), self.path, self.skipped)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> np.ndarray:
        """Image i as tokens uint8 [12288]; a file that fails to decode is replaced by the next good one."""
        n = len(self.files)
        if isinstance(i, bool) or not isinstance(i, (int, np.integer)):
            raise TypeError(f"index must be an int, got {type(i).__name__}")
        i = int(i) + n if i < 0 else int(i)
        if not 0 <= i < n:
            raise IndexError(f"index {i} out of range for {n} images")
        for k in range(n):
            j = (i + k) % n
            if j in self._bad:
                continue
            try:
                return image_to_tokens(load_image(self.path / self.files[j]))
            except ValueError as e:
                self._bad.add(j)
                self.skipped += 1
                logger.warning("skipping %s at read time: %s", self.path / self.files[j], e)
        raise ValueError(f"none of the {n} images in {self.path} could be decoded")
