"""What the Models tab shows of a checkpoint: its card as Markdown and a picture of its attention layout
(of its first weight layout, for the sparse LSTM baseline).

Cards come from train.py --export or save_model; any field may be missing, so each line is shown
only when its fields are there.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from kernels import make_layout
from kernels.render import COLOURS, render_layout
from models import LSTMConfig, ModelConfig

from .registry import Entry

DRAWN_STRIDE, DRAWN_LEN, DRAWN_BLOCK = 16, 256, 16  # layouts are drawn small: l = 16, N = 256
COLOUR_NAMES = ("blue", "orange", "green", "purple")  # kernels.render.COLOURS, in order


def _count(n: float) -> str:
    """1234567 -> "1.23M"."""
    for unit, size in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.3g}{unit}"
    return f"{n:g}"


def _number(card: dict, key: str) -> float | None:
    value = card.get(key)
    return value if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _code(text: object) -> str:
    return f"`{str(text).replace('`', '').replace('|', '/')}`"


def _architecture(cfg: ModelConfig | LSTMConfig, kind: str) -> str:
    unit = "tokens" if kind == "image" else "samples"
    if isinstance(cfg, LSTMConfig):
        weights = (f"small-world block-sparse weights ({cfg.layout.upper()}, density {cfg.density:g}, "
                   f"block {cfg.block})" if cfg.sparse else "dense weights")
        return (f"{'multiplicative ' if cfg.multiplicative else ''}LSTM baseline, {cfg.n_layers} layers, "
                f"{cfg.hidden} units, {weights}, trained on {cfg.seq_len:,} {unit}")
    pattern = {"strided": f"strided attention (local and strided layers, l = {cfg.stride})",
               "fixed": f"fixed attention (l = {cfg.stride}, c = {cfg.summary})",
               "all": "dense attention"}[cfg.pattern]
    if cfg.layer_patterns:
        pattern = "layers " + ", ".join(cfg.layer_patterns)
    return (f"{cfg.n_layers} layers, d = {cfg.d_model}, {cfg.n_heads} heads, {pattern}, block {cfg.block}, "
            f"context {cfg.seq_len:,} {unit}")


def _data(card: dict) -> str | None:
    data = card.get("data")
    if not isinstance(data, dict):
        return _code(data) if data else None
    parts = [p for p in (data.get("reader"), _code(data["path"]) if data.get("path") else None) if p]
    counts = [f"{data[k]:,} {label}" for k, label in (("train_items", "training"), ("val_items", "held-out"))
              if isinstance(data.get(k), int)]
    if counts:
        parts.append(f"({' / '.join(counts)} items)")
    return " ".join(parts) or None


def _evaluation(card: dict) -> str | None:
    """bench/quality.py's "evaluation": the model's bits against lossless codecs on the same data."""
    ev = card.get("evaluation")
    if not isinstance(ev, dict) or _number(ev, "model") is None:
        return None
    unit = ev.get("unit") or "bits/dim"
    items = f" on {ev['items']:,} items" if isinstance(ev.get("items"), int) else ""
    codecs = ev.get("codecs") if isinstance(ev.get("codecs"), dict) else {}
    others = ", ".join(f"{name} {bits:.3f}" for name, bits in codecs.items() if _number(codecs, name) is not None)
    return f"{ev['model']:.3f} {unit}{items}" + (f" (lossless codecs: {others})" if others else "")


def _sampling(entry: Entry) -> str | None:
    """The card's sampling defaults (bench/sampling_sweep.py) and how they were chosen."""
    if not isinstance(entry.card.get("sampling"), dict):
        return None
    options = entry.defaults
    parts = [f"temperature {options.temperature:g}"]
    parts += [f"top-k {options.top_k}"] if options.top_k is not None else []
    parts += [f"top-p {options.top_p:g}"] if options.top_p is not None else []
    how = entry.card["sampling"].get("chosen_by")
    return ", ".join(parts) + (f" (chosen by {_code(how)})" if isinstance(how, str) else "")


