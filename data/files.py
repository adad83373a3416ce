"""Data held in many files: listing a folder's files, and finding item i across the files' concatenation."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np


def list_files(root: str | Path) -> list[str]:
    """Relative POSIX paths of all regular files under ``root`` (recursive, sorted), hidden ones excluded."""
    root = Path(root)
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for name in filenames:
            if not name.startswith(".") and os.path.isfile(os.path.join(dirpath, name)):
                out.append(Path(dirpath, name).relative_to(root).as_posix())
    return sorted(out)


def locate(ends: np.ndarray, i: int, what: str) -> tuple[int, int, int]:
    """Item ``i`` of a concatenation whose parts end at cumulative counts ``ends`` ->
    (part, offset inside it, i made non-negative). Negative i counts from the end."""
    n = int(ends[-1]) if len(ends) else 0
    if isinstance(i, bool) or not isinstance(i, (int, np.integer)):
        raise TypeError(f"index must be an int, got {type(i).__name__}")
    i = int(i) + n if i < 0 else int(i)
    if not 0 <= i < n:
        raise IndexError(f"index {i} out of range for {n} {what}")
    k = int(np.searchsorted(ends, i, side="right"))
    return k, i - (int(ends[k - 1]) if k else 0), i
