"""The compiled CPU kernels (kernels/cpu_kernels.c): block-sparse weight matmul and band attention (float32),
and training's tanh GELU and layer norm (float32 or bfloat16 outputs).

Built once per machine by kernels/native.py (this user's private cache; nothing loaded from a shared
folder) and called through ctypes on torch's thread count: built with OpenMP (where the compiler has it),
they run on the OpenMP threads PyTorch already keeps, which would otherwise spin beside threads of their
own. They run where the build has AVX2 with FMA or AVX-512; elsewhere :func:`library` is None and the
callers keep their PyTorch schedules, as they do with ``STS_COMPILED_KERNELS=0`` in the environment.
:func:`status` says which.
"""

from __future__ import annotations

import ctypes
import os
from functools import lru_cache
from pathlib import Path

from . import native

SOURCE = Path(__file__).with_suffix(".c")
_P, _I64, _I32, _F32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_float
_SIGNATURES = {
    "bs_vector_bytes": [],
    "uses_openmp": [],
    "bs_mm": [_P, _I64, _P, _P, _P, _P, _I64, _I64, _I32, _I32, _P, _I64, _I32],
    "bs_dw": [_P, _I64, _P, _I64, _P, _P, _I64, _I64, _I32, _P, _I32],
    "band_forward": [_P, _P, _P, _P, _P, _P, _I64, _I64, _I32, _I32, _I32, _I64, _I64, _F32, _P, _P, _P, _I32],
    "band_backward": [_P, _P, _P, _P, _P, _P, _P, _P, _P, _I64, _I64, _I32, _I32, _I32, _I64, _I64, _F32, _P, _P, _P,
                      _P, _I32],
    "gelu_forward": [_P, _P, _I64, _I32, _I32],
    "gelu_backward": [_P, _P, _P, _I64, _I32, _I32],
    "norm_forward": [_P, _P, _P, _P, _P, _P, _I64, _I64, _I32, _F32, _I32, _I32],
    "norm_backward": [_P, _P, _P, _P, _P, _P, _P, _I64, _I64, _I32, _I32, _I32],
    "heads_copy": [_P, _P, _I64, _I64, _I32, _I32, _I32, _I32, _I32, _I32],
}
OPENMP = True  # build with OpenMP where the compiler has it: the kernels then run on PyTorch's threads
_status = {"error": "", "path": None}  # what the last library() did


@lru_cache(maxsize=1)
def library() -> ctypes.CDLL | None:
    """cpu_kernels.c for this machine (built on first use), or None where it cannot run or has no edge."""
    _status.update(error="", path=None)
    if os.environ.get("STS_COMPILED_KERNELS", "1") == "0":
        _status["error"] = "turned off (STS_COMPILED_KERNELS=0)"
        return None
    try:
        path, _ = native.find_or_build(SOURCE, openmp=OPENMP)
        lib = ctypes.CDLL(str(path))
    except (OSError, ValueError) as e:
        _status["error"] = f"they could not be built ({e})"
        return None
    for name, argtypes in _SIGNATURES.items():
        fn = getattr(lib, name)
        fn.restype, fn.argtypes = _I32, argtypes
    if lib.bs_vector_bytes() < 32:
        _status["error"] = "this CPU (or compiler) has neither AVX2 with FMA nor AVX-512"
        return None
    _status["path"] = path
    return lib


def vector_floats() -> int:
    """Floats per vector of the compiled kernels (16 with AVX-512, 8 with AVX2); 0 without them."""
    lib = library()
    return 0 if lib is None else lib.bs_vector_bytes() // 4


def status() -> str:
    """One line: whether the compiled CPU kernels run here, and why not."""
    lib = library()
    if lib is None:
        return f"compiled CPU kernels unavailable: {_status['error']}; PyTorch schedules used"
    threads = "PyTorch's OpenMP threads" if lib.uses_openmp() else "threads of their own"
    return f"compiled CPU kernels ready ({_status['path']}, {lib.bs_vector_bytes() * 8}-bit vectors, {threads})"


def check(code: int) -> None:
    """A kernel's return code as an exception (0: fine)."""
    if code == -2:
        raise MemoryError("a compiled CPU kernel could not allocate its scratch buffers")
    if code != 0:
        raise RuntimeError(f"kernels/cpu_kernels.c returned {code}")
