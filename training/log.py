"""log.jsonl: one JSON line per step, per evaluation, and at a run's start and end."""

from __future__ import annotations

import json
from pathlib import Path

from models.checkpoint import atomic_path


class Log:
    """log.jsonl on rank 0; on resume, lines past the checkpoint's step are dropped (they get redone; the
    trimmed log replaces the old one atomically)."""

    def __init__(self, path: Path, enabled: bool, resume_step: int | None) -> None:
        self.path, self.enabled = path, enabled
        if enabled and resume_step is not None and path.exists():
            kept = [ln for ln in path.read_text().splitlines() if ln and json.loads(ln).get("step", 0) <= resume_step]
            with atomic_path(path) as tmp:
                tmp.write_text("".join(ln + "\n" for ln in kept))
        self.file = open(path, "a") if enabled else None

    def write(self, **record) -> None:
        if self.file:
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()

    def close(self) -> None:
        if self.file:
            self.file.close()
