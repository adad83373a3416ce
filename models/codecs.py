"""Media <-> tokens: 64x64 RGB images and 12 kHz 8-bit mu-law audio, each as uint8 token sequences.

Images: [64, 64, 3] uint8 in raster order with the channel innermost (a plain reshape of HWC),
so token (r * 64 + c) * 3 + ch is channel ch of pixel (r, c): 12,288 tokens.
Audio: mono, 12 kHz, mu-law companded to 256 levels: one token per sample.
"""

from __future__ import annotations

import logging
import math
import struct
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

logger = logging.getLogger(__name__)

IMAGE_SIZE = 64
IMAGE_CHANNELS = 3
IMAGE_TOKENS = IMAGE_SIZE * IMAGE_SIZE * IMAGE_CHANNELS  # 12288
SAMPLE_RATE = 12000
AUDIO_TOKENS = 65536
VOCAB = 256

MAX_IMAGE_PIXELS = 64_000_000  # decompression-bomb guard of load_image
RESAMPLE_ZERO_CROSSINGS = 16  # per side of the windowed-sinc kernel
RESAMPLE_ROLLOFF = 0.99  # lowpass at rolloff * min(orig, new) / 2
RESAMPLE_KAISER_BETA = 8.0  # Kaiser window; about 80 dB stopband
_RESAMPLE_CHUNK = 1 << 20  # output samples per channel computed per conv call (bounds the im2col memory)


# ---------------------------------------------------------------- tokens


def _as_token_array(tokens: object, name: str = "tokens") -> np.ndarray:
    """numpy/torch integer tokens in 0..255 -> uint8 numpy array (same shape)."""
    if isinstance(tokens, torch.Tensor):
        if tokens.dtype.is_floating_point or tokens.dtype.is_complex or tokens.dtype == torch.bool:
            raise ValueError(f"{name} must be an integer tensor with values 0..255, got dtype {tokens.dtype}")
        tokens = tokens.detach().cpu().numpy()
    if not isinstance(tokens, np.ndarray):
        raise ValueError(f"{name} must be a numpy array or torch tensor of integers 0..255, "
                         f"got {type(tokens).__name__}")
    if tokens.dtype == np.uint8:
        return tokens
    if not np.issubdtype(tokens.dtype, np.integer):
        raise ValueError(f"{name} must hold integers 0..255, got dtype {tokens.dtype}")
    if tokens.size and (tokens.min() < 0 or tokens.max() > VOCAB - 1):
        raise ValueError(f"{name} values must be in 0..{VOCAB - 1}, got range {tokens.min()}..{tokens.max()}")
    return tokens.astype(np.uint8)


def image_to_tokens(img: np.ndarray) -> np.ndarray:
    """uint8 image [64, 64, 3] (or a batch [B, 64, 64, 3]) -> uint8 tokens [12288] (or [B, 12288])."""
    if not isinstance(img, np.ndarray):
        raise ValueError(f"img must be a numpy array, got {type(img).__name__}")
    if img.dtype != np.uint8:
        raise ValueError(f"img must be uint8, got dtype {img.dtype} (use load_image to convert media)")
    shape = (IMAGE_SIZE, IMAGE_SIZE, IMAGE_CHANNELS)
    if img.ndim not in (3, 4) or img.shape[-3:] != shape:
        raise ValueError(f"img must be [64, 64, 3] or [B, 64, 64, 3], got shape {img.shape}")
    return np.ascontiguousarray(img).reshape(*img.shape[:-3], IMAGE_TOKENS)


def tokens_to_image(tokens: np.ndarray | torch.Tensor) -> np.ndarray:
    """Tokens [12288] (or [B, 12288]), integers 0..255, numpy or torch -> uint8 image [64, 64, 3] (or batch)."""
    t = _as_token_array(tokens)
    if t.ndim not in (1, 2) or t.shape[-1] != IMAGE_TOKENS:
        raise ValueError(f"tokens must be [{IMAGE_TOKENS}] or [B, {IMAGE_TOKENS}], got shape {t.shape}")
    return np.ascontiguousarray(t).reshape(*t.shape[:-1], IMAGE_SIZE, IMAGE_SIZE, IMAGE_CHANNELS)


# ---------------------------------------------------------------- images


def _check_pixels(w: int, h: int, what: str) -> None:
    if w * h > MAX_IMAGE_PIXELS:
        raise ValueError(f"{what} is {w}x{h} = {w * h:,} pixels, more than the limit of "
                         f"{MAX_IMAGE_PIXELS:,} (decompression-bomb guard)")
    if w < 1 or h < 1:
        raise ValueError(f"{what} is empty ({w}x{h})")


