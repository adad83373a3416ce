"""Shared test helpers: tiny checkpoints made on the spot, a running app, a long audio file whose reads are counted."""

from __future__ import annotations

import contextlib
import os
import platform
import shutil
import socket
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from models import ModelConfig, SparseTransformer, codec_card, config_for, save_model

# tests of the compiled decoding step skip where no C compiler can build it (the PyTorch step is still tested)
needs_compiler = pytest.mark.skipif(shutil.which(os.environ.get("CC", "cc")) is None,
                                    reason="no C compiler: the compiled decoding step cannot be built here")


def small_model(seed: int = 0, **kw) -> SparseTransformer:
    torch.manual_seed(seed)
    cfg = ModelConfig(**{**dict(n_layers=2, d_model=64, n_heads=2, block=16, stride=16, seq_len=160,
                                pos_factors=(10, 16)), **kw})
    model = SparseTransformer(cfg).eval()
    torch.nn.init.normal_(model.head.weight, std=0.5)  # non-trivial logits
    if model.lag is not None:
        torch.nn.init.normal_(model.lag, std=0.5)  # zero at initialisation
    return model


def tiny_checkpoint(path: Path, kind: str, **card) -> Path:
    """A tiny model with perturbed weights (a fresh one predicts uniform logits, whatever the context)."""
    torch.manual_seed(0)
    cfg = config_for("image", "tiny") if kind == "image" else config_for("audio", "tiny", seq_len=4096)
    model = SparseTransformer(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    save_model(model, path, card={"codec": codec_card(kind), **card})
    return path


def wrapped_compiler(folder: Path, monkeypatch, march_native: str) -> None:
    """Builds from here on use ``cc`` with -march=native replaced by ``march_native`` (words; empty: dropped) or,
    with "refuse", failing on it (as some compilers do), into a private cache under ``folder``."""
    body = ('[ "$a" = "-march=native" ] && { echo "no native" >&2; exit 1; }' if march_native == "refuse" else
            f'if [ "$a" = "-march=native" ]; then set -- "$@" {march_native}; continue; fi')
    cc = folder / "cc-wrapped"
    cc.write_text(f'#!/bin/sh\nfor a in "$@"; do shift; {body}; set -- "$@" "$a"; done\nexec cc "$@"\n')
    cc.chmod(0o755)
    monkeypatch.setenv("CC", str(cc))
    monkeypatch.setenv("XDG_CACHE_HOME", str(folder / "cache"))


@contextlib.contextmanager
def avx2_kernels(folder: Path, monkeypatch) -> Iterator[None]:
    """Inside, kernels/cpu_kernels.c is the build of a CPU with AVX2 and FMA but no AVX-512 (-mavx2 -mfma in place
    of -march=native: 8-wide vectors and the AVX code paths); skips where that cannot be built here."""
    from kernels import cpu_kernels

    if platform.machine() not in ("x86_64", "AMD64") or shutil.which("cc") is None:
        pytest.skip("an x86 build with a C compiler")
    wrapped_compiler(folder, monkeypatch, "-mavx2 -mfma")
    cpu_kernels.library.cache_clear()
    try:
        if cpu_kernels.library() is None:
            pytest.skip(cpu_kernels.status())
        assert cpu_kernels.vector_floats() == 8
        yield
    finally:
        monkeypatch.undo()
        cpu_kernels.library.cache_clear()


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running_app(checkpoints: Path) -> Iterator[str]:
    """The web app on a free local port, serving ``checkpoints`` on the CPU; yields its URL."""
    from app.registry import Registry  # gradio is imported only by the tests that need it
    from app.ui import build_demo, launch

    demo = build_demo(Registry(checkpoints, torch.device("cpu")))
    port = free_port()
    launch(demo, "127.0.0.1", port, block=False)
    try:
        yield f"http://127.0.0.1:{port}/"
    finally:
        demo.close()


def count_frames_read(monkeypatch) -> list[int]:
    """Record how many frames every soundfile read returns, in the list this returns."""
    counts: list[int] = []
    real = sf.SoundFile.read

    def read(self, *args, **kw):
        out = real(self, *args, **kw)
        counts.append(len(out))
        return out

    monkeypatch.setattr(sf.SoundFile, "read", read)
    return counts


def long_tone_with_counted_reads(path: Path, monkeypatch, seconds: int = 20, sr: int = 192000) -> list[int]:
    """Write a ``seconds``-long 440 Hz FLAC at ``sr`` to ``path``; returns :func:`count_frames_read`'s list, which
    then records the frames of every soundfile read (to check that a prompt is decoded only as far as needed)."""
    t = np.arange(sr) / sr
    sf.write(path, np.tile(0.3 * np.sin(2 * np.pi * 440 * t), seconds), sr, subtype="PCM_16")
    return count_frames_read(monkeypatch)
