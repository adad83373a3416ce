"""Compiled C code: built once per machine into this user's private cache folder, then loaded with ctypes.

The system's C compiler (``$CC``, else ``cc``) builds a source file into
``$XDG_CACHE_HOME/sparse-transformer-studio`` (default ``~/.cache/...``), created with mode 0700. Before
anything is loaded, the folder and the file are checked: a real folder and a regular file (no links)
owned by this user that no one else can write to. A cache folder that fails the check is not used: the
library is built into a fresh private temporary folder instead. Nothing is ever loaded from a shared
folder. The file name is a hash of the source and the headers it includes with quotes, the compiler's path
and ``--version``, the flags and the CPU's feature flags, so that a changed source, header, compiler or
machine builds afresh.

Users: the compiled decoding step (sampling/compiled_step.c) and the compiled CPU kernels
(kernels/cpu_kernels.c: block-sparse weight matmul, band attention).
"""

from __future__ import annotations

import hashlib
import os
import platform
import re
import shutil
import stat
import subprocess
import tempfile
from pathlib import Path

FLAGS = ["-O3", "-std=gnu11", "-shared", "-fPIC", "-pthread"]
ARCH_FLAGS = (["-march=native"], [])  # -march=native is not known to every compiler: then a plain build
OPENMP_FLAGS = ["-fopenmp"]  # for sources that use OpenMP where the compiler has it: else built without
BUILD_TIMEOUT = 300  # seconds for one compile
_LOCAL_INCLUDE = re.compile(r'^\s*#\s*include\s+"([^"]+)"', re.MULTILINE)


class UnsafeFolder(Exception):
    """A cache folder or file that someone other than this user could have written."""


def cache_dir() -> Path:
    """This user's cache folder for compiled libraries."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "sparse-transformer-studio"


def check_private(path: Path, folder: bool) -> None:
    """UnsafeFolder unless ``path`` is a folder (or regular file), not a link, owned by this user, that
    neither its group nor others can write to."""
    st = os.lstat(path)
    kind_ok = stat.S_ISDIR(st.st_mode) if folder else stat.S_ISREG(st.st_mode)
    if not kind_ok:
        raise UnsafeFolder(f"{path} is not a {'folder' if folder else 'regular file'}")
    if st.st_uid != os.getuid():
        raise UnsafeFolder(f"{path} belongs to user {st.st_uid}, not to this user ({os.getuid()})")
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise UnsafeFolder(f"{path} can be written by others (mode {stat.S_IMODE(st.st_mode):o})")


def _private_cache() -> tuple[Path, str]:
    """(a folder only this user can write, a note when it is not the usual cache folder)."""
    folder = cache_dir()
    try:
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        check_private(folder, folder=True)
        return folder, ""
    except (OSError, UnsafeFolder) as e:
        return Path(tempfile.mkdtemp(prefix="sparse-transformer-studio-")), f"cache folder not used: {e}"


def _cpu_id() -> str:
    """What the compiled code depends on: the machine and (on Linux) the CPU's feature flags."""
    flags = ""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith(("flags", "Features"))), "")
    except OSError:
        pass
    return f"{platform.system()} {platform.machine()} {flags}"


def compiler_version(cc: str) -> str:
    """``cc --version`` (a ValueError if the compiler does not run)."""
    try:
        run = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise ValueError(f"{cc} does not run: {e}") from None
    return run.stdout.strip()


def _build_text(source: Path, seen: frozenset = frozenset()) -> str:
    """What a build of ``source`` reads: its text, then that of each header it includes with quotes
    (relative to it, recursively; a file already read is not read again)."""
    seen = seen | {source.resolve()}
    parts = [source.read_text()]
    for name in _LOCAL_INCLUDE.findall(parts[0]):
        header = (source.parent / name).resolve()
        if header not in seen:
            parts.append(_build_text(header, seen))
    return "\0".join(parts)


def _command(cc: str, source: Path, flags: list[str], out: Path) -> list[str]:
    return [cc, *FLAGS, *flags, str(source), "-o", str(out), "-lm"]


def library_name(source: Path, cc: str, version: str, flags: list[str]) -> str:
    """The file name: the source's stem and a hash of everything the compiled code depends on."""
    key = "\0".join([_build_text(source), cc, version, " ".join(_command(cc, source, flags, Path("out"))), _cpu_id()])
    return f"{source.stem}-{hashlib.sha256(key.encode()).hexdigest()[:20]}.so"


def _compile(cc: str, source: Path, flags: list[str], out: Path) -> str | None:
    """Compile ``source`` into ``out``; None on success, else the compiler's complaint."""
    try:
        run = subprocess.run(_command(cc, source, flags, out), capture_output=True, text=True, timeout=BUILD_TIMEOUT)
    except (OSError, subprocess.TimeoutExpired) as e:
        return str(e)
    if run.returncode == 0:
        return None
    lines = run.stderr.strip().splitlines()
    return lines[-1] if lines else f"{cc} exited with {run.returncode}"


def build_variants(openmp: bool = False) -> list[list[str]]:
    """The flag sets a build tries, best first: -march=native before a plain build and, for a source that uses
    OpenMP, each with -fopenmp before each without."""
    return [arch + omp for arch in ARCH_FLAGS for omp in ([OPENMP_FLAGS, []] if openmp else [[]])]


def find_or_build(source: Path, openmp: bool = False) -> tuple[Path, str]:
    """(the path of a checked library of ``source`` for this machine, built if need be with the first of
    :func:`build_variants` that compiles; a note, "" unless the usual cache folder was not used); a ValueError
    saying why not."""
    name = os.environ.get("CC", "cc")
    cc = shutil.which(name)
    if cc is None:
        raise ValueError(f"no C compiler ({name}) on the PATH")
    version = compiler_version(cc)
    folder, note = _private_cache()
    variants = build_variants(openmp)
    names = [library_name(source, cc, version, flags) for flags in variants]
    for lib_name in names:  # built before (by this user)
        path = folder / lib_name
        if path.exists():
            try:
                check_private(path, folder=False)
                return path, note
            except UnsafeFolder as e:
                note = f"{e}: not loaded"
    error = f"{cc} did not run"
    for flags, lib_name in zip(variants, names, strict=True):
        fd, tmp = tempfile.mkstemp(suffix=".so.tmp", dir=folder)
        os.close(fd)
        error = _compile(cc, source, flags, Path(tmp))
        if error is None:
            os.chmod(tmp, 0o700)
            os.replace(tmp, folder / lib_name)  # atomic: a concurrent build writes the same bytes
            return folder / lib_name, note
        os.unlink(tmp)
    raise ValueError(f"{cc}: {error}")
