"""A run's settings: defaults, the flags given, and on --resume the run's own (run.json); the model config."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from media.audio import AUDIO_TOKENS
from media.image import IMAGE_TOKENS
from models import CheckpointError, LSTMConfig, ModelConfig, config_for, load_card
from models.checkpoint import atomic_path, card_kind

from .errors import TrainingError

# Settings a resumed run takes from its checkpoint; changing them would not continue the same run.
RUN_SETTINGS = dict(config=None, layers=None, width=None, heads=None, ff_mult=None, dropout=None, pattern=None,
                    layer_patterns=None, stride=None, block=None, seq_len=None, ff_layout=None, ff_density=None,
                    ff_block=None, ff_seed=None, ff_layers=None, lag_inputs=None, batch_size=8, micro_batch=1, lr=5e-4,
                    warmup=100, min_lr_ratio=0.1, weight_decay=0.01, clip=1.0, precision="auto", recompute=True,
                    ema=0.0, seed=0, fsdp=False, steps=1000, init=None, val_fraction=None, window=None,
                    arch="transformer", hidden=None, density=None, lstm_layout=None, layout_seed=None,
                    multiplicative=None, tbptt=None)
# Settings of this invocation only.
CONTROL = dict(data=None, out=None, resume=False, stop_after=None, stop_minutes=None, export=None,
               export_dtype="float32", checkpoints="checkpoints", eval_every=100, eval_items=64, save_every=100,
               save_minutes=10.0, device="auto", threads=None, max_nonfinite=5, peak_tflops=None, quiet=False)
# Model flags -> the ModelConfig fields they set.
MODEL_FLAGS = dict(layers="n_layers", width="d_model", heads="n_heads", ff_mult="ff_mult", dropout="dropout",
                   pattern="pattern", layer_patterns="layer_patterns", stride="stride", block="block",
                   seq_len="seq_len", ff_layout="ff_layout", ff_density="ff_density", ff_block="ff_block",
                   ff_seed="ff_seed", ff_layers="ff_layers", lag_inputs="lag_inputs")
# What a token is worth as a signal value for the lag inputs, per data kind (ModelConfig.token_values).
KIND_TOKEN_VALUES = {"image": "linear", "audio": "mu_law"}
# The model flags --init takes: --layers and --lag-inputs grow its model, --dropout regularizes its training.
INIT_FLAGS = ("layers", "lag_inputs", "dropout")
ARCHS = ("transformer", "lstm")
# LSTM flags -> the LSTMConfig fields they set (--layers, --block and --seq-len too); --tbptt is the run's.
LSTM_FLAGS = dict(layers="n_layers", block="block", seq_len="seq_len", hidden="hidden", density="density",
                  lstm_layout="layout", layout_seed="layout_seed", multiplicative="multiplicative")
TBPTT = 1024  # the LSTM's default chunk length for truncated backpropagation through time


def resolve_settings(given: dict) -> dict:
    """Defaults < saved run settings (on --resume) < flags given now; model flags may not change on resume.

    given: the flags given (train.py's parsed arguments, "kind" among them); absent ones take defaults.
    """
    given = dict(given)
    if given.get("resume") and given.get("precision") == "auto":
        del given["precision"]  # a resumed run keeps the precision it chose
    settings = {"kind": given["kind"], **RUN_SETTINGS, **CONTROL}
    settings.update(given)
    for key in ("data", "out"):
        if not settings[key]:
            raise TrainingError(f"--{key} is required")
    if settings["resume"]:
        _take_saved_settings(settings, given)
    elif (Path(settings["out"]) / "state.pt").exists():
        raise TrainingError(f"{settings['out']} already holds a run: pass --resume to continue it, or "
                            "choose another --out")
    if settings["init"] is not None:
        given_model = [f"--{k.replace('_', '-')}" for k in ("config", *MODEL_FLAGS)
                       if k not in INIT_FLAGS and given.get(k) is not None]
        if given_model and not settings["resume"]:
            raise TrainingError(f"--init takes the model from {settings['init']} (--layers may deepen it, "
                                f"--lag-inputs add lag inputs, --dropout set its dropout); drop "
                                f"{', '.join(given_model)}")
    _check_arch(settings, given)
    if settings["config"] is None and settings["arch"] == "transformer":
        settings["config"] = f"{settings['kind']}-cpu"
    _check_ranges(settings)
    return settings


def _take_saved_settings(settings: dict, given: dict) -> None:
    """--resume: the run's settings from its run.json, where not given now (only --steps may differ)."""
    run_json = Path(settings["out"]) / "run.json"
    if not run_json.is_file():
        raise TrainingError(f"--resume: no run to resume in {settings['out']} (no run.json)")
    saved = json.loads(run_json.read_text())
    if saved["kind"] != settings["kind"]:
        raise TrainingError(f"--resume: the run in {settings['out']} trains {saved['kind']}, "
                            f"not {settings['kind']}")
    for key in RUN_SETTINGS:
        saved.setdefault(key, RUN_SETTINGS[key])  # runs started before a setting existed
        if key in given and key != "steps" and given[key] != saved[key]:
            raise TrainingError(f"--resume: --{key.replace('_', '-')} was {saved[key]!r} in this run; "
                                f"it cannot change to {given[key]!r} (start a new --out instead)")
        if key not in given:
            settings[key] = saved[key]


def _check_arch(settings: dict, given: dict) -> None:
    """--arch and the flags that only one architecture takes; the LSTM's --tbptt default."""
    arch = settings["arch"]
    if arch not in ARCHS:
        raise TrainingError(f"--arch must be one of {ARCHS}, got {arch!r}")
    shared = {"layers", "block", "seq_len"}
    if arch == "lstm":
        other = [k for k in ("config", *MODEL_FLAGS) if k not in shared and given.get(k) is not None]
        if settings["fsdp"]:
            other.append("fsdp")
        if settings["init"] is not None:
            other.append("init")
    else:
        other = [k for k in (*LSTM_FLAGS, "tbptt") if k not in shared and given.get(k) is not None]
    if other:
        names = ", ".join(f"--{k.replace('_', '-')}" for k in other)
        raise TrainingError(f"{names} {'is' if len(other) == 1 else 'are'} not for --arch {arch}")
    if arch == "lstm" and settings["tbptt"] is None:
        settings["tbptt"] = TBPTT
    if settings["tbptt"] is not None and settings["tbptt"] < 1:
        raise TrainingError(f"--tbptt must be >= 1 (tokens per backpropagated chunk), got {settings['tbptt']}")


def _check_ranges(settings: dict) -> None:
    positive = ("steps", "batch_size", "micro_batch", "eval_items", "save_every", "max_nonfinite")
    for key in positive:
        if settings[key] is None or settings[key] < 1:
            raise TrainingError(f"--{key.replace('_', '-')} must be >= 1, got {settings[key]}")
    if settings["lr"] <= 0 or settings["warmup"] < 0 or settings["clip"] <= 0 or settings["weight_decay"] < 0:
        raise TrainingError("--lr and --clip must be > 0, --warmup and --weight-decay >= 0")
    if not 0 <= settings["min_lr_ratio"] <= 1 or not 0 <= settings["ema"] < 1:
        raise TrainingError("--min-lr-ratio must be in [0, 1] and --ema in [0, 1)")
    if settings["val_fraction"] is not None and not 0 <= settings["val_fraction"] < 1:
        raise TrainingError(f"--val-fraction must be in [0, 1), got {settings['val_fraction']}")
    if settings["eval_every"] is None or settings["eval_every"] < 0:
        raise TrainingError(f"--eval-every must be >= 0 (0 = off), got {settings['eval_every']}")
    if settings["stop_after"] is not None and settings["stop_after"] < 1:
        raise TrainingError(f"--stop-after must be >= 1, got {settings['stop_after']}")
    if settings["window"] is not None:
        if settings["kind"] != "audio":
            raise TrainingError("--window is for audio; image models see whole 64x64x3 images (12,288 tokens)")
        if settings["window"] < 1:
            raise TrainingError(f"--window must be >= 1, got {settings['window']}")
    if settings["stop_minutes"] is not None and not settings["stop_minutes"] > 0:
        raise TrainingError(f"--stop-minutes must be > 0, got {settings['stop_minutes']}")


def training_window(s: dict, cfg: ModelConfig) -> int:
    """Tokens per training sequence: --window, else the model's whole sequence."""
    if s["window"] is None:
        return cfg.seq_len
    if s["window"] > cfg.seq_len:
        raise TrainingError(f"--window {s['window']} is longer than the model's sequence ({cfg.seq_len})")
    return s["window"]


def model_config(s: dict) -> ModelConfig | LSTMConfig:
    """The model to train: --init's config (deepened to --layers if more), else --config with the model flags;
    with --arch lstm, an LSTMConfig of the LSTM flags (its defaults where not given)."""
    if s["arch"] == "lstm":
        return _lstm_config(s)
    if s["init"] is not None:
        return _init_config(s)
    overrides = {field: s[flag] for flag, field in MODEL_FLAGS.items() if s[flag] is not None}
    if "layer_patterns" in overrides:
        overrides["layer_patterns"] = tuple(k.strip() for k in overrides["layer_patterns"].split(","))
    if "ff_layers" in overrides:
        try:
            overrides["ff_layers"] = tuple(int(k) for k in overrides["ff_layers"].split(","))
        except ValueError:
            raise TrainingError(f"--ff-layers must be comma-separated layer numbers, got "
                                f"{overrides['ff_layers']!r}") from None
    if s["kind"] == "image" and "seq_len" in overrides:
        raise TrainingError("--seq-len is for audio; image models see whole 64x64x3 images (12,288 tokens)")
    if overrides.get("lag_inputs"):
        overrides["token_values"] = KIND_TOKEN_VALUES[s["kind"]]
    try:
        return config_for(s["kind"], s["config"], **overrides)
    except ValueError as e:
        raise TrainingError(f"invalid model settings: {e}") from None


def _lstm_config(s: dict) -> LSTMConfig:
    fields = {field: s[flag] for flag, field in LSTM_FLAGS.items() if s[flag] is not None}
    if s["kind"] == "image":
        if fields.get("seq_len", IMAGE_TOKENS) != IMAGE_TOKENS:
            raise TrainingError("--seq-len is for audio; image models see whole 64x64x3 images (12,288 tokens)")
        fields["seq_len"] = IMAGE_TOKENS
    else:
        fields.setdefault("seq_len", AUDIO_TOKENS)
    try:
        return LSTMConfig(**fields)
    except ValueError as e:
        raise TrainingError(f"invalid LSTM settings: {e}") from None


def _init_config(s: dict) -> ModelConfig:
    try:
        card = load_card(s["init"])
    except CheckpointError as e:
        raise TrainingError(f"--init: {e}") from None
    cfg = ModelConfig.from_dict(card["config"])
    if card_kind(card, cfg) != s["kind"]:
        raise TrainingError(f"--init: {s['init']} is not an {s['kind']} model")
    if s["layers"] is not None and s["layers"] != cfg.n_layers:
        try:
            cfg = cfg.deepened(s["layers"])
        except ValueError as e:
            raise TrainingError(f"--layers {s['layers']}: --init can only add layers to {s['init']} "
                                f"({cfg.n_layers} layers): {e}") from None
    if s["lag_inputs"] is not None and s["lag_inputs"] != cfg.lag_inputs:
        try:
            cfg = cfg.with_lag_inputs(s["lag_inputs"], KIND_TOKEN_VALUES[s["kind"]])
        except ValueError as e:
            raise TrainingError(f"--lag-inputs {s['lag_inputs']}: --init can only add lag inputs to a model "
                                f"without them ({s['init']} has {cfg.lag_inputs}): {e}") from None
    if s["dropout"] is not None:
        try:
            cfg = dataclasses.replace(cfg, dropout=s["dropout"])
        except ValueError as e:
            raise TrainingError(f"--dropout {s['dropout']}: {e}") from None
    return cfg


def save_run_settings(out: Path, s: dict, cfg: ModelConfig | LSTMConfig) -> None:
    """run.json in the run directory ``out``: the settings --resume continues with, and the model config.
    Rewritten at every start, atomically: a crash leaves the old file or the new one, never half of one."""
    out.mkdir(parents=True, exist_ok=True)
    run = {k: s[k] for k in ("kind", *RUN_SETTINGS)}
    with atomic_path(out / "run.json") as tmp:
        tmp.write_text(json.dumps({**run, "model": cfg.to_dict()}, indent=2) + "\n")
