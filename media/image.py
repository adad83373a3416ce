"""64x64 RGB images <-> tokens, and any image file to a 64x64 uint8 array.

Images: [64, 64, 3] uint8 in raster order with the channel innermost (a plain reshape of HWC),
so token (r * 64 + c) * 3 + ch is channel ch of pixel (r, c): 12,288 tokens.
"""

from __future__ import annotations

import math
import struct
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from .tokens import as_token_array

IMAGE_SIZE = 64
IMAGE_CHANNELS = 3
IMAGE_TOKENS = IMAGE_SIZE * IMAGE_SIZE * IMAGE_CHANNELS  # 12288
MAX_IMAGE_PIXELS = 64_000_000  # decompression-bomb guard of load_image


# ---------------------------------------------------------------- tokens


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
    t = as_token_array(tokens)
    if t.ndim not in (1, 2) or t.shape[-1] != IMAGE_TOKENS:
        raise ValueError(f"tokens must be [{IMAGE_TOKENS}] or [B, {IMAGE_TOKENS}], got shape {t.shape}")
    return np.ascontiguousarray(t).reshape(*t.shape[:-1], IMAGE_SIZE, IMAGE_SIZE, IMAGE_CHANNELS)


# ---------------------------------------------------------------- files


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


def to_rgb(im: Image.Image, extrema: tuple[float, float] | None = None) -> Image.Image:
    """Any Pillow mode -> RGB (alpha on white; 16-bit and float greyscale scaled to 8 bits).

    extrema: (min, max) of the whole image when ``im`` is a strip of it (greyscale "I" and "F" images are
    scaled by what the whole image holds, so every strip is scaled alike); None: ``im``'s own.
    """
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
        lo, hi = extrema if extrema is not None else ((a.min(), a.max()) if a.size else (0, 0))
        if mode == "F":
            a = a * 255.0 if a.size and lo >= 0.0 and hi <= 1.0 else a
        elif mode.startswith("I;16") or (a.size and hi > 255):
            a = a.astype(np.float64) / 257.0  # 16-bit range 0..65535 -> 0..255
        a8 = np.clip(np.rint(a), 0, 255).astype(np.uint8)
        return Image.fromarray(a8, "L").convert("RGB")
    return im.convert("RGB")


_ORIENTATION = {2: (Image.Transpose.FLIP_LEFT_RIGHT,), 3: (Image.Transpose.ROTATE_180,),
                4: (Image.Transpose.FLIP_TOP_BOTTOM,), 5: (Image.Transpose.TRANSPOSE,),
                6: (Image.Transpose.ROTATE_270,), 7: (Image.Transpose.TRANSVERSE,), 8: (Image.Transpose.ROTATE_90,)}
STRIP_PIXELS = 1 << 20  # pixels converted at a time when a large image is reduced


def _grey_extrema(im: Image.Image) -> tuple[float, float] | None:
    """(min, max) of a greyscale "I"/"F" image, NaN and infinities left out as to_rgb leaves them out."""
    if not (im.mode.startswith("I") or im.mode == "F"):
        return None
    if im.mode == "F":  # getextrema would see NaN and infinities, which to_rgb maps to 0 and 1
        lo, hi = math.inf, -math.inf
        for y in range(0, im.height, max(1, STRIP_PIXELS // im.width)):
            a = np.asarray(im.crop((0, y, im.width, min(im.height, y + max(1, STRIP_PIXELS // im.width)))))
            a = np.nan_to_num(a.astype(np.float64), nan=0.0, posinf=1.0, neginf=0.0)
            lo, hi = min(lo, float(a.min())), max(hi, float(a.max()))
        return lo, hi
    lo, hi = im.getextrema()
    return float(lo), float(hi)


def _reduced(im: Image.Image, size: int) -> Image.Image:
    """A decoded image much larger than ``size`` -> an RGB image box-averaged by an integer factor that keeps at
    least 8 * size pixels on the short side (the box resample to ``size`` then differs from one at full size only
    by where output pixels' edges fall within a reduced pixel), with the EXIF orientation applied. It is converted
    a strip of rows at a time, so no full-size copy is ever made besides the decoded image itself (conversions of
    a 64-megapixel image would cost more than a gigabyte)."""
    w, h = im.size
    k = min(w, h) // (8 * size)
    orientation = im.getexif().get(0x0112)
    if k < 2:
        return ImageOps.exif_transpose(im)
    extrema = _grey_extrema(im)
    out = Image.new("RGB", (-(-w // k), -(-h // k)))
    step = k * max(1, STRIP_PIXELS // (w * k))  # rows per strip: a multiple of k
    for y in range(0, h, step):
        strip = to_rgb(im.crop((0, y, w, min(h, y + step))), extrema)
        out.paste(strip.reduce(k), (0, y // k))
    for method in _ORIENTATION.get(orientation, ()):
        out = out.transpose(method)
    return out


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
      short side, which is much faster and indistinguishable after the box downsample; other large images are
      box-averaged by an integer factor to that size a strip at a time (memory: the decoded image, about
      4 bytes a pixel at most, and little more).
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
                return _square_resize(_reduced(im, size), size)
    except (Image.DecompressionBombError, ValueError, OSError, SyntaxError, EOFError, TypeError, KeyError,
            IndexError, struct.error) as e:
        raise ValueError(f"cannot read image {path}: {e}") from e
