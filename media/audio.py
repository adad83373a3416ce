"""12 kHz 8-bit mu-law audio <-> tokens, resampling, audio files in and 16-bit WAV files out.

Audio: mono, 12 kHz, mu-law companded to 256 levels: one token per sample.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import soxr
import torch

from .tokens import VOCAB, as_token_array

SAMPLE_RATE = 12000
AUDIO_TOKENS = 65536

RESAMPLE_QUALITY = "HQ"  # soxr's recipe: 20-bit precision, passband to 0.913 of the lower Nyquist, linear phase


# ---------------------------------------------------------------- mu-law


def _check_mu(mu: int) -> int:
    if isinstance(mu, bool) or not isinstance(mu, (int, np.integer)) or not 1 <= mu <= VOCAB - 1:
        raise ValueError(f"mu must be an int in 1..{VOCAB - 1} (mu + 1 levels fit in uint8), got {mu!r}")
    return int(mu)


def mu_law_encode(x: np.ndarray, mu: int = 255) -> np.ndarray:
    """Float samples (clipped to [-1, 1]) -> uint8 levels 0..mu, rounded to the nearest level.

    y = sign(x) ln(1 + mu |x|) / ln(1 + mu), level = floor((y + 1) / 2 * mu + 0.5):
    -1 -> 0, +1 -> mu, 0 -> (mu + 1) // 2 (128 for mu = 255). NaN is treated as 0.
    """
    mu = _check_mu(mu)
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    x = np.asarray(x)
    if not (np.issubdtype(x.dtype, np.floating) or np.issubdtype(x.dtype, np.integer)):
        raise ValueError(f"x must be a float array of samples in [-1, 1], got dtype {x.dtype}")
    x = np.clip(np.nan_to_num(x.astype(np.float64, copy=False), nan=0.0), -1.0, 1.0)
    y = np.sign(x) * np.log1p(mu * np.abs(x)) / math.log1p(mu)
    return np.floor((y + 1.0) * (mu / 2.0) + 0.5).astype(np.uint8)


def mu_law_decode(tokens: np.ndarray | torch.Tensor, mu: int = 255) -> np.ndarray:
    """uint8 levels 0..mu -> float32 samples in [-1, 1] (inverse of mu_law_encode up to quantisation)."""
    mu = _check_mu(mu)
    t = as_token_array(tokens)
    if t.size and t.max() > mu:
        raise ValueError(f"tokens must be in 0..{mu} for mu={mu}, got max {t.max()}")
    y = t.astype(np.float64) * (2.0 / mu) - 1.0
    x = np.sign(y) * np.expm1(np.abs(y) * math.log1p(mu)) / mu
    return x.astype(np.float32)


# ---------------------------------------------------------------- resampling


def _check_rate(name: str, rate: object) -> int:
    if isinstance(rate, bool) or not isinstance(rate, (int, np.integer)) or rate <= 0:
        raise ValueError(f"{name} must be a positive int (Hz), got {rate!r}")
    return int(rate)


def resample(x: np.ndarray, orig_sr: int, new_sr: int) -> np.ndarray:
    """Band-limited resampling of float32 [T] or [C, T] with libsoxr (soxr, "HQ": 20-bit, linear phase).

    Output length is ceil(T * new_sr / orig_sr); sample j of the output is the signal at time
    j / new_sr (the first samples of both line up). Identity when the rates are equal. Each
    channel of [C, T] is resampled on its own. Integer input is taken as float sample values.
    """
    orig = _check_rate("orig_sr", orig_sr)
    new = _check_rate("new_sr", new_sr)
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    x = np.asarray(x)
    if x.ndim not in (1, 2):
        raise ValueError(f"x must be [T] or [C, T], got shape {x.shape}")
    if not (np.issubdtype(x.dtype, np.floating) or np.issubdtype(x.dtype, np.integer)):
        raise ValueError(f"x must be a float array, got dtype {x.dtype}")
    x = x.astype(np.float32, copy=False)
    if orig == new:
        return x.copy()
    T = x.shape[-1]
    out_len = -(-T * new // orig)  # ceil
    if x.size == 0:
        return np.zeros(x.shape[:-1] + (out_len,), np.float32)
    # soxr gives round(T * new / orig) samples and treats the signal as zero past its end: a few zeros
    # appended give the same samples and at least ceil(...) of them
    pad = -(-orig // new) + 1
    frames = np.zeros((T + pad,) + x.shape[:-1], np.float32)  # soxr takes [T] or [T, C]
    frames[:T] = x.T
    y = soxr.resample(frames, orig, new, quality=RESAMPLE_QUALITY)[:out_len]
    return np.ascontiguousarray(y.T, dtype=np.float32)


# ---------------------------------------------------------------- audio


MAX_SOURCE_RATE = 384_000  # a file declaring a higher sample rate is refused before decoding
MAX_SOURCE_CHANNELS = 64  # and one declaring more channels
MAX_AUDIO_SECONDS = 3600.0  # the longest file read whole (a prompt reads only its first seconds)
_BLOCK_FRAMES = 1 << 16  # frames decoded at a time: at most 16 MB for 64 channels of float32


def load_audio(source: str | Path, sample_rate: int = SAMPLE_RATE, seconds: float | None = None,
               max_seconds: float = MAX_AUDIO_SECONDS) -> np.ndarray:
    """Any file soundfile reads -> float32 mono [T] at ``sample_rate`` (channels averaged).

    seconds: read only the first ``seconds`` of the file (the rest is never decoded; the result has
      round(seconds * sample_rate) samples, fewer if the file is shorter). None: the whole file, which
      must be at most ``max_seconds`` long (refused otherwise, whatever its header says).
    The declared sample rate and channels are checked before anything is decoded (at most 384 kHz and
    64 channels); the file is decoded a block at a time, downmixed and resampled as it goes, so memory is
    bounded by the samples returned (4 bytes each at ``sample_rate``), not by the file's own rate or length.
    Raises ValueError naming the path for unreadable, corrupt, empty or refused files.
    """
    import soundfile as sf

    sample_rate = _check_rate("sample_rate", sample_rate)
    if not isinstance(source, (str, Path)):
        raise ValueError(f"source must be a path, got {type(source).__name__}")
    for name, v in (("seconds", seconds), ("max_seconds", max_seconds)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v < math.inf):
            raise ValueError(f"{name} must be a positive number of seconds, got {v!r}")
    path = Path(source)
    if not path.is_file():
        raise ValueError(f"cannot read audio {path}: no such file")
    try:
        with sf.SoundFile(str(path)) as f:
            sr, channels, declared = f.samplerate, f.channels, f.frames
            if not 1 <= sr <= MAX_SOURCE_RATE:
                raise ValueError(f"its sample rate of {sr:,} Hz is not in 1..{MAX_SOURCE_RATE:,} Hz")
            if not 1 <= channels <= MAX_SOURCE_CHANNELS:
                raise ValueError(f"it has {channels} channels, more than {MAX_SOURCE_CHANNELS}")
            if seconds is None:
                limit = math.floor(max_seconds * sr)
                if declared > limit:
                    raise ValueError(f"it is {declared / sr:,.1f} s long, more than the {max_seconds:g} s "
                                     "this reads whole")
                wanted = limit + 1  # one frame more than allowed: a header that lies is caught too
            else:
                wanted = math.ceil((seconds + 0.02) * sr) + 1  # 20 ms more: the resampler's filter reaches past the end
            mono, frames = _read_mono(f, wanted, sr, sample_rate)
    except (RuntimeError, OSError, ValueError, TypeError, EOFError) as e:
        raise ValueError(f"cannot read audio {path}: {e}") from e
    if seconds is None and frames > limit:
        raise ValueError(f"cannot read audio {path}: it is longer than the {max_seconds:g} s this reads whole")
    if frames == 0:
        raise ValueError(f"cannot read audio {path}: the file has no samples")
    if seconds is not None:
        mono = mono[: max(1, round(seconds * sample_rate))]
    return mono


def _read_mono(f, wanted: int, sr: int, sample_rate: int) -> tuple[np.ndarray, int]:
    """Up to ``wanted`` frames of open SoundFile ``f``, a block at a time: downmixed, NaN-free, resampled from
    ``sr`` to ``sample_rate`` as they come (the same samples as ``resample`` of the whole); (audio, frames read)."""
    stream = soxr.ResampleStream(sr, sample_rate, 1, dtype="float32", quality=RESAMPLE_QUALITY) \
        if sr != sample_rate else None
    parts, frames = [], 0
    while frames < wanted:
        block = f.read(min(_BLOCK_FRAMES, wanted - frames), dtype="float32", always_2d=True)
        if not len(block):
            break
        frames += len(block)
        mono = block.mean(axis=1, dtype=np.float32) if block.shape[1] > 1 else block[:, 0].copy()
        mono = np.nan_to_num(mono, nan=0.0, posinf=1.0, neginf=-1.0)
        parts.append(stream.resample_chunk(mono) if stream is not None else mono)
    if stream is not None and frames:
        parts.append(stream.resample_chunk(np.zeros(-(-sr // sample_rate) + 1, np.float32), last=True))
    out = np.concatenate(parts) if parts else np.zeros(0, np.float32)
    out_len = -(-frames * sample_rate // sr)  # ceil, as resample()
    if len(out) < out_len:
        out = np.concatenate([out, np.zeros(out_len - len(out), np.float32)])
    return np.ascontiguousarray(out[:out_len], dtype=np.float32), frames


def audio_to_tokens(x: np.ndarray) -> np.ndarray:
    """float samples [T] in [-1, 1] (clipped) -> uint8 mu-law tokens [T]."""
    return mu_law_encode(x)


def tokens_to_audio(tokens: np.ndarray | torch.Tensor) -> np.ndarray:
    """uint8 mu-law tokens (numpy or torch ints 0..255) -> float32 samples in [-1, 1]."""
    return mu_law_decode(tokens)


def tokens_to_pcm16(tokens: np.ndarray | torch.Tensor) -> np.ndarray:
    """uint8 mu-law tokens -> int16 PCM samples (for 16-bit WAV files)."""
    return _float_to_pcm16(mu_law_decode(tokens))


def _float_to_pcm16(x: np.ndarray) -> np.ndarray:
    x = np.clip(np.nan_to_num(np.asarray(x, np.float64), nan=0.0), -1.0, 1.0)
    return np.rint(x * 32767.0).astype(np.int16)


def save_wav(path: str | Path, tokens_or_float: np.ndarray | torch.Tensor, sample_rate: int = SAMPLE_RATE) -> Path:
    """Write mono 16-bit PCM WAV. Integer input is mu-law tokens; float input is samples in [-1, 1].

    Returns the path written.
    """
    import soundfile as sf

    sample_rate = _check_rate("sample_rate", sample_rate)
    a = tokens_or_float
    if isinstance(a, torch.Tensor):
        a = a.detach().cpu().numpy()
    if not isinstance(a, np.ndarray):
        raise ValueError(f"audio must be a numpy array or torch tensor, got {type(a).__name__}")
    if a.ndim != 1:
        raise ValueError(f"audio must be mono [T], got shape {a.shape}")
    if np.issubdtype(a.dtype, np.floating):
        pcm = _float_to_pcm16(a)
    elif np.issubdtype(a.dtype, np.integer):
        pcm = tokens_to_pcm16(a)
    else:
        raise ValueError(f"audio must be integer mu-law tokens or float samples, got dtype {a.dtype}")
    path = Path(path)
    sf.write(str(path), pcm, sample_rate, subtype="PCM_16", format="WAV")
    return path
