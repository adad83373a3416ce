"""Media-level sampling: complete 64x64 images from their top rows, generate or continue audio.

Both are generators of progress reports (partial images every few rows, partial audio
every fraction of a second) and can be cancelled by not asking for the next report.
Samples are split into batches of ``batch_size``; sample i uses seed ``seeds[i]`` whatever
batch it lands in.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from media.audio import SAMPLE_RATE, mu_law_encode
from media.image import IMAGE_SIZE, IMAGE_TOKENS, image_to_tokens, tokens_to_image
from models.checkpoint import model_kind
from models.lstm import SparseLSTM
from models.model import SparseTransformer, check_int

from .options import SamplingOptions
from .sampler import generate

ROW_TOKENS = IMAGE_SIZE * 3  # tokens per image row


@dataclass
class MediaProgress:
    """``done`` / ``total`` tokens over all samples; ``media`` the partial results:
    images uint8 [n, 64, 64, 3] (rows not yet sampled are black) or audio tokens uint8 [n, T]."""

    done: int
    total: int
    media: np.ndarray
    seconds: float
    finished: bool


def _check(model: SparseTransformer, kind: str, seeds: list[int], batch_size: int) -> None:
    if not isinstance(model, (SparseTransformer, SparseLSTM)):
        raise ValueError(f"model must be a SparseTransformer or a SparseLSTM, got {type(model).__name__}")
    if model_kind(model) != kind:
        raise ValueError(f"this is an {model_kind(model)} model; {kind} sampling needs an {kind} model")
    if not seeds:
        raise ValueError("at least one sample (one seed) is needed")
    check_int("batch_size", batch_size, 1)


def _batched(model, prompt: np.ndarray, length: int, seeds: list[int], options: SamplingOptions, batch_size: int,
             report_every: int) -> Iterator[tuple[int, int, torch.Tensor, float, bool]]:
    """(first sample index, done tokens so far over all samples, tokens of this batch, seconds, finished)."""
    n, P = len(seeds), prompt.shape[0]
    total, done_before, seconds_before = n * (length - P), 0, 0.0
    for start in range(0, n, batch_size):
        chunk = seeds[start: start + batch_size]
        prompt_t = torch.from_numpy(np.ascontiguousarray(prompt)).long()[None].expand(len(chunk), -1).contiguous()
        for p in generate(model, prompt_t, length, chunk, options, report_every):
            done = done_before + len(chunk) * (p.done - P)
            yield start, done, p.tokens, seconds_before + p.seconds, p.finished and done == total
            if p.finished:
                seconds_before += p.seconds
        done_before += len(chunk) * (length - P)


def complete_image(model: SparseTransformer, image: np.ndarray, prompt_rows: int, seeds: list[int],
                   options: SamplingOptions | None = None, batch_size: int = 8, report_rows: int = 4
                   ) -> Iterator[MediaProgress]:
    """Keep rows 0..prompt_rows-1 of ``image`` (uint8 [64, 64, 3], e.g. from media.image.load_image) and sample
    the rest, once per seed. The prompt rows of every completion are bit-identical to the image's."""
    _check(model, "image", seeds, batch_size)
    if not isinstance(image, np.ndarray) or image.shape != (64, 64, 3) or image.dtype != np.uint8:
        raise ValueError("image must be uint8 [64, 64, 3] (use media.image.load_image)")
    check_int("prompt_rows", prompt_rows, 0, IMAGE_SIZE - 1)
    check_int("report_rows", report_rows, 1)
    prompt = image_to_tokens(image)[: prompt_rows * ROW_TOKENS]
    images = np.zeros((len(seeds), IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8)
    images[:, :prompt_rows] = image[:prompt_rows]
    total = len(seeds) * (IMAGE_TOKENS - len(prompt))
    for start, done, tokens, seconds, finished in _batched(model, prompt, IMAGE_TOKENS, seeds, options, batch_size,
                                                           report_rows * ROW_TOKENS):
        rows = tokens.shape[1] // ROW_TOKENS
        flat = np.zeros((tokens.shape[0], IMAGE_TOKENS), np.uint8)
        flat[:, : rows * ROW_TOKENS] = tokens[:, : rows * ROW_TOKENS].cpu().numpy()
        images[start: start + tokens.shape[0], :rows] = tokens_to_image(flat)[:, :rows]
        images[:, :prompt_rows] = image[:prompt_rows]  # the prompt, bit for bit
        yield MediaProgress(done, total, images, seconds, finished)


def generate_audio(model: SparseTransformer, length: int, seeds: list[int], prompt: np.ndarray | None = None,
                   options: SamplingOptions | None = None, batch_size: int = 8,
                   report_every: int = SAMPLE_RATE // 2) -> Iterator[MediaProgress]:
    """Sample ``length`` mu-law tokens per seed (12 kHz), from scratch or continuing ``prompt``
    (float32 audio at 12 kHz, e.g. media.audio.load_audio; the last part that leaves room to generate is used).
    ``media`` holds the prompt followed by the continuation, uint8 [n, T] (not yet sampled: 0)."""
    _check(model, "audio", seeds, batch_size)
    context = model.cfg.seq_len
    check_int("length (samples)", length, 1, context)
    tokens = np.zeros(0, np.uint8)
    if prompt is not None:
        prompt = np.asarray(prompt, dtype=np.float32)
        if prompt.ndim != 1 or prompt.size == 0:
            raise ValueError("prompt must be non-empty mono audio (float32 [T] at 12 kHz)")
        if not np.isfinite(prompt).all():
            raise ValueError("prompt audio contains NaN or infinite samples")
        tokens = mu_law_encode(prompt)[-(context - length):] if length < context else tokens
    total_len = len(tokens) + length
    total = len(seeds) * length
    out = np.zeros((len(seeds), total_len), np.uint8)
    out[:, : len(tokens)] = tokens
    for start, done, toks, seconds, finished in _batched(model, tokens, total_len, seeds, options, batch_size,
                                                         report_every):
        out[start: start + toks.shape[0], : toks.shape[1]] = toks.cpu().numpy()
        yield MediaProgress(done, total, out, seconds, finished)