def _composite_on_white(im: Image.Image) -> Image.Image:
    """RGBA -> RGB with the alpha composited on a white background."""
    bg = Image.new("RGBA", im.size, (255, 255, 255, 255))
    return Image.alpha_composite(bg, im).convert("RGB")


def to_rgb(im: Image.Image) -> Image.Image:
    """Any Pillow mode -> RGB (alpha on white; 16-bit and float greyscale scaled to 8 bits)."""
    mode = im.mode
    if mode in ("RGBA", "LA", "PA", "La", "RGBa") or (mode in ("P", "L", "RGB") and "transparency" in im.info):
        return _composite_on_white(im.convert("RGBA"))
    if mode == "RGB":
        return im
    if mode.startswith("I") or mode == "F":
        a = np.asarray(im)
        if mode == "F":
            a = a.astype(np.float64)
            a = np.nan_to_num(a, nan=0.0, posinf=1.0, neginf=0.0)
            a = a * 255.0 if a.size and a.min() >= 0.0 and a.max() <= 1.0 else a
        elif mode.startswith("I;16") or (a.size and a.max() > 255):
            a = a.astype(np.float64) / 257.0  # 16-bit range 0..65535 -> 0..255
        a8 = np.clip(np.rint(a), 0, 255).astype(np.uint8)
        return Image.fromarray(a8, "L").convert("RGB")
    return im.convert("RGB")


def _from_array(a: np.ndarray) -> Image.Image:
    if a.dtype != np.uint8:
        raise ValueError(f"image array must be uint8, got dtype {a.dtype}")
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[:, :, 0]
    if a.ndim == 2:
        return Image.fromarray(np.ascontiguousarray(a), "L")
    if a.ndim == 3 and a.shape[2] in (3, 4):
        return Image.fromarray(np.ascontiguousarray(a), "RGB" if a.shape[2] == 3 else "RGBA")
    raise ValueError(f"image array must be [H, W], [H, W, 1], [H, W, 3] or [H, W, 4], got shape {a.shape}")


def _square_resize(im: Image.Image, size: int) -> np.ndarray:
    """Centre crop to a square, box-resample to size x size, uint8 [size, size, 3]."""
    w, h = im.size
    s = min(w, h)
    left, top = (w - s) // 2, (h - s) // 2
    out = to_rgb(im).resize((size, size), Image.Resampling.BOX, box=(left, top, left + s, top + s))
    a = np.array(out, dtype=np.uint8)  # a writable copy (np.asarray of a PIL image is read-only)
    return np.ascontiguousarray(a.reshape(size, size, 3))


