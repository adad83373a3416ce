"""Train/validation splits: the split names, argument checks, and the stable per-file hash split."""

from __future__ import annotations

import hashlib

SPLITS = ("train", "val")


def check_split(split: str) -> str:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    return split


def check_fraction(val_fraction: float) -> float:
    if isinstance(val_fraction, bool) or not isinstance(val_fraction, (int, float)) or not 0 <= val_fraction <= 1:
        raise ValueError(f"val_fraction must be a number in [0, 1], got {val_fraction!r}")
    return float(val_fraction)


def hash_split(relpath: str, val_fraction: float, seed: int = 0) -> str:
    """"val" or "train" for a file, from a stable hash of (seed, relative path): adding files moves no others."""
    h = hashlib.sha1(f"{seed}:{relpath}".encode()).digest()
    return "val" if int.from_bytes(h[:8], "big") / 2.0**64 < val_fraction else "train"
