"""Pictures of samples, shared by sample.py, the web app and bench/figures.py: the paper-style completion
grid (prompt | completions | original, enlarged with nearest neighbour, a line where the prompt ends)
and a waveform + spectrogram of a clip with its prompt and continuation told apart.
"""

from __future__ import annotations

import numpy as np

GRID_SCALE, GRID_GAP = 4, 4  # grid tiles enlarged 4x (nearest neighbour), 4 white pixels between them
LINE_COLOR = (255, 0, 0)  # the line drawn where the prompt ends

PROMPT_WAVE, SAMPLED_WAVE = (150, 152, 165), (79, 70, 229)  # grey prompt, indigo continuation
PENDING, BACKGROUND = (241, 242, 246), (255, 255, 255)  # not sampled yet; around the panels
# a magma-like colour map for the spectrogram: dark (quiet) to pale yellow (loud)
_STOPS = np.array([[0, 0, 4], [80, 18, 123], [182, 54, 121], [251, 136, 97], [252, 253, 191]], np.float64)
SPECTRUM_COLOURS = np.stack([np.interp(np.linspace(0, 4, 256), np.arange(5), _STOPS[:, k]) for k in range(3)], 1)


def masked_prompt(image: np.ndarray, prompt_rows: int) -> np.ndarray:
    """The prompt as the model sees it: rows 0..prompt_rows-1 of ``image``, the rest black."""
    prompt = image.copy()
    prompt[prompt_rows:] = 0
    return prompt


def make_grid(tiles: list[np.ndarray], prompt_rows: int, scale: int = GRID_SCALE, columns: int | None = None
              ) -> np.ndarray:
    """64x64 tiles in a grid ``columns`` wide (default: one row), enlarged ``scale`` x with nearest
    neighbour, with a line over the last enlarged row of the prompt in every row of tiles."""
    if not tiles:
        raise ValueError("make_grid needs at least one tile")
    columns = columns or len(tiles)
    size = 64 * scale
    rows = -(-len(tiles) // columns)
    grid = np.full((rows * (size + GRID_GAP) - GRID_GAP, columns * (size + GRID_GAP) - GRID_GAP, 3), 255, np.uint8)
    for i, tile in enumerate(tiles):
        y, x = (i // columns) * (size + GRID_GAP), (i % columns) * (size + GRID_GAP)
        grid[y: y + size, x: x + size] = tile.repeat(scale, 0).repeat(scale, 1)
    if prompt_rows:
        for r in range(rows):
            grid[r * (size + GRID_GAP) + prompt_rows * scale - 1] = LINE_COLOR
    return grid


def _spectrogram(x: np.ndarray, columns: int, frame: int = 256) -> np.ndarray:
    """Log-magnitude spectrogram [frame // 2, columns], 0 (-80 dB or less) .. 1 (full scale)."""
    padded = np.pad(x, (frame // 2, frame // 2))
    starts = np.linspace(0, len(padded) - frame, columns).astype(np.int64)
    frames = padded[starts[:, None] + np.arange(frame)] * np.hanning(frame)
    power = np.abs(np.fft.rfft(frames, axis=1))[:, 1:] / (frame / 4)
    db = 20 * np.log10(np.maximum(power, 1e-4))
    return np.clip(db / 80 + 1, 0, 1).T


def audio_picture(samples: np.ndarray, prompt_len: int = 0, total_len: int | None = None, width: int = 800,
                  wave_height: int = 120, spectrum_height: int = 96) -> np.ndarray:
    """uint8 RGB picture of float samples [T] in [-1, 1]: a min/max waveform on top (prompt grey,
    continuation indigo, a red line where the prompt ends) and a spectrogram below (low
    frequencies at the bottom). ``total_len`` > T leaves room for the part not sampled yet."""
    x = np.clip(np.nan_to_num(np.asarray(samples, np.float64)), -1, 1)
    total = max(total_len or len(x), len(x), 1)
    pad = 8
    out = np.full((wave_height + spectrum_height + 3 * pad, width + 2 * pad, 3), BACKGROUND, np.uint8)
    wave = np.full((wave_height, width, 3), PENDING, np.uint8)
    spec = np.full((spectrum_height, width, 3), PENDING, np.uint8)
    drawn = min(width, int(np.ceil(width * len(x) / total)))  # columns holding samples
    if drawn and len(x):
        starts = np.linspace(0, len(x), drawn, endpoint=False).astype(np.int64)  # one bin of samples per column
        lo, hi = np.minimum.reduceat(x, starts), np.maximum.reduceat(x, starts)
        wave[:, :drawn] = BACKGROUND
        y = (1 - np.arange(wave_height)[:, None] / (wave_height - 1)) * 2 - 1  # +1 at the top row
        half = 1 / (wave_height - 1)
        ink = (y >= lo[None] - half) & (y <= hi[None] + half)
        prompt_cols = int(width * prompt_len / total)
        colour = np.where(np.arange(drawn)[:, None] < prompt_cols, PROMPT_WAVE, SAMPLED_WAVE)
        wave[:, :drawn][ink] = np.broadcast_to(colour, (wave_height, drawn, 3))[ink]
        s = _spectrogram(x, drawn)
        rows = np.linspace(s.shape[0] - 1, 0, spectrum_height).astype(np.int64)  # low frequencies at the bottom
        spec[:, :drawn] = SPECTRUM_COLOURS[np.rint(s[rows] * 255).astype(np.int64)].astype(np.uint8)
        if 0 < prompt_len < total:
            wave[:, min(prompt_cols, width - 1)] = LINE_COLOR
            spec[:, min(prompt_cols, width - 1)] = LINE_COLOR
    out[pad: pad + wave_height, pad: pad + width] = wave
    out[2 * pad + wave_height: 2 * pad + wave_height + spectrum_height, pad: pad + width] = spec
    return out


LABEL_HEIGHT = 18  # pixels of the text band labelled() puts above a picture


def labelled(picture: np.ndarray, text: str, height: int = LABEL_HEIGHT) -> np.ndarray:
    """uint8 RGB [H, W, 3] -> [height + H, W, 3]: ``text`` in black on a white band above the picture."""
    from PIL import Image, ImageDraw, ImageFont

    a = np.asarray(picture)
    if a.ndim != 3 or a.shape[2] != 3 or a.dtype != np.uint8:
        raise ValueError(f"picture must be uint8 [H, W, 3], got {a.dtype} {a.shape}")
    if height < 8:
        raise ValueError(f"height must be >= 8 pixels, got {height}")
    band = Image.new("RGB", (a.shape[1], height), BACKGROUND)
    ImageDraw.Draw(band).text((2, 1), text, fill=(0, 0, 0), font=ImageFont.load_default(height - 5))
    return np.concatenate([np.asarray(band), a])


def stack(pictures: list[np.ndarray], gap: int = GRID_GAP) -> np.ndarray:
    """uint8 RGB pictures one above the other, left-aligned on white, ``gap`` pixels apart."""
    if not pictures:
        raise ValueError("stack needs at least one picture")
    width = max(p.shape[1] for p in pictures)
    rows = []
    for p in pictures:
        row = np.full((p.shape[0] + gap, width, 3), BACKGROUND, np.uint8)
        row[: p.shape[0], : p.shape[1]] = p
        rows.append(row)
    return np.concatenate(rows)[:-gap] if gap else np.concatenate(rows)
