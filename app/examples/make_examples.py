"""Draw the app's example prompts (pictures and clips made by this project, no third-party media).

python app/examples/make_examples.py  writes sunset.png, house.png, flower.png, arpeggio.flac and
chime.flac next to this file. Deterministic: the same files every run.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import soundfile as sf
from PIL import Image

HERE = Path(__file__).resolve().parent
H, W = 80, 96  # not square: the app's preview shows the centre crop the model sees
RATE = 12000


def _grid() -> tuple[np.ndarray, np.ndarray]:
    y, x = np.mgrid[0:H, 0:W]
    return y / (H - 1), x / (W - 1)


def _blend(top: tuple, bottom: tuple, t: np.ndarray) -> np.ndarray:
    return np.asarray(top) * (1 - t[..., None]) + np.asarray(bottom) * t[..., None]


def sunset() -> np.ndarray:
    y, x = _grid()
    sky = _blend((70, 40, 120), (250, 150, 60), np.clip(y / 0.6, 0, 1))
    sun = (x - 0.5) ** 2 + ((y - 0.55) * H / W) ** 2 < 0.015
    img = np.where(sun[..., None], (255, 220, 120), sky)
    sea = y > 0.6
    img[sea] = _blend((60, 50, 110), (20, 40, 90), (y - 0.6) / 0.4)[sea]
    glitter = sea & (np.abs(x - 0.5) < 0.1 + 0.3 * (y - 0.6)) & (np.sin(y * 120 + 7 * x) > 0.3)
    img[glitter] = (245, 170, 90)  # the sun's reflection on the waves
    return img


def house() -> np.ndarray:
    y, x = _grid()
    img = _blend((120, 170, 235), (200, 225, 250), y)
    img[y > 0.75] = (70, 150, 60)
    wall = (np.abs(x - 0.5) < 0.22) & (y > 0.45) & (y <= 0.8)
    roof = (y > 0.22) & (y <= 0.45) & (np.abs(x - 0.5) < (y - 0.22) * 1.25)
    door = (np.abs(x - 0.5) < 0.05) & (y > 0.62) & (y <= 0.8)
    window = (np.abs(x - 0.38) < 0.05) & (np.abs(y - 0.57) < 0.06)
    for mask, colour in ((wall, (235, 215, 170)), (roof, (180, 50, 40)), (door, (110, 70, 40)),
                         (window, (250, 240, 150))):
        img[mask] = colour
    return img


def flower() -> np.ndarray:
    y, x = _grid()
    img = _blend((40, 110, 50), (90, 160, 70), y)
    dy, dx = (y - 0.5) * H / W, x - 0.5
    r, angle = np.hypot(dx, dy), np.arctan2(dy, dx)
    petals = r < 0.3 * (0.55 + 0.45 * np.abs(np.cos(3 * angle)))
    img[petals] = _blend((250, 120, 170), (200, 40, 110), np.clip(r / 0.3, 0, 1))[petals]
    img[r < 0.08] = (250, 200, 40)
    return img


def _note(freq: float, seconds: float, partials: list[tuple[float, float]], decay: float) -> np.ndarray:
    t = np.arange(round(seconds * RATE)) / RATE
    tone = sum(a * np.sin(2 * np.pi * freq * k * t) for k, a in partials)
    return tone * np.exp(-decay * t) * np.minimum(1, t * 200)  # 5 ms attack, exponential decay


def arpeggio() -> np.ndarray:
    """C major, plucked: C4 E4 G4 C5, a quarter second each."""
    harmonics = [(1, 1.0), (2, 0.5), (3, 0.25), (4, 0.12)]
    notes = [_note(f, 0.25, harmonics, 6.0) for f in (261.63, 329.63, 392.0, 523.25)]
    return 0.3 * np.concatenate(notes)


def chime() -> np.ndarray:
    """Two bell strokes with inharmonic partials."""
    partials = [(1, 1.0), (2.76, 0.5), (5.4, 0.3), (8.93, 0.15)]
    return 0.3 * np.concatenate([_note(659.25, 0.5, partials, 5.0), _note(493.88, 0.5, partials, 5.0)])


def main() -> None:
    for name, draw in (("sunset", sunset), ("house", house), ("flower", flower)):
        Image.fromarray(np.clip(np.rint(draw()), 0, 255).astype(np.uint8)).save(HERE / f"{name}.png", optimize=True)
    for name, make in (("arpeggio", arpeggio), ("chime", chime)):
        sf.write(HERE / f"{name}.flac", make().astype(np.float32), RATE, subtype="PCM_16", format="FLAC")


if __name__ == "__main__":
    main()