def card_markdown(entry: Entry) -> str:
    """The card as a heading, a summary line and a list of what is known."""
    card, cfg = entry.card, entry.config
    params, bits = _number(card, "parameters"), _number(card, "held_out_bits_per_dim")
    summary = [f"**{entry.kind}** model"]
    if params is not None:
        summary.append(f"{_count(params)} parameters")
    if bits is not None:
        summary.append(f"**{bits:.3f} bits/dim** held out")
    rows = [("Data", _data(card)), ("Architecture", _architecture(cfg, entry.kind))]
    steps, tokens, pf = _number(card, "steps"), _number(card, "tokens_seen"), _number(card, "compute_pf_days")
    training = card.get("training") if isinstance(card.get("training"), dict) else {}
    if steps is not None:
        rows.append(("Training", ", ".join([f"{int(steps):,} steps"] + [
            f"{label} {training[k]}" for k, label in (("config", "config"), ("batch_size", "batch"),
                                                      ("precision", "precision")) if training.get(k) is not None])))
    rows += [("Tokens seen", _count(tokens) if tokens is not None else None),
             ("Compute", f"{pf:.3g} PF-days" if pf is not None else None)]
    if bits is not None:
        items = _number(card, "held_out_items")
        rows.append(("Held-out", f"{bits:.3f} bits/dim" + (f" on {int(items):,} items" if items else "")))
    rows.append(("Evaluation", _evaluation(card)))
    rows.append(("Sampling defaults", _sampling(entry)))
    weights = card.get("weights") if isinstance(card.get("weights"), dict) else {}
    if weights:
        size = f", {weights['bytes'] / 1e6:.1f} MB" if isinstance(weights.get("bytes"), int) else ""
        size += " in bfloat16 (computed in float32)" if weights.get("dtype") == "bfloat16" else ""
        sha = f", SHA-256 `{str(weights['sha256'])[:12]}…`" if weights.get("sha256") else ""
        rows.append(("Weights", f"{_code(weights.get('file', entry.name))}{size}{sha}"))
    rows.append(("Date", str(card["date"])[:10] if card.get("date") else None))
    lines = "\n".join(f"- **{name}**: {value}" for name, value in rows if value)
    return f"### {entry.name}\n{' · '.join(summary)}\n\n{lines}\n"


def weight_layout_picture(cfg: LSTMConfig) -> tuple[np.ndarray, str]:
    """The LSTM's first input-weight layout (one pixel per block, 4 pixels when small) and a caption."""
    if not cfg.sparse:
        return np.full((64, 64, 3), 40, np.uint8), "Dense weights: every block is there."
    layout = cfg.square_layout(0).numpy()
    scale = max(1, 256 // layout.shape[0])
    picture = np.where(layout, 30, 235).astype(np.uint8).repeat(scale, 0).repeat(scale, 1)
    caption = (f"Which of the {layout.shape[0]} blocks of {cfg.block} units feed which (dark: a weight block), "
               f"{100 * layout.mean():.1f}% of them; each matrix has its own seed.")
    return np.repeat(picture[..., None], 3, -1), caption


def layout_kinds(cfg: ModelConfig) -> list[str]:
    """The distinct layout kinds of the model's layers, in layer order (at most one colour each)."""
    return list(dict.fromkeys(cfg.layer_kind(i) for i in range(cfg.n_layers)))[: len(COLOURS)]


def layout_picture(cfg: ModelConfig) -> tuple[np.ndarray, str]:
    """The model's layer patterns drawn small (l = 16, N = 256) as in the paper's Figure 3, and a caption."""
    summary = max(1, min(DRAWN_STRIDE, round(DRAWN_STRIDE * cfg.summary / cfg.stride)))
    args = {"local": {"window": DRAWN_STRIDE}, "strided": {"stride": DRAWN_STRIDE},
            "fixed": {"stride": DRAWN_STRIDE, "summary": summary}, "all": {}}
    kinds = layout_kinds(cfg)
    layouts = [make_layout(k, DRAWN_LEN, DRAWN_BLOCK, **args[k]) for k in kinds]
    with tempfile.TemporaryDirectory() as tmp:
        path = render_layout(layouts, Path(tmp) / "layout.png", width=DRAWN_STRIDE)
        with Image.open(path) as im:
            picture = np.asarray(im.convert("RGB")).copy()
    legend = ", ".join(f"{c}: {k} layers" for c, k in zip(COLOUR_NAMES, kinds, strict=False))
    caption = (f"Drawn small (l = {DRAWN_STRIDE}, N = {DRAWN_LEN}); this model has l = {cfg.stride}, "
               f"N = {cfg.seq_len:,}. Top: the positions one query (red) reads, one grid row per l positions. "
               f"Bottom: which keys (columns) each query (rows) reads. {legend}.")
    return picture, caption
