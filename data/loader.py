"""Dataset protocol, ``open_dataset``, and the deterministic, resumable batch iterator ``Batches``.

A dataset has ``__len__()``, ``__getitem__(i) -> np.ndarray uint8 [seq_len]``, attributes
``seq_len``, ``kind`` ("image" or "audio") and ``skipped`` (bad files skipped), and optionally
``set_epoch(epoch)`` (per-epoch augmentation such as audio window jitter).
"""

from __future__ import annotations

import json
import logging
import operator
from collections.abc import Iterator
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np
import torch

from media.audio import AUDIO_TOKENS
from media.image import IMAGE_TOKENS

from .audio_folder import AudioFolder
from .image_folder import ImageFolder
from .imagenet64 import ImageNet64
from .splits import check_split

logger = logging.getLogger(__name__)

KINDS = ("image", "audio")
DESCRIPTION = "dataset.json"  # what a builder in data/ says about the data set it wrote


@runtime_checkable
class TokenDataset(Protocol):
    """What Batches and eval_batches read."""

    seq_len: int
    kind: str
    skipped: int

    def __len__(self) -> int: ...

    def __getitem__(self, i: int) -> np.ndarray: ...


def dataset_description(path: str | Path) -> dict | None:
    """The ``dataset.json`` a builder (data/build_images.py, data/build_audio.py) wrote: name, builder,
    sources, licences, size. Looked for in the data folder and then in the folder above it (build_audio
    writes OUT/dataset.json next to OUT/audio/); None when there is none or it is unreadable."""
    folder = Path(path) if Path(path).is_dir() else Path(path).parent
    for candidate in (folder / DESCRIPTION, folder.parent / DESCRIPTION):
        if candidate.is_file():
            try:
                description = json.loads(candidate.read_text())
            except (OSError, UnicodeDecodeError, json.JSONDecodeError):
                return None
            return description if isinstance(description, dict) else None
    return None


def _check_int(name: str, v: object, lo: int) -> int:
    """An int >= lo (numpy and 0-d torch integers accepted, bool not)."""
    try:
        i = operator.index(v) if not isinstance(v, bool) else None
    except TypeError:
        i = None
    if i is None or i < lo:
        raise ValueError(f"{name} must be an int >= {lo}, got {v!r}")
    return i


def _check_dataset(dataset: object) -> None:
    for attr in ("seq_len", "__len__", "__getitem__"):
        if not hasattr(dataset, attr):
            raise ValueError(f"dataset must have __len__, __getitem__ and seq_len (see data.loader); "
                             f"{type(dataset).__name__} has no {attr}")


