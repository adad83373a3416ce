"""Helpers shared by the benchmark scripts: timing, tables, rounding, machine description."""

from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np


def spread(n: int, count: int) -> np.ndarray:
    """``count`` indices [count] evenly over range(n), the first and the last included, each rounded to the
    nearest: distinct while count <= n, repeating beyond (a partial evaluation then samples every part of a
    split whose items come file after file)."""
    if n < 1 or count < 1:
        raise ValueError(f"spread needs n >= 1 and count >= 1, got n={n}, count={count}")
    return np.linspace(0, n - 1, count).round().astype(np.int64)


def median_time(fn: Callable[[], object], repeats: int, warmup: int = 1) -> float:
    """Median wall time (s) of ``fn()`` over ``repeats`` calls after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def sig(x: float | None, digits: int = 4) -> float | None:
    """Round to ``digits`` significant digits for the JSON line (None passes through)."""
    return None if x is None else float(f"{x:.{digits}g}")


def fmt(x: float | None, spec: str = ".4g") -> str:
    return "-" if x is None else format(x, spec)


def ratio(num: float | None, den: float | None) -> float | None:
    return None if num is None or den is None or den == 0 else num / den


def print_table(title: str, headers: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    line = "  ".join("-" * w for w in widths)
    print(f"\n{title}")
    print("  ".join(h.rjust(w) for h, w in zip(headers, widths, strict=True)))
    print(line)
    for r in rows:
        print("  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)))


def write_json_atomic(path: str | Path, record: object) -> None:
    """Write ``record`` as JSON to ``path`` through a temporary file renamed over it (never a torn file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(record, f, indent=1, default=str)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def error_text(exc: BaseException, limit: int = 200) -> str:
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {first}"[:limit]


class CpuContention:
    """CPU time other processes used while the benchmark ran, in cores (Linux /proc/stat; None elsewhere)."""

    def __init__(self) -> None:
        self.start = self._sample()

    @staticmethod
    def _sample() -> tuple[float, float, float] | None:
        try:
            fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        except (OSError, ValueError):
            return None
        busy = (sum(fields) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")  # all but idle and iowait
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return busy, usage.ru_utime + usage.ru_stime, time.perf_counter()

    def other_cores(self) -> float | None:
        end = self._sample()
        if self.start is None or end is None:
            return None
        (busy0, own0, t0), (busy1, own1, t1) = self.start, end
        return max(0.0, (busy1 - busy0) - (own1 - own0)) / (t1 - t0)


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"
