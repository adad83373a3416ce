"""The checkpoints the app serves: found by their cards in one folder, weights loaded on first use."""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import torch

from models import CheckpointError, card_kind, config_from_card, load_card, load_model
from models.architectures import Config, Model
from sampling import SamplingOptions, card_defaults

LOADED_MODELS = 2  # models kept in memory at once (least recently used ones are dropped)


@dataclass(frozen=True)
class Entry:
    """One checkpoint: ``path`` is the folder / NAME (no extension); ``card`` its model card."""

    name: str
    path: Path
    kind: str
    card: dict

    @property
    def config(self) -> Config:
        return config_from_card(self.card)

    @property
    def defaults(self) -> SamplingOptions:
        """The card's sampling defaults (temperature 1, no filter without them)."""
        return card_defaults(self.card)


def pick_device(name: str) -> torch.device:
    """"auto" (CUDA when there is one), "cpu", "cuda" or "cuda:N"."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device must be auto, cpu, cuda or cuda:N, got {name!r}") from None
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device must be auto, cpu, cuda or cuda:N, got {name!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for but CUDA is not available")
    return device


class Registry:
    """The checkpoints in ``folder`` (read once, at start) and a small cache of loaded models."""

    def __init__(self, folder: str | Path, device: torch.device):
        self.folder, self.device = Path(folder), device
        self.entries: list[Entry] = []
        self.problems: list[str] = []  # "NAME: why its card cannot be used"
        cards = sorted(self.folder.glob("*.json")) if self.folder.is_dir() else []
        for card_path in cards:
            path = card_path.with_suffix("")
            try:
                card = load_card(path)
                card_defaults(card)
            except (CheckpointError, ValueError) as e:
                self.problems.append(f"{card_path.name}: {e}")
                continue
            self.entries.append(Entry(path.name, path, card_kind(card, config_from_card(card)), card))
        self._loaded: OrderedDict[str, Model] = OrderedDict()
        self._lock = threading.Lock()

    def of_kind(self, kind: str) -> list[Entry]:
        return [e for e in self.entries if e.kind == kind]

    def entry(self, name: object, kind: str) -> Entry:
        """The ``kind`` checkpoint called ``name``; ValueError listing the choices otherwise."""
        choices = [e.name for e in self.of_kind(kind)]
        for e in self.of_kind(kind):
            if e.name == name:
                return e
        raise ValueError(f"no {kind} model called {name!r}; the {kind} models are {choices}")

    def model(self, name: object, kind: str) -> Model:
        """The loaded model (CheckpointError if its weights are missing or corrupt)."""
        entry = self.entry(name, kind)
        with self._lock:
            if entry.name not in self._loaded:
                self._loaded[entry.name] = load_model(entry.path, self.device)
                while len(self._loaded) > LOADED_MODELS:
                    self._loaded.popitem(last=False)
            self._loaded.move_to_end(entry.name)
            return self._loaded[entry.name]