def open_dataset(kind: str, path: str | Path, split: str, seq_len: int | None = None, **kw) -> TokenDataset:
    """The reader for ``kind`` and ``path``.

    kind "image": an .npz file or a directory containing *.npz -> ImageNet64, any other
      directory -> ImageFolder (seq_len must be None or 12288).
    kind "audio": a directory of audio files -> AudioFolder (seq_len default 65536).
    Extra keyword arguments go to the reader (cache_dir, val_fraction, seed, ...).
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    check_split(split)
    path = Path(path)
    if not path.exists():
        raise ValueError(f"dataset path {path} does not exist")
    if kind == "image":
        if seq_len not in (None, IMAGE_TOKENS):
            raise ValueError(f"image datasets have seq_len {IMAGE_TOKENS} (64x64x3), got seq_len={seq_len}")
        if (path.is_file() and path.suffix == ".npz") or (path.is_dir() and any(path.glob("*.npz"))):
            return ImageNet64(path, split, **kw)
        if path.is_file():
            raise ValueError(f"an image dataset is an .npz file or a directory, got {path}")
        return ImageFolder(path, split, **kw)
    if not path.is_dir():
        raise ValueError(f"an audio dataset is a directory of audio files, got {path}")
    return AudioFolder(path, split, seq_len=AUDIO_TOKENS if seq_len is None else seq_len, **kw)


def _stack(dataset: TokenDataset, indices: np.ndarray) -> torch.Tensor:
    rows = [np.asarray(dataset[int(i)], dtype=np.uint8) for i in indices]
    for r in rows:
        if r.shape != (dataset.seq_len,):
            raise ValueError(f"dataset item has shape {r.shape}, expected ({dataset.seq_len},)")
    return torch.from_numpy(np.stack(rows)).long()


class Batches:
    """Infinite, deterministic, resumable training batches: ``next(b)`` -> LongTensor [batch_size, seq_len].

    Epoch e visits ``np.random.default_rng([seed, e]).permutation(len(dataset))``; global batch k is
    entries [k * G, (k + 1) * G) of it with G = batch_size * world_size, and rank r takes the slice
    [r * batch_size, (r + 1) * batch_size) of that. The last incomplete global batch of an epoch is
    dropped. ``state_dict()`` / ``load_state_dict()`` resume exactly where a run stopped.
    Only the current batch is held in memory (plus the epoch's index permutation).
    """

    def __init__(self, dataset: TokenDataset, batch_size: int, seed: int = 0, rank: int = 0, world_size: int = 1):
        _check_dataset(dataset)
        self.dataset = dataset
        self.batch_size = _check_int("batch_size", batch_size, 1)
        self.seed = _check_int("seed", seed, 0)
        self.world_size = _check_int("world_size", world_size, 1)
        self.rank = _check_int("rank", rank, 0)
        if self.rank >= self.world_size:
            raise ValueError(f"rank must be in [0, world_size={self.world_size}), got {rank}")
        self.global_batch = self.batch_size * self.world_size
        self.steps_per_epoch = len(dataset) // self.global_batch
        if self.steps_per_epoch == 0:
            raise ValueError(f"the dataset has {len(dataset)} items, fewer than one global batch of "
                             f"batch_size * world_size = {self.global_batch}")
        self.epoch = 0
        self.position = 0  # next global batch within the epoch
        self._perm: np.ndarray | None = None
        self._perm_epoch = -1

    def _permutation(self) -> np.ndarray:
        if self._perm_epoch != self.epoch:
            self._perm = np.random.default_rng([self.seed, self.epoch]).permutation(len(self.dataset))
            self._perm_epoch = self.epoch
        return self._perm

    def __iter__(self) -> Batches:
        return self

    def __next__(self) -> torch.Tensor:
        if self.position >= self.steps_per_epoch:
            self.epoch += 1
            self.position = 0
        perm = self._permutation()
        if hasattr(self.dataset, "set_epoch"):  # every batch: an evaluation on the same object may have reset it
            self.dataset.set_epoch(self.epoch)
        start = self.position * self.global_batch + self.rank * self.batch_size
        batch = _stack(self.dataset, perm[start: start + self.batch_size])
        self.position += 1
        return batch

    def state_dict(self) -> dict[str, int]:
        """{"epoch", "position", "seed"} plus "global_batch" and "dataset_len" for checks on resume."""
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed,
                "global_batch": self.global_batch, "dataset_len": len(self.dataset)}

    def load_state_dict(self, state: dict) -> None:
        """Continue with the batches the saved run would have seen next.

        The saved seed wins over the constructor's. If the global batch size changed, the position is
        converted by items seen this epoch (rounded down); if the dataset size changed the permutation
        differs, and a warning says so.
        """
        if not isinstance(state, dict) or not {"epoch", "position", "seed"} <= state.keys():
            raise ValueError(f"state must be a dict with epoch, position and seed, got {state!r}")
        epoch = _check_int("state['epoch']", state["epoch"], 0)
        position = _check_int("state['position']", state["position"], 0)
        seed = _check_int("state['seed']", state["seed"], 0)
        if seed != self.seed:
            logger.warning("resuming batches with the saved seed %d (constructor had %d)", seed, self.seed)
        saved_global = int(state.get("global_batch", self.global_batch))
        if saved_global != self.global_batch:
            logger.warning("global batch size changed from %d to %d on resume; continuing after the %d items "
                           "already seen this epoch", saved_global, self.global_batch, position * saved_global)
            position = position * saved_global // self.global_batch
        saved_len = state.get("dataset_len")
        if saved_len is not None and int(saved_len) != len(self.dataset):
            logger.warning("dataset size changed from %d to %d since the state was saved; the epoch's order "
                           "differs from the saved run's", int(saved_len), len(self.dataset))
        self.seed, self.epoch, self.position = seed, epoch, position
        self._perm_epoch = -1
        self._perm = None


class EvalBatches:
    """The first ``max_items`` of a dataset in order, as LongTensor batches; iterable any number of times."""

    def __init__(self, dataset: TokenDataset, batch_size: int, max_items: int | None = None, rank: int = 0,
                 world_size: int = 1):
        _check_dataset(dataset)
        self.dataset = dataset
        self.batch_size = _check_int("batch_size", batch_size, 1)
        world_size = _check_int("world_size", world_size, 1)
        rank = _check_int("rank", rank, 0)
        if rank >= world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
        n = len(dataset) if max_items is None else min(_check_int("max_items", max_items, 1), len(dataset))
        self.indices = np.arange(n)[rank::world_size]  # rank r evaluates items r, r + W, ...

    def __len__(self) -> int:
        return -(-len(self.indices) // self.batch_size)

    @property
    def num_items(self) -> int:
        return len(self.indices)

    def __iter__(self) -> Iterator[torch.Tensor]:
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(0)
        for s in range(0, len(self.indices), self.batch_size):
            yield _stack(self.dataset, self.indices[s: s + self.batch_size])


def eval_batches(dataset: TokenDataset, batch_size: int, max_items: int | None = None, rank: int = 0,
                 world_size: int = 1) -> EvalBatches:
    """Held-out batches: items 0 .. max_items - 1 of ``dataset`` in order (the last batch may be smaller).

    With world_size > 1 rank r takes items r, r + world_size, ... so the ranks together cover each item once.
    """
    return EvalBatches(dataset, batch_size, max_items, rank, world_size)
