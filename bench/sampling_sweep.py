"""Sampling defaults chosen by measurement: sample a model at a grid of temperatures and top-p values, measure
what a user sees or hears next to the validation data, pick the setting closest to the data, and optionally
write it into the model card (``sampling``), which sample.py and the web app then use as their defaults.

Run: ``python -m bench.sampling_sweep --checkpoint checkpoints/image64 --temperature 0.9,0.95,1.0
--top-p 1,0.98 --samples 6 [--top-k K] [--figure docs/sampling_image64.png] [--update-card] [--threads 1]``.
Prints a table per model; the LAST line printed is one line of JSON.

Every setting draws the same seeds 0..N-1 (common random numbers: the settings differ by their options only).

Images: N whole images from scratch and N completions of the bottom 32 rows of N validation images (spread over
the split), scored by roughness and colour speckle (media.measures.image_texture) against --data-items
validation images (whole, and their bottom halves for the completions). Distance to the data: the mean of
|ln(sample / data)| over the four figures; the chosen setting has the smallest.
Audio: N clips of --length samples from scratch, scored by median spectral flatness (music about 0.005, noise
about 0.56) and median RMS loudness against --length-sample windows of --data-items validation clips. A
setting is degenerate when any clip is quieter than the data's quietest window / --loudness-factor (music has
quiet passages; a floor under the median refused clips as quiet as real ones) or stuck (one token value fills
over half the clip: silence, a held sample), or its median RMS is over the loudest data
window's (a buzz: a square wave, low in flatness without any note). Distance: |ln(flatness / data flatness)|
for the others (the lowest flatness while every setting is flatter than the data); the chosen setting has
the smallest.
The figure (--figure, default docs/sampling_<model>.png): a row per setting with its figures in the label,
the data first; images: completions from scratch | completions of the bottom half; audio: a bar of the flatness
on a log axis (1e-3 .. 1, data marked) and the waveform and spectrogram of the first clip.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from bench.common import cpu_name, fmt, print_table, sig, spread
from data.loader import open_dataset
from media.audio import mu_law_decode
from media.image import IMAGE_TOKENS, image_to_tokens, tokens_to_image
from media.measures import image_texture, spectral_flatness
from media.pictures import audio_picture, labelled, make_grid, stack
from models import model_kind
from models.checkpoint import checkpoint_paths, load_model, update_card
from sampling import SamplingOptions, complete_image, generate, generate_audio

PROMPT_ROWS = 32  # image completions: the top half is given
ROW_TOKENS = 64 * 3  # tokens per image row
STUCK = 0.5  # a clip is stuck when one token value fills more than this share of it
FLATNESS_AXIS = (1e-3, 1.0)  # the figure's log axis of flatness
FIGURE_TILES = 4  # images per kind (from scratch, completed) shown per setting
FIGURE_SCALE = 2  # image tiles enlarged 2x
# the four image figures compared with the data's: (samples, figure)
IMAGE_FIGURES = [(part, k) for part in ("from_scratch", "completed") for k in ("roughness", "speckle")]


def number_list(text: str, name: str) -> list[float]:
    """"0.9,0.95,1" -> [0.9, 0.95, 1.0]; ValueError naming the flag otherwise."""
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"--{name} must be numbers separated by commas, got {text!r}") from None
    if not values:
        raise ValueError(f"--{name} needs at least one value")
    return values


def settings_grid(temperatures: list[float], top_ps: list[float], top_k: int | None) -> list[SamplingOptions]:
    """Every (temperature, top-p) pair as SamplingOptions (top-p 1 = off); ValueError for a bad value."""
    return [SamplingOptions(t, top_k, None if p == 1 else p) for t in temperatures for p in top_ps]


def describe(options: SamplingOptions) -> str:
    parts = [f"T {options.temperature:g}"]
    parts += [f"top-k {options.top_k}"] if options.top_k is not None else []
    parts.append(f"top-p {options.top_p:g}" if options.top_p is not None else "top-p off")
    return ", ".join(parts)


def log_distance(pairs: list[tuple[float, float]]) -> float:
    """Mean |ln(sample / data)| over (sample, data) pairs of positive figures (inf when a sample figure is 0)."""
    return float(np.mean([abs(math.log(s / d)) if s > 0 and d > 0 else math.inf for s, d in pairs]))


def _last(reports):
    return list(reports)[-1]


# ---- images ----

def image_data(val, indices: np.ndarray) -> tuple[np.ndarray, dict]:
    """The validation images at ``indices`` uint8 [M, 64, 64, 3] and their figures (whole, bottom half)."""
    images = tokens_to_image(np.stack([np.asarray(val[int(i)], np.uint8) for i in indices]))
    return images, {"from_scratch": image_texture(images), "completed": image_texture(images[:, PROMPT_ROWS:])}


def image_setting(model, prompts: np.ndarray, n: int, options: SamplingOptions, batch: int) -> dict:
    """n images from scratch and completions of the bottom halves of ``prompts`` [n, 64, 64, 3], seeds 0..n-1."""
    seeds = list(range(n))
    scratch = _last(complete_image(model, np.zeros((64, 64, 3), np.uint8), 0, seeds, options, batch)).media.copy()
    tokens = torch.from_numpy(image_to_tokens(prompts)[:, : PROMPT_ROWS * ROW_TOKENS].copy()).long()
    completed = []
    for s in range(0, n, batch):
        done = _last(generate(model, tokens[s: s + batch], IMAGE_TOKENS, seeds[s: s + batch], options,
                              report_every=IMAGE_TOKENS))
        completed.append(tokens_to_image(done.tokens))
    completed = np.concatenate(completed)
    return {"media": {"from_scratch": scratch, "completed": completed},
            "from_scratch": image_texture(scratch), "completed": image_texture(completed[:, PROMPT_ROWS:])}


def image_distance(row: dict, data: dict) -> float:
    return log_distance([(row[part][k], data[part][k]) for part, k in IMAGE_FIGURES])


def image_label(name: str, row: dict, extra: str = "") -> str:
    s, c = row["from_scratch"], row["completed"]
    return (f"{name}: from scratch roughness {s['roughness']:.2f}, speckle {s['speckle']:.2f} | completed "
            f"roughness {c['roughness']:.2f}, speckle {c['speckle']:.2f}{extra}")


def image_figure(data_images: np.ndarray, prompts: np.ndarray, data: dict, rows: list[dict]) -> np.ndarray:
    """Validation images (whole | the prompts' originals) above a row per setting (from scratch | completed)."""
    k = FIGURE_TILES

    def strip(scratch: np.ndarray, completed: np.ndarray) -> np.ndarray:
        left = make_grid(list(scratch[:k]), 0, FIGURE_SCALE)
        right = make_grid(list(completed[:k]), PROMPT_ROWS, FIGURE_SCALE)
        gap = np.full((left.shape[0], 6 * FIGURE_SCALE * 2, 3), 255, np.uint8)
        return np.concatenate([left, gap, right], 1)

    pictures = [labelled(strip(data_images[-k:], prompts), image_label("validation images", data))]
    for r in rows:
        extra = f" | distance {r['distance']:.3f}" + ("  << chosen" if r.get("chosen") else "")
        pictures.append(labelled(strip(r["media"]["from_scratch"], r["media"]["completed"]),
                                 image_label(describe(r["options"]), r, extra)))
    return stack(pictures, 8)


# ---- audio ----

def clip_figures(clips: np.ndarray) -> dict:
    """mu-law clips uint8 [n, T] -> median flatness, median, smallest and largest RMS, share of stuck clips."""
    audio = [mu_law_decode(c) for c in clips]
    stuck = [np.bincount(c, minlength=256).max() > STUCK * len(c) for c in clips]
    rms = [np.sqrt(np.mean(a.astype(np.float64) ** 2)) for a in audio]
    return {"flatness": float(np.median([spectral_flatness(a) for a in audio])), "rms": float(np.median(rms)),
            "quietest_rms": float(np.min(rms)), "loudest_rms": float(np.max(rms)), "stuck": float(np.mean(stuck))}


def audio_data(val, indices: np.ndarray, length: int) -> dict:
    """The figures of windows [length, 2 * length) of the validation clips at ``indices`` (past each clip's start)."""
    clips = np.stack([np.asarray(val[int(i)], np.uint8)[length: 2 * length] for i in indices])
    return clip_figures(clips)


def audio_setting(model, n: int, length: int, options: SamplingOptions, batch: int) -> dict:
    clips = _last(generate_audio(model, length, list(range(n)), None, options, batch)).media.copy()
    return {"media": {"clips": clips}, **clip_figures(clips)}


def audio_verdict(row: dict, data: dict, loudness_factor: float) -> tuple[float, str | None]:
    """(distance, None) or (inf, why the setting is degenerate: any clip stuck or much quieter than the data's
    quietest window, or the median clip louder than every data window: on the audio models that is a buzz, a
    square wave whose flatness is low although no note is played)."""
    if row["stuck"] > 0:
        return math.inf, f"stuck ({row['stuck']:.0%} of clips)"
    if row["quietest_rms"] < data["quietest_rms"] / loudness_factor:
        return math.inf, (f"a clip's loudness {row['quietest_rms']:.3g} under 1/{loudness_factor:g} of the quietest "
                          f"data window's {data['quietest_rms']:.3g}")
    if row["rms"] > data["loudest_rms"]:
        return math.inf, f"loudness {row['rms']:.3g} over the loudest data window's {data['loudest_rms']:.3g}"
    return log_distance([(row["flatness"], data["flatness"])]), None


def flatness_bar(value: float, data_value: float, width: int) -> np.ndarray:
    """A bar of ``value`` on a log axis FLATNESS_AXIS, the data's value marked by a red tick."""
    lo, hi = (math.log10(v) for v in FLATNESS_AXIS)

    def x(v: float) -> int:
        return int(round((min(max(math.log10(max(v, 1e-12)), lo), hi) - lo) / (hi - lo) * (width - 1)))

    bar = np.full((14, width, 3), 241, np.uint8)
    bar[3:11, : x(value) + 1] = (79, 70, 229)
    for decade in range(int(lo), int(hi) + 1):
        bar[:, x(10.0 ** decade)] = (150, 152, 165)
    bar[:, max(0, x(data_value) - 1): x(data_value) + 2] = (255, 0, 0)
    return bar


def audio_label(name: str, row: dict, extra: str = "") -> str:
    return f"{name}: flatness {row['flatness']:.3g}, RMS {row['rms']:.3g}{extra}"


def audio_figure(data: dict, rows: list[dict]) -> np.ndarray:
    """The data's flatness bar above a row per setting: its bar, then its first clip's waveform and spectrogram."""
    pictures = []
    for r in rows:
        extra = f" | distance {r['distance']:.3f}" if math.isfinite(r["distance"]) else f" | {r['degenerate']}"
        extra += "  << chosen" if r.get("chosen") else ""
        clip = audio_picture(mu_law_decode(r["media"]["clips"][0]), wave_height=48, spectrum_height=48)
        pictures.append(labelled(stack([flatness_bar(r["flatness"], data["flatness"], clip.shape[1]), clip], 0),
                                 audio_label(describe(r["options"]), r, extra)))
    axis = f"flatness on a log axis, {FLATNESS_AXIS[0]:g} .. {FLATNESS_AXIS[1]:g} (grey: decades, red: the data)"
    bar = flatness_bar(data["flatness"], data["flatness"], pictures[0].shape[1])
    return stack([labelled(bar, audio_label("validation clips", data, f" | {axis}")), *pictures], 8)


# ---- the sweep ----

def sweep(path: Path, settings: list[SamplingOptions], n: int, data_items: int, length: int, batch: int,
          loudness_factor: float, data_path: str | None = None, log=print) -> dict:
    """Sample ``path``'s model at each setting and measure it against the data; marks the chosen row."""
    model = load_model(path)
    kind = model_kind(model)
    data_path = data_path or (model.card.get("data") or {}).get("path")
    if not data_path or not Path(data_path).exists():
        raise SystemExit(f"bench/sampling_sweep.py: the data of {path} ({data_path}) is not here; pass --data")
    val = open_dataset(kind, data_path, "val", seq_len=None if kind == "image" else model.cfg.seq_len)
    m = min(data_items, len(val))
    indices = spread(len(val), m)
    if kind == "image":
        data_images, data = image_data(val, indices)
        prompts = data_images[spread(m, n)]  # repeats when n > m
    else:
        length = min(length, model.cfg.seq_len, val.seq_len // 2)
        data = audio_data(val, indices, length)
    rows = []
    for options in settings:
        start = time.perf_counter()
        if kind == "image":
            row = image_setting(model, prompts, n, options, batch)
            row["distance"], row["degenerate"] = image_distance(row, data), None
        else:
            row = audio_setting(model, n, length, options, batch)
            row["distance"], row["degenerate"] = audio_verdict(row, data, loudness_factor)
        row["options"], row["seconds"] = options, time.perf_counter() - start
        log(f"  {describe(options)}: distance {row['distance']:.3f} ({row['seconds']:.0f} s)")
        rows.append(row)
    best = min(range(len(rows)), key=lambda i: rows[i]["distance"])
    if math.isfinite(rows[best]["distance"]):
        rows[best]["chosen"] = True
    result = {"checkpoint": str(path), "kind": kind, "data": str(data_path), "data_items": m, "samples": n,
              "data_figures": data, "rows": rows}
    if kind == "image":
        result["data_images"], result["prompts"] = data_images, prompts
    else:
        result["length"] = length
    return result


def table_rows(result: dict) -> tuple[list[str], list[list[str]]]:
    if result["kind"] == "image":
        headers = ["setting", "scratch rough", "scratch speckle", "completed rough", "completed speckle", "distance",
                   "s"]
        data = result["data_figures"]
        rows = [["validation data", *(fmt(data[p][k], ".3g") for p, k in IMAGE_FIGURES), "-", "-"]]
        for r in result["rows"]:
            rows.append([describe(r["options"]) + (" *" if r.get("chosen") else ""),
                         *(fmt(r[p][k], ".3g") for p, k in IMAGE_FIGURES),
                         fmt(r["distance"], ".3f"), f"{r['seconds']:.0f}"])
        return headers, rows
    headers = ["setting", "flatness", "RMS", "stuck", "distance", "s"]
    data = result["data_figures"]
    rows = [["validation data", fmt(data["flatness"], ".3g"), fmt(data["rms"], ".3g"), f"{data['stuck']:.0%}", "-",
             "-"]]
    for r in result["rows"]:
        rows.append([describe(r["options"]) + (" *" if r.get("chosen") else ""), fmt(r["flatness"], ".3g"),
                     fmt(r["rms"], ".3g"), f"{r['stuck']:.0%}",
                     fmt(r["distance"], ".3f") if math.isfinite(r["distance"]) else "degenerate",
                     f"{r['seconds']:.0f}"])
    return headers, rows


def _rounded(value):
    if isinstance(value, dict):
        return {k: _rounded(v) for k, v in value.items()}
    if isinstance(value, float):
        return sig(value) if math.isfinite(value) else None
    return value


def measured_rows(result: dict) -> list[dict]:
    """The rows as JSON: the options and figures (no media); an infinite distance (degenerate) is null."""
    out = []
    for r in result["rows"]:
        row = {"temperature": r["options"].temperature, "top_k": r["options"].top_k, "top_p": r["options"].top_p}
        row |= _rounded({k: v for k, v in r.items() if k not in ("media", "options", "chosen")})
        if r.get("chosen"):
            row["chosen"] = True
        out.append(row)
    return out


def card_sampling(result: dict, command: str) -> dict:
    """The card's ``sampling`` field: the chosen options, how they were chosen and every measured row."""
    chosen = next(r for r in result["rows"] if r.get("chosen"))["options"]
    rule = ("the smallest mean |ln(sample / data)| of roughness and speckle, from scratch and completed"
            if result["kind"] == "image" else
            "the smallest |ln(median flatness / data's)| among settings with no clip stuck or off the data's loudness")
    return {"temperature": chosen.temperature, "top_k": chosen.top_k, "top_p": chosen.top_p,
            "chosen_by": f"{command} ({datetime.now(timezone.utc):%Y-%m-%d})", "rule": rule,
            "samples": result["samples"], "data": {"items": result["data_items"], **_rounded(result["data_figures"])},
            "measured": measured_rows(result)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", type=Path, action="append", required=True, help="checkpoint (repeatable)")
    ap.add_argument("--temperature", default="0.9,0.95,1.0", help="temperatures, comma-separated")
    ap.add_argument("--top-p", default="1", help="top-p values, comma-separated (1 = off)")
    ap.add_argument("--top-k", type=int, help="top-k of every setting (default off)")
    ap.add_argument("--samples", type=int, default=4, metavar="N", help="samples per setting and kind (default 4)")
    ap.add_argument("--data-items", type=int, default=64, metavar="M",
                    help="validation items the data's figures come from (default 64)")
    ap.add_argument("--length", type=int, default=24000, help="audio samples per clip (default 24,000: 2 s)")
    ap.add_argument("--loudness-factor", type=float, default=3.0,
                    help="audio: a setting with a clip this many times quieter than the quietest data window is "
                         "degenerate (default 3)")
    ap.add_argument("--batch", type=int, default=8, help="samples decoded together (default 8)")
    ap.add_argument("--data", help="dataset path (default: the one in the card)")
    ap.add_argument("--figure", type=Path, help="the figure (default docs/sampling_<model>.png; one checkpoint)")
    ap.add_argument("--no-figure", action="store_true", help="write no figure")
    ap.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    ap.add_argument("--update-card", action="store_true", help="write the chosen setting into each card")
    a = ap.parse_args()
    try:
        settings = settings_grid(number_list(a.temperature, "temperature"), number_list(a.top_p, "top-p"), a.top_k)
    except ValueError as e:
        ap.error(str(e))
    if a.samples < 1 or a.data_items < 1 or a.batch < 1 or a.length < 1024 or not a.loudness_factor > 1:
        ap.error("--samples, --data-items and --batch must be >= 1, --length >= 1024 (one flatness frame), "
                 "--loudness-factor > 1")
    if a.figure is not None and len(a.checkpoint) > 1:
        ap.error("--figure names one file: give one --checkpoint with it")
    if a.threads is not None:
        if a.threads < 1:
            ap.error("--threads must be >= 1")
        torch.set_num_threads(a.threads)
    root = Path(__file__).resolve().parent.parent
    results = []
    for path in a.checkpoint:
        path = checkpoint_paths(path)[0].with_suffix("")
        print(f"{path}: {len(settings)} settings x {a.samples} samples on {cpu_name()}, "
              f"{torch.get_num_threads()} threads")
        r = sweep(path, settings, a.samples, a.data_items, a.length, a.batch, a.loudness_factor, a.data)
        headers, rows = table_rows(r)
        what = "images from scratch and completed" if r["kind"] == "image" else f"clips of {r['length']:,} samples"
        print_table(f"{path}: {a.samples} {what} per setting, against {r['data_items']} validation items "
                    "(* = chosen)", headers, rows)
        out = {"checkpoint": str(path), "kind": r["kind"], "samples": a.samples, "data_items": r["data_items"],
               "data": _rounded(r["data_figures"]), "rows": measured_rows(r), "cpu": cpu_name(),
               "threads": torch.get_num_threads()}
        if not a.no_figure:
            figure = a.figure or root / "docs" / f"sampling_{path.name}.png"
            if r["kind"] == "image":
                picture = image_figure(r["data_images"], r["prompts"], r["data_figures"], r["rows"])
            else:
                picture = audio_figure(r["data_figures"], r["rows"])
            figure.parent.mkdir(parents=True, exist_ok=True)
            # 128 colours: a third of the bytes, the same figure to the eye (docs figures live in git's history)
            Image.fromarray(picture).quantize(colors=128, method=Image.Quantize.MEDIANCUT).save(figure, optimize=True)
            out["figure"] = str(figure)
            print(f"wrote {figure}")
        chosen = [r2 for r2 in r["rows"] if r2.get("chosen")]
        if not chosen:
            print(f"{path}: every setting is degenerate; nothing chosen")
        elif a.update_card:
            command = "python -m bench.sampling_sweep " + " ".join(
                [f"--checkpoint {path.parent.name}/{path.name}", f"--temperature {a.temperature}",
                 f"--top-p {a.top_p}", *([f"--top-k {a.top_k}"] if a.top_k else []), f"--samples {a.samples}",
                 *([f"--length {a.length}"] if r["kind"] == "audio" else []), "--update-card"])
            update_card(path, {"sampling": card_sampling(r, command)})
            out["card"] = str(checkpoint_paths(path)[1])
            print(f"wrote the chosen setting ({describe(chosen[0]['options'])}) into {out['card']}")
        results.append(out)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