def load_image(source: str | Path | Image.Image | np.ndarray, size: int = IMAGE_SIZE) -> np.ndarray:
    """Any image -> uint8 [size, size, 3]: EXIF orientation, centre square crop, box resample.

    source: a path to any file Pillow reads (any mode: alpha is composited on white, 16-bit
      greyscale scaled to 8 bits, CMYK/palette converted), a PIL image, or a uint8 array
      [H, W], [H, W, 1|3|4]. Images over 64 million pixels are refused (decompression bombs).
      Large JPEGs are decoded at a reduced DCT scale that keeps at least 4 * size pixels on the
      short side, which is much faster and indistinguishable after the box downsample.
    Raises ValueError for unreadable or corrupt files, naming the path.
    """
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ValueError(f"size must be a positive int, got {size!r}")
    if isinstance(source, np.ndarray):
        if source.ndim >= 2:
            _check_pixels(source.shape[1], source.shape[0], "image array")
        return _square_resize(_from_array(source), size)
    if isinstance(source, Image.Image):
        _check_pixels(*source.size, "image")
        try:
            return _square_resize(ImageOps.exif_transpose(source), size)
        except (OSError, ValueError, SyntaxError) as e:
            raise ValueError(f"cannot convert image: {e}") from e
    if not isinstance(source, (str, Path)):
        raise ValueError(f"source must be a path, PIL image or numpy array, got {type(source).__name__}")
    path = Path(source)
    if not path.is_file():
        raise ValueError(f"cannot read image {path}: no such file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                _check_pixels(*im.size, "it")
                if im.format == "JPEG":
                    w, h = im.size
                    k = 4 * size / min(w, h)
                    im.draft("RGB", (math.ceil(w * k), math.ceil(h * k)))
                im.load()
                im = ImageOps.exif_transpose(im)
                return _square_resize(im, size)
    except (Image.DecompressionBombError, ValueError, OSError, SyntaxError, EOFError, TypeError, KeyError,
            IndexError, struct.error) as e:
        raise ValueError(f"cannot read image {path}: {e}") from e


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
    t = _as_token_array(tokens)
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


def _sinc_kernel(orig: int, new: int) -> tuple[torch.Tensor, int]:
    """Polyphase windowed-sinc filters [new, 1, 2 * width + orig] for gcd-reduced rates, and width."""
    base = min(orig, new) * RESAMPLE_ROLLOFF  # cutoff frequency * 2, in reduced units
    width = math.ceil(RESAMPLE_ZERO_CROSSINGS * orig / base)
    idx = torch.arange(-width, width + orig, dtype=torch.float64)[None] / orig  # input times
    phase = torch.arange(0, -new, -1, dtype=torch.float64)[:, None] / new  # minus output times
    t = (phase + idx) * base  # [new, K], in zero crossings
    inside = t.abs() <= RESAMPLE_ZERO_CROSSINGS
    r = (t / RESAMPLE_ZERO_CROSSINGS).clamp(-1, 1)
    beta = torch.tensor(RESAMPLE_KAISER_BETA, dtype=torch.float64)
    window = torch.special.i0(beta * torch.sqrt(1 - r * r)) / torch.special.i0(beta)
    kernel = torch.sinc(t) * window * inside * (base / orig)
    return kernel.to(torch.float32)[:, None, :], width


def resample(x: np.ndarray, orig_sr: int, new_sr: int) -> np.ndarray:
    """Band-limited windowed-sinc (Kaiser) polyphase resampling of float32 [T] or [C, T].

    Rates are reduced by their gcd; the lowpass sits at 0.99 * min(orig_sr, new_sr) / 2 with
    16 zero crossings per side. Output length is ceil(T * new_sr / orig_sr); sample j of the
    output is the signal at time j / new_sr (the first samples of both line up). Identity when
    the rates are equal. Vectorised as a strided conv1d (one filter per output phase).
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
    g = math.gcd(orig, new)
    orig, new = orig // g, new // g
    squeeze = x.ndim == 1
    xs = torch.from_numpy(np.ascontiguousarray(x if x.ndim == 2 else x[None]))
    C, T = xs.shape
    out_len = -(-T * new // orig)  # ceil
    if T == 0:
        return np.zeros((out_len,) if squeeze else (C, 0), np.float32)
    kernel, width = _sinc_kernel(orig, new)
    K = kernel.shape[-1]
    frames = -(-out_len // new)
    padded = torch.nn.functional.pad(xs[:, None], (width, width + orig))  # [C, 1, T + 2w + orig]
    need = (frames - 1) * orig + K  # input samples the frames read
    if padded.shape[-1] < need:
        padded = torch.nn.functional.pad(padded, (0, need - padded.shape[-1]))
    out = torch.empty(C, frames * new, dtype=torch.float32)
    step = max(1, _RESAMPLE_CHUNK // new)  # frames per chunk
    with torch.no_grad():
        for f0 in range(0, frames, step):
            f1 = min(frames, f0 + step)
            seg = padded[..., f0 * orig: (f1 - 1) * orig + K]
            y = torch.nn.functional.conv1d(seg, kernel, stride=orig)  # [C, new, f1 - f0]
            out[:, f0 * new: f1 * new] = y.transpose(1, 2).reshape(C, -1)
    res = out[:, :out_len].numpy()
    return res[0] if squeeze else res


# ---------------------------------------------------------------- audio


def load_audio(source: str | Path, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """Any file soundfile reads -> float32 mono [T] at ``sample_rate`` (channels averaged).

    Raises ValueError naming the path for unreadable, corrupt or empty files.
    """
    import soundfile as sf

    sample_rate = _check_rate("sample_rate", sample_rate)
    if not isinstance(source, (str, Path)):
        raise ValueError(f"source must be a path, got {type(source).__name__}")
    path = Path(source)
    if not path.is_file():
        raise ValueError(f"cannot read audio {path}: no such file")
    try:
        with sf.SoundFile(str(path)) as f:
            sr = f.samplerate
            parts = []
            while True:
                block = f.read(1 << 18, dtype="float32", always_2d=True)
                if not len(block):
                    break
                parts.append(block.mean(axis=1) if block.shape[1] > 1 else block[:, 0].copy())
    except (RuntimeError, OSError, ValueError, TypeError, EOFError) as e:
        raise ValueError(f"cannot read audio {path}: {e}") from e
    mono = np.concatenate(parts) if parts else np.zeros(0, np.float32)
    if mono.size == 0:
        raise ValueError(f"cannot read audio {path}: the file has no samples")
    mono = np.nan_to_num(mono, nan=0.0, posinf=1.0, neginf=-1.0)
    return resample(mono, sr, sample_rate)


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
