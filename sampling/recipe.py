"""The settings of one sampling result as JSON (a "recipe"): what the web app saves next to each result and
``sample.py --from-json`` reads back, so that a result made in the page can be made again from the command line.

A recipe holds the kind ("image" or "audio"), sample.py's options under their sample.py names
(``prompt_rows``, ``num_samples``, ``temperature``, ``top_k``, ``top_p``, ``seed``; audio: ``prompt_seconds``,
``samples``; None = off / not given), the prompt file (a name relative to the recipe, or None), the model
card's name and the SHA-256 of its weights, and the seeds of the samples. Samples depend on their seed,
prompt, options and weights only (not on the batch), so the same recipe gives the same samples.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

FORMAT = "sparse-transformer-recipe/1"
# sample.py's options a recipe may set, and the types each takes (None = off / the default)
OPTIONS = {
    "image": {"prompt_rows": int, "num_samples": int, "temperature": float, "top_k": int, "top_p": float, "seed": int},
    "audio": {"prompt_seconds": float, "samples": int, "num_samples": int, "temperature": float, "top_k": int,
              "top_p": float, "seed": int},
}


def make_recipe(kind: str, options: dict, checkpoint_name: str, weights_sha256: str | None,
                prompt: str | None, seeds: list[int], outputs: list[str] | None = None) -> dict:
    """The recipe of one result (``options`` under sample.py's names; ``prompt`` a file name beside the recipe)."""
    unknown = set(options) - set(OPTIONS[kind])
    if unknown:
        raise ValueError(f"not sample.py {kind} options: {sorted(unknown)}")
    settings = {name: options.get(name) for name in OPTIONS[kind]}
    command = ["python", "sample.py", "--from-json", "settings.json"]
    return {"format": FORMAT, "kind": kind, "settings": settings, "prompt": prompt,
            "checkpoint": {"name": checkpoint_name, "weights_sha256": weights_sha256},
            "seeds": list(seeds), "outputs": outputs or [], "command": " ".join(command)}


def write_recipe(path: Path, recipe: dict) -> Path:
    path.write_text(json.dumps(recipe, indent=2) + "\n")
    return path


def _check_value(name: str, value: object, kind_type: type) -> object:
    if value is None:
        return None
    if kind_type is int:
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{name} must be a whole number or null, got {value!r}")
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a number or null, got {value!r}")
    return float(value)


def read_recipe(path: str | Path) -> dict:
    """A recipe checked for shape: kind, settings (only known options, of the right types), prompt (a path
    resolved against the recipe's folder, or None), checkpoint name and weights hash. ValueError otherwise.
    Also reads a sample.py metadata.json (its "arguments" are the settings)."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read the settings JSON {path}: {e}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} is not a settings JSON (an object is expected)")
    if "arguments" in data and "format" not in data:  # sample.py's own metadata.json
        args = data["arguments"] if isinstance(data["arguments"], dict) else {}
        kind = args.get("kind")
        check = data.get("checkpoint") if isinstance(data.get("checkpoint"), dict) else {}
        data = {"format": FORMAT, "kind": kind, "prompt": args.get("prompt"),
                "settings": {k: v for k, v in args.items() if k in OPTIONS.get(kind, {})},
                "checkpoint": {"name": Path(str(check.get("path") or "")).name or None,
                               "weights_sha256": check.get("weights_sha256")}}
    if data.get("format") != FORMAT:
        raise ValueError(f"{path} is not a settings JSON of this project (format {data.get('format')!r}, "
                         f"expected {FORMAT!r})")
    kind = data.get("kind")
    if kind not in OPTIONS:
        raise ValueError(f"{path}: kind must be 'image' or 'audio', got {kind!r}")
    settings = data.get("settings")
    if not isinstance(settings, dict):
        raise ValueError(f"{path}: settings must be an object")
    unknown = set(settings) - set(OPTIONS[kind])
    if unknown:
        raise ValueError(f"{path}: unknown {kind} settings {sorted(unknown)}; known: {sorted(OPTIONS[kind])}")
    settings = {k: _check_value(f"{path}: {k}", v, OPTIONS[kind][k]) for k, v in settings.items()}
    prompt = data.get("prompt")
    if prompt is not None and not isinstance(prompt, str):
        raise ValueError(f"{path}: prompt must be a file name or null, got {prompt!r}")
    checkpoint = data.get("checkpoint") if isinstance(data.get("checkpoint"), dict) else {}
    name, sha = checkpoint.get("name"), checkpoint.get("weights_sha256")
    if name is not None and (not isinstance(name, str) or not name or "/" in name or "\\" in name
                             or name.startswith(".")):
        raise ValueError(f"{path}: checkpoint name must be a plain name, got {name!r}")
    return {"kind": kind, "settings": settings,
            "prompt": None if prompt is None else path.parent / prompt,
            "checkpoint_name": name, "weights_sha256": sha if isinstance(sha, str) else None}
