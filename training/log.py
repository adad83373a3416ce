"""log.jsonl: one JSON line per step, per evaluation, and at a run's start and end."""

from __future__ import annotations

import json
from pathlib import Path

from models.checkpoint import atomic_path


class Log:
    """log.jsonl on rank 0; on resume, lines past the checkpoint's step are dropped (they get redone; the
    trimmed log replaces the old one atomically), and so is a line torn by a kill in the middle of a write."""

    def __init__(self, path: Path, enabled: bool, resume_step: int | None) -> None:
        self.path, self.enabled = path, enabled
        if enabled and resume_step is not None and path.exists():
            kept = [ln for ln, record in _records(path) if record.get("step", 0) <= resume_step]
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


def _records(path: Path) -> list[tuple[str, dict]]:
    """(line, record) of every whole JSON object line of the log. A kill while a line was being written leaves
    part of it at the end (no newline, not JSON): that line is dropped, as is any other that is not a record."""
    out = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict):
            out.append((line, record))
    return out
