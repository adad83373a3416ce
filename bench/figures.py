"""The README's pictures of the shipped models: completions of validation images and audio spectrograms.

Run: ``python -m bench.figures [--checkpoints DIR | --checkpoint PATH ...] [--out docs] [--images 4]
[--samples 3] [--clips 2] [--seconds 2]``.

Image: ``--images`` validation images of the model's data (items 0, len(val) / images, ...), each as
a row prompt (top 32 rows) | ``--samples`` completions | original (docs/completions_<model>.png).
Audio: ``--clips`` continuations of validation clips (1 s of prompt, ``--seconds`` more), written as
16-bit WAVs and one picture of waveforms and spectrograms (docs/audio_<model>.png).
Seeds 0.. ; temperature 1. Prints what it wrote and how long it took.
"""

from __future__ import annotations

import argparse
import collections
import time
from pathlib import Path

import numpy as np
from PIL import Image

from data.loader import open_dataset
from media.audio import SAMPLE_RATE, save_wav, tokens_to_audio
from media.image import tokens_to_image
from media.pictures import audio_picture, make_grid, masked_prompt, stack
from models import model_kind
from models.checkpoint import load_model
from sampling import complete_image, generate_audio

PROMPT_ROWS = 32


def last(reports):
    """The final report of a sampling generator."""
    return collections.deque(reports, maxlen=1)[0]


def image_figure(model, val, n_images: int, n_samples: int, out: Path) -> Path:
    rows = []
    for k in range(n_images):
        image = tokens_to_image(np.asarray(val[k * len(val) // n_images])[None])[0]
        done = last(complete_image(model, image, PROMPT_ROWS, list(range(n_samples)), batch_size=n_samples))
        rows.append(make_grid([masked_prompt(image, PROMPT_ROWS), *done.media, image], PROMPT_ROWS))
    Image.fromarray(stack(rows)).save(out)
    return out


def audio_figure(model, val, n_clips: int, seconds: float, out: Path) -> list[Path]:
    prompt_len, length = SAMPLE_RATE, int(seconds * SAMPLE_RATE)
    pictures, written = [], []
    for k in range(n_clips):
        clip = tokens_to_audio(np.asarray(val[k * len(val) // n_clips])[: prompt_len])
        done = last(generate_audio(model, length, [k], clip))
        audio = tokens_to_audio(done.media[0])
        pictures.append(audio_picture(audio, prompt_len))
        written.append(save_wav(out.with_name(f"{out.stem}_{k + 1}.wav"), done.media[0]))
    Image.fromarray(np.concatenate(pictures)).save(out)
    return [out, *written]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    root = Path(__file__).resolve().parent.parent
    ap.add_argument("--checkpoints", type=Path, default=root / "checkpoints", help="every checkpoint in this folder")
    ap.add_argument("--checkpoint", type=Path, action="append", help="only this checkpoint (repeatable)")
    ap.add_argument("--out", type=Path, default=root / "docs")
    ap.add_argument("--images", type=int, default=4)
    ap.add_argument("--samples", type=int, default=3)
    ap.add_argument("--clips", type=int, default=2)
    ap.add_argument("--seconds", type=float, default=2.0, help="seconds generated after each 1 s prompt")
    a = ap.parse_args()
    if min(a.images, a.samples, a.clips) < 1 or not 0 < a.seconds <= 4.0:
        ap.error("--images, --samples and --clips must be >= 1 and --seconds in (0, 4]")
    paths = a.checkpoint or sorted(p.with_suffix("") for p in a.checkpoints.glob("*.safetensors"))
    if not paths:
        ap.error(f"no checkpoints in {a.checkpoints}")
    a.out.mkdir(parents=True, exist_ok=True)
    for path in paths:
        model = load_model(path)
        kind = model_kind(model)
        val = open_dataset(kind, model.card["data"]["path"], "val",
                           seq_len=None if kind == "image" else model.cfg.seq_len)
        start = time.perf_counter()
        if kind == "image":
            written = [image_figure(model, val, a.images, a.samples, a.out / f"completions_{path.name}.png")]
        else:
            written = audio_figure(model, val, a.clips, a.seconds, a.out / f"audio_{path.name}.png")
        print(f"{path.name}: wrote {', '.join(str(w) for w in written)} in {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
