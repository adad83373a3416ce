"""Each browser session's results: their files (samples, grid or picture, settings JSON) in a folder per
result on the server, and a list of HistoryEntry in the session's gr.State, newest first.

The settings JSON (sampling/recipe.py) makes the result again with ``python sample.py --from-json``. A session
keeps its last HISTORY_SIZE results; older ones, and all of a session's when it ends, are deleted.
"""

from __future__ import annotations

import atexit
import shutil
import tempfile
import threading
import uuid
import zipfile
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

HISTORY_SIZE = 20  # results kept per browser session
API_RESULTS = 64  # results of API calls kept (for clients to download), over all clients
PREVIEW_SECONDS = 120  # an API call's preview files are deleted this long after it ends


@dataclass(eq=False)  # hashed by identity (gr.State hashes its value)
class HistoryEntry:
    """One finished run: ``picture`` the grid (images) or waveform picture (audio), ``media`` the sample files,
    ``recipe`` its settings JSON, ``options`` sample.py's options, ``gallery`` the image tab's tiles."""

    kind: str
    folder: Path
    picture: Path
    media: list[Path]
    recipe: Path
    status: str
    options: dict
    model_name: str
    gallery: list[tuple[Path, str]] = field(default_factory=list)

    def files(self) -> list[Path]:
        """The settings JSON, the samples and the prompt (if any): what sample.py --from-json needs and makes."""
        prompt = [p for p in (self.folder / "original.png", self.folder / "prompt.wav") if p.is_file()]
        return [self.recipe, *self.media, *prompt]

    def bundle(self) -> Path:
        """One zip of files(), made once: unzip it and run ``python sample.py --from-json settings.json``."""
        path = self.folder / f"{self.kind}_{self.folder.name[:8]}.zip"
        if not path.is_file():
            tmp = path.with_suffix(".zip.tmp")
            with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as z:
                for f in self.files():
                    z.write(f, f.name)
            tmp.replace(path)
        return path

    def downloads(self) -> list[str]:
        """What the history offers to download: the zip of everything, then each file on its own."""
        return [str(self.bundle()), *map(str, self.files())]

    def settings_line(self) -> str:
        shown = {k: v for k, v in self.options.items() if v is not None}
        return " · ".join(f"{k} {v:g}" if isinstance(v, float) else f"{k} {v}" for k, v in shown.items())


class History:
    """The folders of every session's results, under one temporary folder removed when the app exits."""

    def __init__(self, root: Path | None = None):
        self.root = Path(tempfile.mkdtemp(prefix="studio-history-")) if root is None else Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        atexit.register(shutil.rmtree, self.root, ignore_errors=True)
        self._api: deque[Path] = deque()
        self._lock = threading.Lock()

    def new_folder(self) -> Path:
        folder = self.root / uuid.uuid4().hex
        folder.mkdir()
        return folder

    def add(self, history: list | None, entry: HistoryEntry) -> list[HistoryEntry]:
        """``history`` with ``entry`` first, trimmed to HISTORY_SIZE (the dropped results' files deleted)."""
        entries = [entry, *(history or [])]
        for old in entries[HISTORY_SIZE:]:
            self.remove(old)
        return entries[:HISTORY_SIZE]

    def add_api(self, entry: HistoryEntry) -> None:
        """Keep an API call's result for its client to download; the oldest beyond API_RESULTS are deleted."""
        with self._lock:
            self._api.append(entry.folder)
            while len(self._api) > API_RESULTS:
                shutil.rmtree(self._api.popleft(), ignore_errors=True)

    def remove_later(self, folder: Path) -> None:
        """Delete ``folder`` (an API call's previews) after PREVIEW_SECONDS, when its client has them."""
        timer = threading.Timer(PREVIEW_SECONDS, shutil.rmtree, (folder,), {"ignore_errors": True})
        timer.daemon = True
        timer.start()

    def remove(self, entry: object) -> None:
        if isinstance(entry, HistoryEntry) and entry.folder.parent == self.root:
            shutil.rmtree(entry.folder, ignore_errors=True)

    def clear(self, history: list | None) -> list:
        """Delete every result of a session (when it ends, or on Clear)."""
        for entry in history or []:
            self.remove(entry)
        return []
