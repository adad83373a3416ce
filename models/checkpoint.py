"""Shipped-model I/O: ``NAME.safetensors`` (weights, never pickle) + ``NAME.json`` (the card).

The card holds the model config, the codec, the training data, steps, tokens seen,
compute (PF-days), held-out bits/dim and the date, plus the weights' size, SHA-256 and dtype
(float32, or bfloat16 in half the bytes: the model computes in float32 from either), so a corrupt
or truncated file, or weights of another config, fail with a clear error.
The card's ``architecture`` names the model family (models/architectures.py): absent for the
Sparse Transformer, "lstm" for the sparse LSTM baseline (models/lstm.py).
"""

from __future__ import annotations

import datetime
import hashlib
import json
import math
import os
import re
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from media.image import IMAGE_TOKENS

from .architectures import ARCHITECTURES, TRANSFORMER, Config, Model, architecture_name, build_model, config_from_card
from .lstm import SparseLSTM
from .model import ModelConfig, SparseTransformer

FORMAT = "sparse-transformer-studio/1"
# How a weights file may store the floating-point tensors; a model computes in float32 either way
WEIGHTS_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


class CheckpointError(ValueError):
    """A checkpoint is missing, corrupt, truncated, or does not match its card."""


def checkpoint_paths(path: str | os.PathLike) -> tuple[Path, Path]:
    """"checkpoints/NAME" (with or without .safetensors/.json) -> (weights path, card path)."""
    p = Path(path)
    if p.suffix in (".safetensors", ".json"):
        p = p.with_suffix("")
    return p.with_name(p.name + ".safetensors"), p.with_name(p.name + ".json")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@contextmanager
def atomic_path(dst: str | os.PathLike) -> Iterator[Path]:
    """A temporary path beside ``dst`` to write the new file to; when the block ends without an error it is
    fsynced and renamed over ``dst``, so a crash never leaves half a file under ``dst``. The temporary file
    is removed whatever happens.

        with atomic_path(path) as tmp:
            tmp.write_text(text)
    """
    dst = Path(dst)
    tmp = dst.with_name(f"{dst.name}.{os.getpid()}.tmp")  # the pattern remove_stale_temporaries looks for
    try:
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, dst)
    finally:
        tmp.unlink(missing_ok=True)


