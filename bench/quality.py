"""Held-out quality of each checkpoint next to lossless codecs on the very same validation data.

Run: ``python -m bench.quality [--checkpoints DIR | --checkpoint PATH ...] [--data PATH] [--items N]
[--update-card]``. Prints a table per model; the LAST line printed is one line of JSON.

Images: the model's bits per sub-pixel (bits/dim) on the validation split of its training data, next
to PNG (Pillow, optimize) and WebP lossless (method 6) files of the same 64x64 images, each counted
in bits per sub-pixel (file bytes x 8 / 12,288; the files' headers included).
Audio: the model's bits per byte on the 65,536-sample validation clips (8-bit mu-law), next to FLAC
(8-bit, level 8) files of the same clips. ``--update-card`` writes the figures into the card
(``evaluation``) so the app and README show them.
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

from bench.common import fmt, print_table, sig
from data.loader import eval_batches, open_dataset
from media.audio import SAMPLE_RATE
from media.image import tokens_to_image
from models import model_kind
from models.checkpoint import checkpoint_paths, load_model, update_card
from models.evaluate import sequence_bits


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
        self.indices = np.linspace(0, len(dataset) - 1, n).round().astype(np.int64) if n > 1 else np.zeros(1, int)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> np.ndarray:
        return self.dataset[int(self.indices[i])]


def evaluate(path: Path, data: str | None, items: int | None, batch: int) -> dict:
    """Model and codec bits per token on the validation split, over the same items."""
    model = load_model(path)
    card = model.card
    kind = model_kind(model)
    data = data or card.get("data", {}).get("path")
    if not data or not Path(data).exists():
        raise SystemExit(f"bench/quality.py: the data of {path} ({data}) is not here; pass --data")
    val = open_dataset(kind, data, "val", seq_len=None if kind == "image" else model.cfg.seq_len)
    n = len(val) if items is None else min(items, len(val))
    if n == 0:
        raise SystemExit(f"bench/quality.py: the validation split of {data} is empty")
    picked = Spread(val, n)
    start = time.perf_counter()
    model_bits = sum(float(b.sum()) for b in sequence_bits(model, eval_batches(picked, batch)))
    seconds = time.perf_counter() - start
    tokens = n * val.seq_len
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
    return {"checkpoint": str(path), "kind": kind, "unit": unit, "data": str(data), "split": "val", "items": n,
            "of_items": len(val), "tokens": tokens, "model": model_bits / tokens,
            "codecs": {k: v / tokens for k, v in codecs.items()}, "model_seconds": seconds}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoints", type=Path, default=Path(__file__).resolve().parent.parent / "checkpoints",
                    help="evaluate every checkpoint in this folder (default: the shipped ones)")
    ap.add_argument("--checkpoint", type=Path, action="append", help="evaluate this checkpoint (repeatable)")
    ap.add_argument("--data", help="dataset path (default: the one in the card)")
    ap.add_argument("--items", type=int, help="at most this many validation items, evenly spread (default: all)")
    ap.add_argument("--batch", type=int, default=1, help="sequences per forward pass")
    ap.add_argument("--update-card", action="store_true", help="write the figures into each card")
    a = ap.parse_args()
    if a.items is not None and a.items < 1:
        ap.error("--items must be >= 1")
    if a.batch < 1:
        ap.error("--batch must be >= 1")
    paths = a.checkpoint or sorted(p.with_suffix("") for p in a.checkpoints.glob("*.safetensors"))
    if not paths:
        ap.error(f"no checkpoints in {a.checkpoints}")
    results = []
    for path in paths:
        r = evaluate(checkpoint_paths(path)[0].with_suffix(""), a.data, a.items, a.batch)
        best = min(r["codecs"].values())
        r["saving_vs_best_codec"] = 1 - r["model"] / best
        rows = [["model", fmt(r["model"], ".3f"), "-"]] + [
            [name, fmt(v, ".3f"), f"{100 * (1 - r['model'] / v):+.1f}%"] for name, v in r["codecs"].items()]
        print_table(f"{path} ({r['kind']}): {r['items']} of {r['of_items']} validation items of {r['data']}",
                    ["coder", r["unit"], "model saves"], rows)
        if a.update_card:
            update_card(path, {"evaluation": {
                "split": "val", "items": r["items"], "unit": r["unit"], "model": sig(r["model"]),
                "codecs": {k: sig(v) for k, v in r["codecs"].items()}, "data": r["data"],
                "date": datetime.now(timezone.utc).strftime("%Y-%m-%d"),
                "command": "python -m bench.quality --update-card" + (f" --items {a.items}" if a.items else "")}})
        results.append({k: sig(v) if isinstance(v, float) and math.isfinite(v) else v for k, v in r.items()})
    print(json.dumps(results))


if __name__ == "__main__":
    main()
