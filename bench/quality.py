"""Held-out quality of each checkpoint next to lossless codecs on the very same validation data.

Run: ``python -m bench.quality [--checkpoints DIR | --checkpoint PATH ...] [--data PATH] [--items N]
[--split val|train] [--update-card]``. Prints a table per model; the LAST line printed is one line of JSON.
``--split train`` codes training items instead (the same codecs beside them): how much better the model codes
what it trained on than what it did not, which the card's held-out figures (``--update-card``: val only) never
show.

Images: the model's bits per sub-pixel (bits/dim) on the validation split of its training data, next
to PNG (Pillow, optimize) and WebP lossless (method 6) files of the same 64x64 images, each counted
in bits per sub-pixel (file bytes x 8 / 12,288; the files' headers included).
Audio: the model's bits per byte on the 65,536-sample validation clips (8-bit mu-law), next to FLAC
(8-bit, level 8) files of the same clips. ``--update-card`` writes the figures into the card
(``evaluation``) so the app and README show them.

What a user sees and hears (media/measures.py), for --measure N samples (default 4; 0: off) drawn with
--temperature / --top-k / --top-p (each not given: the model card's sampling defaults, as in the app and sample.py;
without them temperature 1, no filter), seeds 0..N-1:
N samples from scratch and N continuations of the first N of the evaluated validation items, next to the
same measure of those validation items. Audio: median spectral flatness (music about 0.005, noise about
0.56) of --measure-length samples (default 24,000: 2 s), the continuations after a prompt of as many
samples of the validation window. Images: roughness and colour speckle of whole samples from scratch,
and of the bottom 32 rows completed from the top 32.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import soundfile as sf
from PIL import Image

from bench.common import fmt, print_table, sig, spread
from data.loader import eval_batches, open_dataset
from media.audio import SAMPLE_RATE, mu_law_decode
from media.image import tokens_to_image
from media.measures import image_texture, spectral_flatness
from models import model_kind
from models.architectures import TRANSFORMER
from models.checkpoint import checkpoint_paths, load_model, update_card
from models.evaluate import sequence_bits
from sampling import SamplingOptions, complete_image, generate_audio, resolve_options

PROMPT_ROWS = 32  # image continuations: the top half is given
SPLITS = ("val", "train")


def png_bits(image: np.ndarray) -> int:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, "PNG", optimize=True)
    return 8 * len(buf.getvalue())


def webp_lossless_bits(image: np.ndarray) -> int:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, "WEBP", lossless=True, quality=100, method=6)
    return 8 * len(buf.getvalue())


def flac_bits(tokens: np.ndarray) -> int:
    """FLAC file of 8-bit mu-law bytes uint8 [T] (as signed 8-bit PCM at 12 kHz, compression level 8)."""
    buf = io.BytesIO()
    pcm = (tokens.astype(np.int16) - 128).astype(np.float64) / 128.0
    sf.write(buf, pcm, SAMPLE_RATE, format="FLAC", subtype="PCM_S8", compression_level=1.0)
    return 8 * len(buf.getvalue())


class Spread:
    """``n`` items of ``dataset`` evenly spread over it (all of them when n = len), so that a partial
    evaluation samples every part of the split (audio windows come file after file)."""

    def __init__(self, dataset, n: int):
        self.dataset, self.seq_len = dataset, dataset.seq_len
        self.kind, self.skipped = dataset.kind, getattr(dataset, "skipped", 0)
        self.indices = spread(len(dataset), n)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> np.ndarray:
        return self.dataset[int(self.indices[i])]


def evaluate(path: Path, data: str | None, items: int | None, batch: int, measure: int = 0,
             requested: tuple = (None, None, None), length: int = 24000, split: str = "val") -> dict:
    """Model and codec bits per token on ``split`` ("val" or "train"), over the same items; with ``measure``,
    the measures of that many samples (:func:`sample_measures`) drawn with the ``requested`` (temperature,
    top_k, top_p), each None taken from the card's sampling defaults."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    model = load_model(path)
    card = model.card
    kind = model_kind(model)
    data = data or card.get("data", {}).get("path")
    if not data or not Path(data).exists():
        raise SystemExit(f"bench/quality.py: the data of {path} ({data}) is not here; pass --data")
    dataset = open_dataset(kind, data, split, seq_len=None if kind == "image" else model.cfg.seq_len)
    n = len(dataset) if items is None else min(items, len(dataset))
    if n == 0:
        raise SystemExit(f"bench/quality.py: the {split} split of {data} is empty")
    picked = Spread(dataset, n)
    start = time.perf_counter()
    model_bits = sum(float(b.sum()) for b in sequence_bits(model, eval_batches(picked, batch)))
    seconds = time.perf_counter() - start
    tokens = n * dataset.seq_len
    codecs: dict[str, int] = {}
    for i in range(n):
        seq = np.asarray(picked[i], dtype=np.uint8)
        if kind == "image":
            image = tokens_to_image(seq[None])[0]
            codecs["PNG"] = codecs.get("PNG", 0) + png_bits(image)
            codecs["WebP lossless"] = codecs.get("WebP lossless", 0) + webp_lossless_bits(image)
        else:
            codecs["FLAC"] = codecs.get("FLAC", 0) + flac_bits(seq)
    unit = "bits/dim" if kind == "image" else "bits/byte"
    result = {"checkpoint": str(path), "architecture": card.get("architecture", TRANSFORMER),
              "parameters": card.get("parameters"), "kind": kind, "unit": unit, "data": str(data), "split": split,
              "items": n, "of_items": len(dataset), "tokens": tokens, "model": model_bits / tokens,
              "codecs": {k: v / tokens for k, v in codecs.items()}, "model_seconds": seconds}
    if measure:
        options = resolve_options(card, *requested)
        result["samples"] = {"count": measure, "options": vars(options),
                             **sample_measures(model, kind, picked, measure, options, length, batch)}
    return result