def pid_running(pid: int) -> bool:
    """Whether a process with this id runs on this machine (one of another user counts)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except OSError:  # e.g. an id out of range
        return False
    return True


def remove_stale_temporaries(folder: str | os.PathLike, names: Iterable[str]) -> list[Path]:
    """Remove the temporary files that :func:`atomic_path` left in ``folder`` for files called ``names`` when its
    process was killed in the middle of a write (``NAME.<pid>.tmp``, up to the full size of the file): only files of
    exactly that pattern, and only those of processes that no longer run (never this process's own). Returns them."""
    folder = Path(folder)
    pattern = re.compile("(?:" + "|".join(re.escape(n) for n in names) + r")\.([0-9]+)\.tmp")
    removed = []
    if not folder.is_dir():
        return removed
    for p in folder.iterdir():
        m = pattern.fullmatch(p.name)
        if m and int(m.group(1)) != os.getpid() and not pid_running(int(m.group(1))) and p.is_file() \
                and not p.is_symlink():
            p.unlink(missing_ok=True)
            removed.append(p)
    return removed


def save_model(model: Model, path: str | os.PathLike, card: dict | None = None,
               weights_dtype: str | None = None) -> Path:
    """Write ``path``.safetensors and ``path``.json; returns the card's path.

    card: what to record besides the config (codec, data, steps, tokens_seen,
    compute_pf_days, held_out_bits_per_dim, ...); must be JSON-serialisable.
    weights_dtype: "float32", or "bfloat16" to store the floating-point tensors in half the bytes
    (rounded to nearest even; see :func:`round_weights`); the card records it as weights.dtype. None: the
    dtype the card's ``weights`` give (so a loaded model saves as it was stored), else float32.
    Each file is written to a temporary name and renamed, so a crash never leaves
    a half-written checkpoint under the final name.
    """
    if not isinstance(model, (SparseTransformer, SparseLSTM)):
        raise ValueError(f"model must be a SparseTransformer or a SparseLSTM, got {type(model).__name__}")
    if card is not None and not isinstance(card, dict):
        raise ValueError(f"card must be a dict, got {type(card).__name__}")
    card = dict(card or {})
    if weights_dtype is None:
        earlier = card.get("weights")
        weights_dtype = earlier.get("dtype", "float32") if isinstance(earlier, dict) else "float32"
    stored = _weights_dtype(weights_dtype)
    try:
        json.dumps(card)
    except TypeError as e:
        raise ValueError(f"card must be JSON-serialisable: {e}") from None
    weights, card_path = checkpoint_paths(path)
    weights.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(weights.parent, (weights.name, card_path.name))  # of an earlier save that was killed
    config = model.cfg.to_dict()
    architecture = architecture_name(model.cfg)
    if architecture != TRANSFORMER:
        card["architecture"] = architecture
    else:
        card.pop("architecture", None)
    tensors = {k: v.detach().to("cpu", stored if v.is_floating_point() else v.dtype, copy=True).contiguous()
               for k, v in model.state_dict().items()}
    with atomic_path(weights) as tmp:
        save_file(tensors, str(tmp), metadata={"format": FORMAT, "config": json.dumps(config),
                                                 "architecture": architecture})
    os.chmod(weights, 0o644)
    card.update(
        format=FORMAT,
        config=config,
        parameters=model.num_parameters(),
        weights={"file": weights.name, "bytes": weights.stat().st_size, "sha256": _sha256(weights),
                 "dtype": weights_dtype},
    )
    card.setdefault("date", datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
    check_card(card, card_path)  # never write a card that load_card would refuse
    _write_card(card, card_path)
    return card_path


def _weights_dtype(name: object) -> torch.dtype:
    if name not in WEIGHTS_DTYPES:
        raise ValueError(f"weights_dtype must be one of {sorted(WEIGHTS_DTYPES)}, got {name!r}")
    return WEIGHTS_DTYPES[name]


@torch.no_grad()
def round_weights(model: torch.nn.Module, weights_dtype: str) -> None:
    """Round the model's floating-point parameters and buffers, in place, to what a weights file of
    ``weights_dtype`` holds, so that held-out bits measured afterwards are those of the stored weights."""
    stored = _weights_dtype(weights_dtype)
    for t in (*model.parameters(), *model.buffers()):
        if t.is_floating_point():
            t.copy_(t.to(stored))


def _write_card(card: dict, card_path: Path) -> None:
    with atomic_path(card_path) as tmp:
        tmp.write_text(json.dumps(card, indent=2) + "\n")


def update_card(path: str | os.PathLike, fields: dict) -> dict:
    """Add or replace top-level ``fields`` of checkpoint ``path``'s card (e.g. an evaluation), atomically.
    The weights and what describes them (format, config, parameters, weights, architecture) cannot be changed."""
    if not isinstance(fields, dict):
        raise ValueError(f"fields must be a dict, got {type(fields).__name__}")
    fixed = {"format", "config", "parameters", "weights", "architecture"} & fields.keys()
    if fixed:
        raise ValueError(f"card fields {sorted(fixed)} describe the weights and cannot be updated")
    try:
        json.dumps(fields)
    except TypeError as e:
        raise ValueError(f"fields must be JSON-serialisable: {e}") from None
    card = check_card(load_card(path) | fields, checkpoint_paths(path)[1])
    _write_card(card, checkpoint_paths(path)[1])
    return card


def load_card(path: str | os.PathLike) -> dict:
    """Read and check the card of checkpoint ``path`` (no weights are read); CheckpointError if it cannot be used."""
    weights, card_path = checkpoint_paths(path)
    if not card_path.is_file():
        folder = card_path.parent
        found = sorted(p.stem for p in folder.glob("*.json")) if folder.is_dir() else []
        hint = f"; checkpoints in {folder}: {found}" if found else f"; no checkpoints in {folder}"
        raise CheckpointError(f"no model card {card_path}{hint}")
    try:
        card = json.loads(card_path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"model card {card_path} is not valid JSON ({e}): the file is corrupt") from None
    check_card(card, card_path)
    return card


_INT, _NUMBER, _TEXT = (int,), (int, float), (str,)
_NONE = (type(None),)
# The card's fields that the code reads, and the JSON types each may hold (others are kept, unread).
CARD_FIELDS: dict[str, tuple[type, ...]] = {
    "format": _TEXT, "config": (dict,), "weights": (dict,), "codec": (dict, *_NONE), "parameters": _INT + _NONE,
    "steps": _INT + _NONE, "tokens_seen": _INT + _NONE, "held_out_items": _INT + _NONE,
    "compute_pf_days": _NUMBER + _NONE, "held_out_bits_per_dim": _NUMBER + _NONE, "ema_decay": _NUMBER + _NONE,
    "date": _TEXT + _NONE, "data": (dict, str, *_NONE), "training": (dict, *_NONE), "evaluation": (dict, *_NONE),
    "training_history": (list, *_NONE), "pruned": (dict, *_NONE), "sampling": (dict, *_NONE),
    "architecture": _TEXT,
}
REQUIRED_CARD_FIELDS = ("format", "config", "weights")
WEIGHTS_FIELDS: dict[str, tuple[type, ...]] = {"file": _TEXT, "bytes": _INT, "sha256": _TEXT, "dtype": _TEXT}
WEIGHTS_REQUIRED = ("file", "bytes", "sha256")  # cards written before bf16 storage have no dtype: float32
CODEC_FIELDS: dict[str, tuple[type, ...]] = {"kind": _TEXT + _NONE, "sample_rate": _INT + _NONE}
# the sampling defaults (bench/sampling_sweep.py); their ranges are SamplingOptions' (sampling.card_defaults)
SAMPLING_FIELDS: dict[str, tuple[type, ...]] = {"temperature": _NUMBER, "top_k": _INT + _NONE,
                                                "top_p": _NUMBER + _NONE}
_TYPE_NAMES = {int: "a whole number", float: "a number", str: "a string", dict: "an object", list: "a list",
               type(None): "null"}


def _check_fields(where: str, fields: dict, schema: dict[str, tuple[type, ...]], required: tuple[str, ...],
                  card_path: object) -> None:
    for key in required:
        if key not in fields:
            raise CheckpointError(f"model card {card_path}: '{where}{key}' is missing")
    for key, types in schema.items():
        if key not in fields:
            continue
        value = fields[key]
        if isinstance(value, bool) or not isinstance(value, types) or (isinstance(value, float) and not
                                                                        math.isfinite(value)):
            allowed = " or ".join(_TYPE_NAMES[t] for t in types if t is not int or float not in types)
            raise CheckpointError(f"model card {card_path}: '{where}{key}' must be {allowed}, got "
                                  f"{json.dumps(value)[:60]}")


def check_card(card: object, card_path: object = "(card)") -> dict:
    """The one schema of a model card: CheckpointError naming the field when a field the code reads is missing or
    of the wrong type (format, config, weights: file / bytes / sha256, codec, counts, figures, date, data, ...).
    Fields the code does not read are kept as they are. Returns the card."""
    if not isinstance(card, dict):
        raise CheckpointError(f"{card_path} is not a model card of this project (a JSON object with format "
                              f"{FORMAT!r} expected)")
    if card.get("format") != FORMAT:
        raise CheckpointError(f"{card_path} is not a model card of this project (format {FORMAT!r} expected, "
                              f"got {json.dumps(card.get('format'))[:60]})")
    _check_fields("", card, CARD_FIELDS, REQUIRED_CARD_FIELDS, card_path)
    _check_fields("weights.", card["weights"], WEIGHTS_FIELDS, WEIGHTS_REQUIRED, card_path)
    w = card["weights"]
    if w.get("dtype", "float32") not in WEIGHTS_DTYPES:
        raise CheckpointError(f"model card {card_path}: 'weights.dtype' must be one of {sorted(WEIGHTS_DTYPES)}, "
                              f"got {w['dtype']!r}")
    if w["bytes"] < 0 or len(w["sha256"]) != 64 or any(c not in "0123456789abcdef" for c in w["sha256"]):
        raise CheckpointError(f"model card {card_path}: 'weights' must give the file's size in bytes (>= 0) and "
                              "its SHA-256 as 64 lower-case hex digits")
    if card.get("codec") is not None:
        _check_fields("codec.", card["codec"], CODEC_FIELDS, (), card_path)
    if card.get("sampling") is not None:
        _check_fields("sampling.", card["sampling"], SAMPLING_FIELDS, (), card_path)
    for key in ("parameters", "steps", "tokens_seen", "held_out_items"):
        if isinstance(card.get(key), int) and card[key] < 0:
            raise CheckpointError(f"model card {card_path}: {key!r} must be >= 0, got {card[key]}")
    if card.get("architecture", TRANSFORMER) not in ARCHITECTURES:
        raise CheckpointError(f"model card {card_path}: unknown 'architecture' {card['architecture']!r}; known: "
                              f"{sorted(ARCHITECTURES)}")
    try:
        config_from_card(card)
    except (TypeError, ValueError, KeyError, AttributeError) as e:
        raise CheckpointError(f"model card {card_path}: 'config' holds an invalid config: {e}") from None
    return card


def load_model(path: str | os.PathLike, device: torch.device | str = "cpu") -> Model:
    """Load checkpoint ``path`` ("checkpoints/NAME"): the model in eval mode, its card in ``.card``."""
    card = load_card(path)
    weights, card_path = checkpoint_paths(path)
    if not weights.is_file():
        raise CheckpointError(f"weights {weights} are missing (the card {card_path} exists)")
    expected = card["weights"]  # checked by load_card: bytes and sha256 are there
    size = weights.stat().st_size
    if size != expected["bytes"]:
        raise CheckpointError(f"weights {weights} are {size} bytes but the card says {expected['bytes']}: "
                              "the file is truncated or was replaced")
    if _sha256(weights) != expected["sha256"]:
        raise CheckpointError(f"weights {weights} do not match the SHA-256 in {card_path}: the file is corrupt")
    try:
        with safe_open(str(weights), "pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"weights {weights} cannot be read: {e}") from None
    stored = WEIGHTS_DTYPES[expected.get("dtype", "float32")]
    other = sorted(k for k, v in tensors.items() if v.is_floating_point() and v.dtype != stored)
    if other:
        raise CheckpointError(f"weights {weights} hold {tensors[other[0]].dtype} tensors ({other[:3]}) where the card "
                              f"{card_path} says {stored}")
    cfg = config_from_card(card)
    try:
        saved = config_from_card({"architecture": meta.get("architecture", TRANSFORMER),
                                  "config": json.loads(meta["config"])})
    except (KeyError, TypeError, ValueError):
        saved = None
    if saved != cfg:
        raise CheckpointError(f"weights {weights} were saved for another config than the card {card_path}")
    model = build_model(cfg)
    _load_strict(model, tensors, weights)
    model.card = card
    return model.to(device).eval()


def _load_strict(model: Model, tensors: dict[str, torch.Tensor], source: Path) -> None:
    own = model.state_dict()
    missing = sorted(set(own) - set(tensors))
    unexpected = sorted(set(tensors) - set(own))
    shapes = [f"{k}: {tuple(tensors[k].shape)} vs {tuple(v.shape)}" for k, v in own.items()
              if k in tensors and tensors[k].shape != v.shape]
    if missing or unexpected or shapes:
        raise CheckpointError(f"weights {source} do not fit the config: missing {missing[:5]}, unexpected "
                              f"{unexpected[:5]}, shape mismatches {shapes[:5]}")
    # block-sparse layers keep their layouts as buffers: the blocks the weights hold must be the ones the config
    # (re)builds from its recipe and seed
    moved = [k for k, v in own.items() if k.rsplit(".", 1)[-1] in ("layout", "layouts")
             and not torch.equal(tensors[k].to(v.dtype), v)]
    if moved:
        raise CheckpointError(f"weights {source} hold other block layouts than the config builds ({moved[:3]}): "
                              "its layout recipe or seed was changed (or the weights edited, or the layouts come "
                              "from another networkx version)")
    model.load_state_dict(tensors)


def card_kind(card: dict, cfg: Config) -> str:
    """"image" or "audio": the card's codec kind when it names one, else from the config's shape."""
    kind = (card.get("codec") or {}).get("kind") if isinstance(card.get("codec"), dict) else None
    if kind in ("image", "audio"):
        return kind
    if not isinstance(cfg, ModelConfig):
        return "image" if cfg.seq_len == IMAGE_TOKENS else "audio"
    return "image" if cfg.seq_len == IMAGE_TOKENS and cfg.pos_factors == (64, 64, 3) else "audio"


def model_kind(model: Model) -> str:
    """"image" or "audio", from the card when the model has one, else from its shape."""
    return card_kind(getattr(model, "card", None) or {}, model.cfg)
