"""Learning curves of training runs from their logs: held-out and training bits against tokens and time.

Run: ``python -m bench.curves RUN [RUN ...] [--names A,B] [--every TOKENS] [--figure docs/x.png]``,
RUN a train.py run folder (its ``log.jsonl``). For each run: every held-out evaluation (step, tokens
seen, training minutes, bits), then the mean training bits over windows of ``--every`` tokens (default:
a tenth of the longest run). Training bits on batches the run has not seen before estimate held-out bits
as long as the run stays within one epoch. Minutes count the steps' own time (data, forward, backward,
update), not evaluations. ``--figure`` draws both views (bits against tokens, against minutes) as one
PNG. The last line printed is JSON with every figure.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from bench.common import fmt, print_table, sig

COLOURS = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189), (255, 127, 14), (23, 190, 207)]


def read_run(folder: Path) -> dict:
    """A run's steps (step, tokens seen, cumulative minutes, training bits) and evaluations (step, tokens,
    minutes, held-out bits, items); ValueError for a folder without a readable log."""
    log = folder / "log.jsonl"
    if not log.is_file():
        raise ValueError(f"{folder} has no log.jsonl (is it a train.py --out folder?)")
    steps, evals, minutes = {}, [], 0.0
    with open(log) as f:
        for n, line in enumerate(f, 1):
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                raise ValueError(f"{log}:{n} is not JSON") from None
            if "event" not in rec and "bits_per_dim" in rec:
                minutes += rec.get("seconds", 0.0) / 60
                steps[rec["step"]] = (rec["tokens_seen"], minutes, rec["bits_per_dim"])
            elif rec.get("event") == "eval" and rec.get("step") in steps:
                tokens, mins, _ = steps[rec["step"]]
                evals.append((rec["step"], tokens, mins, rec["held_out_bits_per_dim"], rec.get("items")))
    if not steps:
        raise ValueError(f"{log} has no training steps")
    order = sorted(steps)
    return {"steps": np.array([(s, *steps[s]) for s in order]), "evals": evals}


def windows(run: dict, every: float) -> list[tuple[float, float, float]]:
    """(last tokens, minutes, mean training bits) per window of ``every`` tokens."""
    steps = run["steps"]
    out, start = [], 0
    for k in range(1, len(steps) + 1):
        if k == len(steps) or steps[k, 1] // every > steps[start, 1] // every:
            chunk = steps[start:k]
            out.append((chunk[-1, 1], chunk[-1, 2], float(chunk[:, 3].mean())))
            start = k
    return out


def _axis(draw, box, lo, hi, ticks, vertical, label):
    x0, y0, x1, y1 = box
    for t in ticks:
        if vertical:
            y = y1 - (t - lo) / (hi - lo) * (y1 - y0)
            draw.line([(x0, y), (x1, y)], fill=(225, 225, 225))
            draw.text((x0 - 6, y), f"{t:g}", fill=(0, 0, 0), anchor="rm")
        else:
            x = x0 + (t - lo) / (hi - lo) * (x1 - x0)
            draw.line([(x, y0), (x, y1)], fill=(225, 225, 225))
            draw.text((x, y1 + 6), f"{t:g}", fill=(0, 0, 0), anchor="mt")
    if vertical:
        draw.text((x0 - 40, y0 - 14), label, fill=(0, 0, 0))
    else:
        draw.text(((x0 + x1) / 2, y1 + 22), label, fill=(0, 0, 0), anchor="mt")


def _ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    step = 10 ** math.floor(math.log10((hi - lo) / n)) if hi > lo else 1
    for m in (1, 2, 5, 10):
        if (hi - lo) / (step * m) <= n:
            step *= m
            break
    first = math.ceil(lo / step) * step
    return [round(first + k * step, 10) for k in range(int((hi - first) / step) + 1)]


def figure(runs: dict[str, dict], every: float, path: Path) -> None:
    """Two panels (bits against millions of tokens, against minutes): training-bit windows as lines,
    held-out evaluations as dots; one colour per run."""
    width, height, pad = 1100, 430, 70
    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)
    series = {name: (windows(r, every), r["evals"]) for name, r in runs.items()}
    ys = [b for w, e in series.values() for b in [p[2] for p in w] + [p[3] for p in e]]
    lo, hi = min(ys), max(ys)
    lo, hi = lo - 0.05 * (hi - lo + 1e-9), hi + 0.05 * (hi - lo + 1e-9)
    panel = (width - 3 * pad) // 2
    for k, (xi, label) in enumerate(((0, "tokens (millions)"), (1, "training minutes"))):
        box = (pad + k * (panel + pad), 40, pad + k * (panel + pad) + panel, height - 60)
        scale = 1e6 if xi == 0 else 1.0
        xs = [p[xi] / scale for w, e in series.values() for p in w] + [0.0]
        x_hi = max(xs)
        draw.rectangle(box, outline=(0, 0, 0))
        _axis(draw, box, 0.0, x_hi, _ticks(0.0, x_hi), False, label)
        _axis(draw, box, lo, hi, _ticks(lo, hi), True, "bits")

        def at(x, y, box=box, x_hi=x_hi):
            return (box[0] + x / x_hi * (box[2] - box[0]), box[3] - (y - lo) / (hi - lo) * (box[3] - box[1]))

        for c, (w, e) in enumerate(series.values()):
            colour = COLOURS[c % len(COLOURS)]
            points = [at(p[xi] / scale, p[2]) for p in w]
            if len(points) > 1:
                draw.line(points, fill=colour, width=2)
            for p in e:
                x, y = at((p[1] if xi == 0 else p[2]) / scale, p[3])
                draw.ellipse([x - 4, y - 4, x + 4, y + 4], fill=colour)
    for c, name in enumerate(series):
        draw.rectangle([pad + c * 260, 12, pad + c * 260 + 14, 24], fill=COLOURS[c % len(COLOURS)])
        draw.text((pad + c * 260 + 20, 12), f"{name} (line: training, dots: held-out)", fill=(0, 0, 0))
    path.parent.mkdir(parents=True, exist_ok=True)
    img.quantize(colors=64, method=Image.Quantize.MEDIANCUT).save(path, optimize=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("runs", nargs="+", type=Path, help="train.py run folders")
    ap.add_argument("--names", help="comma-separated names, one per run (default: the folders' names)")
    ap.add_argument("--every", type=float, help="tokens per training-bits window (default: longest run / 10)")
    ap.add_argument("--figure", type=Path, help="write the curves as a PNG here")
    a = ap.parse_args(argv)
    names = a.names.split(",") if a.names else [r.name for r in a.runs]
    if len(names) != len(a.runs) or len(set(names)) != len(names):
        ap.error(f"--names must give {len(a.runs)} distinct names, got {names}")
    try:
        runs = {n: read_run(r) for n, r in zip(names, a.runs, strict=True)}
    except ValueError as e:
        ap.error(str(e))
    every = a.every or max(r["steps"][-1, 1] for r in runs.values()) / 10
    if not every > 0:
        ap.error("--every must be > 0")
    out = {}
    for name, r in runs.items():
        last = r["steps"][-1]
        print(f"{name}: {int(last[0])} steps, {last[1] / 1e6:.2f}M tokens, {last[2]:.1f} training minutes")
        if r["evals"]:
            print_table(f"{name}: held-out bits", ["step", "tokens (M)", "minutes", "bits", "items"],
                        [[str(s), fmt(t / 1e6, ".3g"), fmt(m, ".3g"), fmt(b, ".4f"), str(i)]
                         for s, t, m, b, i in r["evals"]])
        w = windows(r, every)
        print_table(f"{name}: mean training bits per {every / 1e6:.3g}M tokens", ["to tokens (M)", "minutes", "bits"],
                    [[fmt(t / 1e6, ".3g"), fmt(m, ".3g"), fmt(b, ".4f")] for t, m, b in w])
        out[name] = {"steps": int(last[0]), "tokens": int(last[1]), "minutes": sig(float(last[2]), 4),
                     "evals": [{"step": s, "tokens": int(t), "minutes": sig(m, 4), "bits": sig(b, 5), "items": i}
                               for s, t, m, b, i in r["evals"]],
                     "train_windows": [{"tokens": int(t), "minutes": sig(m, 4), "bits": sig(b, 5)} for t, m, b in w]}
    if a.figure:
        figure(runs, every, a.figure)
        print(f"wrote {a.figure}")
    print(json.dumps({"every_tokens": every, "runs": out, "figure": str(a.figure) if a.figure else None}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