def _last(reports):
    """The final report of a sampling generator."""
    return list(reports)[-1]


def _flatness(clips: np.ndarray) -> float:
    """Median spectral flatness of mu-law clips uint8 [n, T]."""
    return float(np.median([spectral_flatness(mu_law_decode(c)) for c in clips]))


def sample_measures(model, kind: str, picked, n: int, options: SamplingOptions, length: int, batch: int) -> dict:
    """The measures of n samples from scratch and n continuations of the evaluated items, and of those items."""
    items = np.stack([np.asarray(picked[i], dtype=np.uint8) for i in range(min(n, len(picked)))])
    seeds = list(range(n))
    if kind == "image":
        originals = tokens_to_image(items)
        scratch = _last(complete_image(model, np.zeros((64, 64, 3), np.uint8), 0, seeds, options, batch)).media
        cont = [_last(complete_image(model, image, PROMPT_ROWS, seeds[:1], options, 1)).media[0]
                for image in originals]
        return {"from_scratch": image_texture(scratch), "data": image_texture(originals),
                "continuations": image_texture(np.stack(cont)[:, PROMPT_ROWS:]),
                "data_continued_part": image_texture(originals[:, PROMPT_ROWS:])}
    length = min(length, model.cfg.seq_len // 2, items.shape[1] // 2)
    scratch = _last(generate_audio(model, length, seeds, None, options, batch)).media
    cont = [_last(generate_audio(model, length, seeds[:1], mu_law_decode(item[:length]), options, 1)).media[0]
            for item in items]
    return {"from_scratch": {"flatness": _flatness(scratch)},
            "continuations": {"flatness": _flatness(np.stack(cont)[:, length:])},
            "data": {"flatness": _flatness(items[:, length: 2 * length])}, "length": length}


def _rounded(value):
    """Floats to 4 significant digits, through dicts."""
    if isinstance(value, dict):
        return {k: _rounded(v) for k, v in value.items()}
    return sig(value) if isinstance(value, float) and math.isfinite(value) else value


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoints", type=Path, default=Path(__file__).resolve().parent.parent / "checkpoints",
                    help="evaluate every checkpoint in this folder (default: the shipped ones)")
    ap.add_argument("--checkpoint", type=Path, action="append", help="evaluate this checkpoint (repeatable)")
    ap.add_argument("--data", help="dataset path (default: the one in the card)")
    ap.add_argument("--items", type=int, help="at most this many items of the split, evenly spread (default: all)")
    ap.add_argument("--split", choices=SPLITS, default="val",
                    help="the items coded: val (held-out, the default) or train (the model's own training items)")
    ap.add_argument("--batch", type=int, default=1, help="sequences per forward pass")
    ap.add_argument("--update-card", action="store_true", help="write the figures into each card")
    ap.add_argument("--measure", type=int, default=4, metavar="N",
                    help="measure N samples from scratch and N continuations (default 4; 0: off)")
    ap.add_argument("--measure-length", type=int, default=24000, metavar="T",
                    help="audio samples generated per measured clip (default 24,000: 2 s)")
    ap.add_argument("--temperature", type=float,
                    help="sampling temperature of the measured samples (default: the card's, else 1)")
    ap.add_argument("--top-k", type=int, help="top-k of the measured samples, 0 = off (default: the card's, else off)")
    ap.add_argument("--top-p", type=float,
                    help="top-p of the measured samples, 1 = off (default: the card's, else off)")
    a = ap.parse_args()
    if a.items is not None and a.items < 1:
        ap.error("--items must be >= 1")
    if a.batch < 1:
        ap.error("--batch must be >= 1")
    if a.update_card and a.split != "val":
        ap.error("--update-card writes held-out figures: only with --split val")
    if a.measure < 0 or a.measure_length < 1024:
        ap.error("--measure must be >= 0 and --measure-length >= 1024 (one flatness frame)")
    requested = (a.temperature, a.top_k, a.top_p)
    try:
        resolve_options(None, *requested)
    except ValueError as e:
        ap.error(str(e))
    paths = a.checkpoint or sorted(p.with_suffix("") for p in a.checkpoints.glob("*.safetensors"))
    if not paths:
        ap.error(f"no checkpoints in {a.checkpoints}")
    results = []
    for path in paths:
        r = evaluate(checkpoint_paths(path)[0].with_suffix(""), a.data, a.items, a.batch, a.measure, requested,
                     a.measure_length, a.split)
        best = min(r["codecs"].values())
        r["saving_vs_best_codec"] = 1 - r["model"] / best
        rows = [["model", fmt(r["model"], ".3f"), "-"]] + [
            [name, fmt(v, ".3f"), f"{100 * (1 - r['model'] / v):+.1f}%"] for name, v in r["codecs"].items()]
        print_table(f"{path} ({r['kind']}, {r['architecture']}, {r['parameters']} parameters): {r['items']} of "
                    f"{r['of_items']} {r['split']} items of {r['data']}",
                    ["coder", r["unit"], "model saves"], rows)
        if "samples" in r:
            measures = r["samples"]
            names = [k for k in measures["data"]]
            rows = [[part] + [fmt(measures[part][k], ".4g") for k in names]
                    for part in ("from_scratch", "continuations", "data", "data_continued_part") if part in measures]
            print_table(f"{path}: what a user sees/hears, {measures['count']} samples at {measures['options']}",
                        ["samples", *names], rows)
        if a.update_card:
            evaluation = {
                "split": "val", "items": r["items"], "unit": r["unit"], "model": sig(r["model"]),
                "codecs": {k: sig(v) for k, v in r["codecs"].items()}, "data": r["data"],
                "date": datetime.now(timezone.utc).strftime("%Y-%m-%d"),
                "command": "python -m bench.quality --update-card" + (f" --items {a.items}" if a.items else "")}
            if "samples" in r:
                evaluation["samples"] = _rounded(r["samples"])
            update_card(path, {"evaluation": evaluation})
        results.append(_rounded(r))
    print(json.dumps(results))


if __name__ == "__main__":
    main()
