"""What a listener hears and a viewer sees, in numbers: spectral flatness of audio, smoothness and colour
speckle of images. bench/quality.py reports them for a model's samples next to the real validation data.

- Spectral flatness: per 1,024-sample Hann frame, the geometric over the arithmetic mean of the power
  spectrum (1 for white noise's expected spectrum, about 0.56 for one frame of it; near 0 for a few
  pitched partials); a clip's figure is the median over its loudest 80% of frames (silence says nothing).
  Rendered music measures about 0.005, white noise about 0.56.
- Roughness: the mean absolute difference of luma between horizontally and vertically adjacent pixels
  (0..255). Speckle: the mean absolute difference of the two chroma channels from their own 3x3 mean
  (0..255): colour noise scores high, smooth or grey areas low.
"""

from __future__ import annotations

import numpy as np

FLATNESS_FRAME = 1024
LOUDEST_FRAMES = 0.8
_TINY = 1e-12  # floor of the power spectrum: the log of an exactly silent bin stays finite


def spectral_flatness(audio: np.ndarray, frame: int = FLATNESS_FRAME, loudest: float = LOUDEST_FRAMES) -> float:
    """audio float [T] (any scale) -> the median flatness of its loudest frames (see the module notes)."""
    x = np.asarray(audio, dtype=np.float64)
    if x.ndim != 1 or x.size < frame:
        raise ValueError(f"audio must be mono [T] with at least one frame of {frame} samples, got shape {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError("audio contains NaN or infinite samples")
    if not 0 < loudest <= 1:
        raise ValueError(f"loudest must be in (0, 1], got {loudest!r}")
    frames = x[: x.size // frame * frame].reshape(-1, frame)
    power = np.abs(np.fft.rfft(frames * np.hanning(frame), axis=1)) ** 2 + _TINY
    flatness = np.exp(np.log(power).mean(1)) / power.mean(1)
    energy = frames.var(1)
    keep = np.argsort(energy)[::-1][: max(1, round(loudest * len(frames)))]
    return float(np.median(flatness[keep]))


def _luma_chroma(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """uint8 [N, H, W, 3] -> luma [N, H, W] and chroma (Cb, Cr) [N, 2, H, W], float64, BT.601."""
    rgb = np.asarray(images, dtype=np.float64)
    y = rgb @ np.array([0.299, 0.587, 0.114])
    cb = (rgb[..., 2] - y) * 0.564
    cr = (rgb[..., 0] - y) * 0.713
    return y, np.stack([cb, cr], 1)


def image_texture(images: np.ndarray) -> dict[str, float]:
    """images uint8 [N, H, W, 3] (H, W >= 3) -> {"roughness": .., "speckle": ..}, each a mean over the images."""
    a = np.asarray(images)
    if a.ndim != 4 or a.shape[-1] != 3 or a.dtype != np.uint8 or min(a.shape[1:3]) < 3 or not len(a):
        raise ValueError(f"images must be uint8 [N, H, W, 3] with N >= 1 and H, W >= 3, got {a.dtype} {a.shape}")
    y, c = _luma_chroma(a)
    roughness = (np.abs(np.diff(y, axis=1)).mean((1, 2)) + np.abs(np.diff(y, axis=2)).mean((1, 2))) / 2
    pad = np.pad(c, ((0, 0), (0, 0), (1, 1), (1, 1)), mode="edge")
    h, w = c.shape[2:]
    box = sum(pad[:, :, i: i + h, j: j + w] for i in range(3) for j in range(3)) / 9
    speckle = np.abs(c - box).mean((1, 2, 3))
    return {"roughness": float(roughness.mean()), "speckle": float(speckle.mean())}
