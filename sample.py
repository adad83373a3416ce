"""Batch sampling: complete 64x64 images from their top rows, or generate / continue 12 kHz audio.

Images: python sample.py image --prompt cat.jpg --prompt-rows 32 --num-samples 4
Audio:  python sample.py audio [--prompt clip.wav --prompt-seconds 2] --samples 24000

Everything goes into --out-dir (default out/<kind>-<timestamp>): sample_000.png ... (lossless), prompt.png,
original.png and grid.png for images; sample_000.wav ... (16-bit PCM, 12 kHz, prompt + continuation) and
prompt.wav for audio; metadata.json (arguments, seeds, checkpoint and its SHA-256, device, versions, the
decoding step, timings, files). The folder is written under a temporary name and renamed into place when complete, so
an error, Ctrl-C or SIGTERM (exit status 130 / 143) leaves nothing half-written, and the hidden .NAME.<pid>.*.tmp folder
of a run killed outright is removed by the next run; an earlier output folder is replaced only with --overwrite.
Sample i uses seed --seed + i, whatever batch it lands in.

Many prompts (batched across prompts, resumable, sharded under torchrun; see sampling/batch.py):
  python sample.py image --prompts pics/ more/*.jpg --out-dir runs/b   (or --npz val_data.npz --range 0:100)
  python sample.py audio --prompts clips/ --prompt-seconds 1 --samples 12000 --out-dir runs/a
  torchrun --nproc_per_node=2 sample.py image --npz val_data.npz --range 0:100 --out-dir runs/b
writes samples.npz (all samples), p<i>_<name>/sample_<j>.png|wav per prompt and manifest.json; started again
with the same --out-dir and settings it skips what is done.

Again from the web app's settings: python sample.py --from-json settings.json [--out-dir DIR] [any flag]
(the JSON saved with each result in the app's history, or a metadata.json of an earlier run; explicit flags
override its settings; the weights' SHA-256 is checked against the one the result was made with).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import shutil
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from media.audio import AUDIO_TOKENS, SAMPLE_RATE, load_audio, save_wav
from media.image import load_image
from media.pictures import make_grid, masked_prompt
from models import CheckpointError, load_card, load_model, model_kind
from models.checkpoint import atomic_path, pid_running
from sampling import MAX_SEED, MediaProgress, SamplingOptions, complete_image, decoding_step, generate_audio
from sampling.options import resolve_options
from sampling.recipe import read_recipe

DEFAULT_CHECKPOINTS = {"image": "checkpoints/image64", "audio": "checkpoints/audio12k"}
# the flag values that turn a filter off whatever the card's sampling defaults say
FILTER_OFF = {"top_k": 0, "top_p": 1.0}
MAX_NUM_SAMPLES = 10_000  # per call: the seeds, and every sample is held in memory until the end


class UsageError(Exception):
    """Bad input: reported as one line on stderr, exit status 2."""


class Terminated(BaseException):
    """SIGTERM (timeout, service managers): handled like Ctrl-C, nothing written, exit status 143."""


def _terminate(signum, frame):
    raise Terminated


def temp_folder_pattern(out: Path) -> re.Pattern:
    """The hidden folder a run writes ``out`` into: .NAME.<pid>.<8 random characters>.tmp next to it."""
    return re.compile(re.escape(f".{out.name}.") + r"([0-9]+)\.[a-z0-9_]{8}\.tmp")


def remove_stale_temp_folders(out: Path) -> list[Path]:
    """Remove the temporary folders that earlier runs writing ``out`` left next to it when they were killed
    (SIGKILL, power loss): only folders of exactly our pattern whose process no longer runs; a run in progress
    keeps its own. Folders moved aside by publish (.NAME.old-*) are never touched: they may hold the only copy."""
    pattern, removed = temp_folder_pattern(out), []
    if not out.parent.is_dir():
        return removed
    for p in out.parent.iterdir():
        m = pattern.fullmatch(p.name)
        if m and int(m.group(1)) != os.getpid() and not pid_running(int(m.group(1))) and p.is_dir() \
                and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    return removed


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line instead of argparse's usage + message
        raise UsageError(message)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = _Parser(prog="sample.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="kind", required=True, metavar="{image,audio}")
    image = sub.add_parser("image", help="complete 64x64 images from their top rows")
    image.add_argument("--prompt", type=Path, metavar="IMG",
                       help="image file (any format; centre crop to 64x64); without it, sample from scratch")
    image.add_argument("--prompt-rows", type=int, metavar="K", help="rows of the prompt kept, 0..63 (default 32)")
    image.add_argument("--npz", type=Path, metavar="FILE", help="many prompts: an ImageNet-64 npz (with --range)")
    image.add_argument("--range", metavar="A:B", help="the npz's images A..B-1 (default all)")
    audio = sub.add_parser("audio", help="generate 12 kHz audio, or continue a clip")
    audio.add_argument("--prompt", type=Path, metavar="WAV", help="audio file to continue (any rate and channels)")
    audio.add_argument("--prompt-seconds", type=float, metavar="S", help="use its first S seconds (default all)")
    audio.add_argument("--samples", type=int, metavar="N", help="samples to generate after the prompt "
                       "(default 65,536, or what the model's context leaves)")
    for kind, s in (("image", image), ("audio", audio)):
        s.add_argument("--prompts", nargs="+", metavar="PATH", help="many prompts: files, folders or glob patterns "
                       "(batched across prompts; --num-samples each)")
        s.add_argument("--checkpoint", type=Path, metavar="PATH",
                       help=f"checkpoint without extension (default: {DEFAULT_CHECKPOINTS[kind]} next to sample.py)")
        s.add_argument("--num-samples", type=int, default=4 if kind == "image" else 1, metavar="N",
                       help=f"how many samples (default {4 if kind == 'image' else 1})")
        s.add_argument("--batch-size", type=int, default=8, metavar="B", help="samples decoded together (default 8)")
        s.add_argument("--temperature", type=float, metavar="T",
                       help="0 = greedy (default: the model card's sampling defaults, else 1.0)")
        s.add_argument("--top-k", type=int, metavar="K",
                       help="keep the k likeliest tokens, 0 = off (default: the model card's, else off)")
        s.add_argument("--top-p", type=float, metavar="P",
                       help="keep the likeliest tokens up to mass P in (0, 1], 1 = off (default: the card's, else off)")
        s.add_argument("--seed", type=int, default=0, metavar="S", help="sample i uses seed S + i (default 0)")
        s.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="auto: cuda if available")
        s.add_argument("--out-dir", type=Path, metavar="DIR", help="output folder (default out/<kind>-<timestamp>)")
        s.add_argument("--overwrite", action="store_true", help="replace an earlier output in --out-dir")
        s.add_argument("--quiet", action="store_true", help="no progress bar or summary")
    return p.parse_args(argv)


def check_args(a: argparse.Namespace) -> None:
    """Range checks that need no files (the sampling options' values that were given among them)."""
    for name in ("num_samples", "batch_size"):
        if getattr(a, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(a, name)}")
    if a.num_samples > MAX_NUM_SAMPLES:
        raise UsageError(f"--num-samples must be at most {MAX_NUM_SAMPLES:,} per call, got {a.num_samples:,}")
    if not 0 <= a.seed <= MAX_SEED - (a.num_samples - 1):
        raise UsageError(f"--seed must be in 0..{MAX_SEED - (a.num_samples - 1)} with --num-samples "
                         f"{a.num_samples} (sample i uses seed S + i, and seeds go up to 2^64 - 1 = {MAX_SEED}), "
                         f"got {a.seed}")
    if a.kind == "image":
        if a.prompt_rows is None:
            a.prompt_rows = 32 if a.prompt else 0
        if not 0 <= a.prompt_rows <= 63:
            raise UsageError(f"--prompt-rows must be in 0..63 (rows of a 64-row image), got {a.prompt_rows}")
        if a.prompt_rows and a.prompt is None:
            raise UsageError("--prompt-rows needs --prompt (an image to take the rows from)")
    elif a.prompt_seconds is not None and (a.prompt is None or not a.prompt_seconds > 0):
        raise UsageError(f"--prompt-seconds needs --prompt and must be > 0, got {a.prompt_seconds}")
    sampling_options(a, None)


def sampling_options(a: argparse.Namespace, card: dict | None) -> SamplingOptions:
    """--temperature / --top-k / --top-p where given, else the card's sampling defaults (none: temperature 1, no
    filter); the resolved values are written back into ``a`` (None = filter off), so metadata.json and the batch
    record hold what was used."""
    if a.top_k is not None and a.top_k < 0:
        raise UsageError(f"--top-k must be a positive integer, or 0 (off), got {a.top_k}")
    try:
        options = resolve_options(card, a.temperature, a.top_k, a.top_p)
    except ValueError as e:
        if str(e).startswith("the model card"):
            raise UsageError(f"checkpoint {a.checkpoint}: {e}") from None
        # "top_p must be in (0, 1] or None (off), got 1.5" -> "--top-p must be in (0, 1], ..."
        name, rest = str(e).replace(" or None (off)", "").split(" ", 1)
        raise UsageError(f"--{name.replace('_', '-')} {rest}") from None
    if card is not None:
        a.temperature, a.top_k, a.top_p = options.temperature, options.top_k, options.top_p
    return options


def output_dir(a: argparse.Namespace) -> Path:
    """--out-dir, refused if it exists and is not empty (unless --overwrite); default out/<kind>-<timestamp>."""
    if a.out_dir is None:
        base = Path("out") / f"{a.kind}-{datetime.datetime.now():%Y%m%d-%H%M%S}"
        out, n = base, 1
        while out.exists():
            out, n = base.with_name(f"{base.name}-{n}"), n + 1
        return out
    out = Path(os.path.abspath(a.out_dir))  # "." and ".." resolved: the folder has a name and a parent
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out-dir {a.out_dir} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()):
        if not a.overwrite:
            raise UsageError(f"--out-dir {a.out_dir} exists and is not empty; pass --overwrite to replace it")
        if not (out / "metadata.json").is_file():  # a typo must not delete someone's folder
            raise UsageError(f"--out-dir {a.out_dir} was not written by sample.py (no metadata.json); "
                             "--overwrite replaces only earlier sample.py outputs")
    return out


def pick_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda was asked for but CUDA is not available")
    return torch.device("cuda" if name == "cuda" or (name == "auto" and torch.cuda.is_available()) else "cpu")


def _hint(a: argparse.Namespace) -> str:
    """What to say when the default checkpoint (the shipped model) cannot be used."""
    if a.checkpoint == Path(__file__).resolve().parent / DEFAULT_CHECKPOINTS[a.kind]:
        return "; pass --checkpoint PATH (e.g. a model exported by train.py --export)"
    return ""


def read_card(a: argparse.Namespace) -> dict:
    """The checkpoint's card (cheap: no weights), checked to be of the kind asked for; sets the default
    --checkpoint (the shipped model of the kind)."""
    if a.checkpoint is None:
        a.checkpoint = Path(__file__).resolve().parent / DEFAULT_CHECKPOINTS[a.kind]
    hint = _hint(a)
    try:
        card = load_card(a.checkpoint)
    except CheckpointError as e:
        raise UsageError(f"checkpoint: {e}{hint}") from None
    kind = (card.get("codec") or {}).get("kind")
    if kind in ("image", "audio") and kind != a.kind:
        raise UsageError(f"checkpoint {a.checkpoint} is an {kind} model; 'sample.py {a.kind}' needs an "
                         f"{a.kind} model")
    return card


def read_checkpoint(a: argparse.Namespace, device: torch.device):
    """The card first (cheap: checks the kind), then the weights."""
    read_card(a)
    try:
        model = load_model(a.checkpoint, device)
    except CheckpointError as e:
        raise UsageError(f"checkpoint: {e}{_hint(a)}") from None
    if model_kind(model) != a.kind:
        raise UsageError(f"checkpoint {a.checkpoint} is not an {a.kind} model")
    return model


def drive(reports, total: int, quiet: bool) -> MediaProgress:
    """Run a progress generator to its end with a tqdm bar over sampled tokens; returns the last report."""
    with tqdm(total=total, unit="tok", unit_scale=True, disable=quiet, dynamic_ncols=True, file=sys.stderr) as bar:
        for report in reports:
            bar.update(report.done - bar.n)
            if report.finished:
                return report
    raise RuntimeError("sampling ended without a final report")


def save_png(path: Path, image: np.ndarray) -> None:
    Image.fromarray(image).save(path, format="PNG")


def sample_images(a: argparse.Namespace, model, options: SamplingOptions, original: np.ndarray,
                  tmp: Path) -> MediaProgress:
    """Sample completions of ``original`` (the 64x64 prompt crop), write the PNGs and the grid."""
    seeds = [a.seed + i for i in range(a.num_samples)]
    total = a.num_samples * (64 - a.prompt_rows) * 64 * 3
    report = drive(complete_image(model, original, a.prompt_rows, seeds, options, a.batch_size), total, a.quiet)
    for i, image in enumerate(report.media):
        save_png(tmp / f"sample_{i:03d}.png", image)
    tiles = list(report.media)
    if a.prompt is not None:
        prompt = masked_prompt(original, a.prompt_rows)
        save_png(tmp / "prompt.png", prompt)
        save_png(tmp / "original.png", original)
        tiles = [prompt, *tiles, original]
    save_png(tmp / "grid.png", make_grid(tiles, a.prompt_rows))
    return report


def fit_audio_prompt(a: argparse.Namespace, prompt: np.ndarray | None, context: int) -> np.ndarray | None:
    """The first --prompt-seconds of the prompt; checks that it and --samples fit the context (default --samples)."""
    if prompt is not None and a.prompt_seconds is not None:
        prompt = prompt[: max(1, round(a.prompt_seconds * SAMPLE_RATE))]
    used = 0 if prompt is None else len(prompt)
    if used >= context:
        raise UsageError(f"the prompt ({used} samples) fills the model's context of {context} samples; "
                         "use --prompt-seconds to shorten it")
    if a.samples is None:
        a.samples = min(AUDIO_TOKENS, context - used)
    if not 1 <= a.samples <= context - used:
        room = f" after a {used}-sample prompt" if used else ""
        raise UsageError(f"--samples must be in 1..{context - used} (the model's context is {context} "
                         f"samples{room}), got {a.samples}")
    return prompt


def sample_audio(a: argparse.Namespace, model, options: SamplingOptions, prompt: np.ndarray | None,
                 tmp: Path) -> MediaProgress:
    seeds = [a.seed + i for i in range(a.num_samples)]
    reports = generate_audio(model, a.samples, seeds, prompt, options, a.batch_size)
    report = drive(reports, a.num_samples * a.samples, a.quiet)
    for i, tokens in enumerate(report.media):
        save_wav(tmp / f"sample_{i:03d}.wav", tokens, SAMPLE_RATE)
    if prompt is not None:  # the prompt as the model saw it (mu-law): equal to the start of every sample
        save_wav(tmp / "prompt.wav", report.media[0, : report.media.shape[1] - a.samples], SAMPLE_RATE)
    return report


def metadata(a: argparse.Namespace, argv: list[str], model, device: torch.device, report: MediaProgress,
             t_start: float, t_loaded: float, tmp: Path, out: Path) -> dict:
    card = model.card
    settings = {k: str(v) if isinstance(v, Path) else v for k, v in vars(a).items()}
    settings["out_dir"] = str(out)
    return {
        "command": ["sample.py", *argv],
        "arguments": settings,
        "seeds": [a.seed + i for i in range(a.num_samples)],
        "outputs": [{"file": f"sample_{i:03d}.{'png' if a.kind == 'image' else 'wav'}", "seed": a.seed + i}
                    for i in range(a.num_samples)],
        "checkpoint": {"path": str(a.checkpoint), "weights_sha256": card.get("weights", {}).get("sha256"),
                       "codec": card.get("codec"), "steps": card.get("steps"),
                       "held_out_bits_per_dim": card.get("held_out_bits_per_dim"),
                       "tokens_seen": card.get("tokens_seen"), "parameters": card.get("parameters"),
                       "date": card.get("date")},
        "device": str(device) if device.type == "cpu" else f"{device} ({torch.cuda.get_device_name(device)})",
        "versions": {"python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__},
        "decoding_step": decoding_step(model),
        "timings": {"load_seconds": round(t_loaded - t_start, 3), "sampling_seconds": round(report.seconds, 3),
                    "total_seconds": round(time.perf_counter() - t_start, 3), "tokens_sampled": report.total,
                    "tokens_per_second": round(report.total / max(report.seconds, 1e-9), 1)},
        "files": sorted({p.name for p in tmp.iterdir()} | {"metadata.json"}),
    }


def publish(tmp: Path, out: Path) -> None:
    """Rename the finished folder into place; an existing one is moved aside first and removed after."""
    if not out.exists():
        os.replace(tmp, out)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
    try:
        os.replace(out, old / "d")
        os.replace(tmp, out)
    except BaseException:  # an error or Ctrl-C between the two renames: put the old folder back
        if (old / "d").exists():
            os.replace(old / "d", out)
        old.rmdir()
        raise
    shutil.rmtree(old)


def expand_recipe(argv: list[str]) -> tuple[list[str], dict | None]:
    """``--from-json FILE`` replaced by the flags of its settings, put before the other flags (which win:
    argparse keeps the last value); the kind may be left out. Returns (argv, the recipe or None)."""
    rest, source = [], None
    it = iter(argv)
    for arg in it:
        if arg == "--from-json":
            source = next(it, None)
            if source is None:
                raise UsageError("argument --from-json: expected one argument")
        elif arg.startswith("--from-json="):
            source = arg.split("=", 1)[1]
        else:
            rest.append(arg)
    if source is None:
        return argv, None
    try:
        recipe = read_recipe(source)
    except ValueError as e:
        raise UsageError(str(e)) from None
    kind = recipe["kind"]
    if rest and rest[0] in DEFAULT_CHECKPOINTS:
        if rest[0] != kind:
            raise UsageError(f"--from-json {source} holds {kind} settings, not {rest[0]}")
        rest = rest[1:]
    flags = []
    for name, value in recipe["settings"].items():
        value = FILTER_OFF.get(name) if value is None else value  # a filter that was off stays off
        if value is not None:
            flags += [f"--{name.replace('_', '-')}", repr(value)]
    if recipe["prompt"] is not None and "--prompt" not in rest:
        if not recipe["prompt"].is_file():
            raise UsageError(f"the prompt {recipe['prompt'].name} named by {source} is not beside it "
                             f"({recipe['prompt']}): put it there, or pass --prompt FILE")
        flags += ["--prompt", str(recipe["prompt"])]
    if recipe["checkpoint_name"] is not None:
        folder = (Path(__file__).resolve().parent / DEFAULT_CHECKPOINTS[kind]).parent
        flags += ["--checkpoint", str(folder / recipe["checkpoint_name"])]
    recipe["source"] = str(source)
    return [kind, *flags, *rest], recipe


def check_recipe_weights(recipe: dict | None, model, a: argparse.Namespace) -> str | None:
    """None when the checkpoint's weights are the recipe's (or it names none), else a warning (printed)."""
    if recipe is None or recipe["weights_sha256"] is None:
        return None
    have = model.card.get("weights", {}).get("sha256")
    if have == recipe["weights_sha256"]:
        return None
    warning = (f"the weights of {a.checkpoint} (sha256 {str(have)[:12]}…) are not the ones {recipe['source']} was "
               f"made with (sha256 {recipe['weights_sha256'][:12]}…): the samples will differ")
    print(f"sample.py: warning: {warning}", file=sys.stderr)
    return warning


def batch_settings(a: argparse.Namespace) -> dict:
    """What makes a batch run's samples (a resumed run must match it): not --out-dir, --device, --quiet."""
    keys = ("kind", "prompts", "npz", "range", "prompt_rows", "prompt_seconds", "samples", "num_samples",
            "batch_size", "temperature", "top_k", "top_p", "seed")
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(a).items() if k in keys}


def run_batch(a: argparse.Namespace, argv: list[str]) -> Path:
    """Many prompts (--prompts, --npz): sampling.batch, one shard per rank (RANK / WORLD_SIZE from torchrun)."""
    from sampling.batch import RUN_FILE, BatchRun, assemble, audio_prompts, image_prompts, sample_shard

    if a.prompt is not None:
        raise UsageError("--prompt is one prompt; with --prompts or --npz give all of them there")
    if a.out_dir is None:
        raise UsageError("--prompts / --npz need --out-dir (a run is resumed from its folder)")
    for name in ("num_samples", "batch_size"):
        if getattr(a, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(a, name)}")
    if a.seed < 0:
        raise UsageError(f"--seed must be >= 0, got {a.seed}")
    if a.kind == "image":
        a.prompt_rows = 32 if a.prompt_rows is None else a.prompt_rows
        if not 0 <= a.prompt_rows <= 63:
            raise UsageError(f"--prompt-rows must be in 0..63 (rows of a 64-row image), got {a.prompt_rows}")
    elif a.prompt_seconds is not None and not a.prompt_seconds > 0:
        raise UsageError(f"--prompt-seconds must be > 0, got {a.prompt_seconds}")
    options = sampling_options(a, read_card(a))
    try:
        prompts = image_prompts(a.prompts or [], a.npz and str(a.npz), a.range) if a.kind == "image" \
            else audio_prompts(a.prompts or [])
    except ValueError as e:
        raise UsageError(str(e)) from None
    if not prompts:
        raise UsageError("no prompts")
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if not 0 <= rank < world:
        raise UsageError(f"RANK must be in 0..WORLD_SIZE-1, got RANK={rank} WORLD_SIZE={world}")
    out = Path(os.path.abspath(a.out_dir))
    settings = batch_settings(a)
    record = out / RUN_FILE
    if out.is_dir() and any(out.iterdir()):
        try:
            earlier = json.loads(record.read_text())["settings"]
        except (OSError, ValueError, KeyError, TypeError):
            raise UsageError(f"--out-dir {a.out_dir} exists and is not a batch run of sample.py (no readable "
                             f"{RUN_FILE})") from None
        if earlier != settings:
            if not a.overwrite:
                raise UsageError(f"--out-dir {a.out_dir} holds a run with other settings; pass --overwrite to "
                                 "start it again, or use another folder")
            if rank == 0:
                shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    local = int(os.environ.get("LOCAL_RANK", 0))
    if a.device != "cpu" and torch.cuda.is_available():
        device = torch.device("cuda", local % torch.cuda.device_count())
    else:
        device = pick_device(a.device)
        if world > 1:  # CPU processes on one machine share its cores
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", world))))
    group = world > 1 and "MASTER_ADDR" in os.environ  # torchrun: a gloo group, only for the final barrier
    if group:
        import torch.distributed as dist

        dist.init_process_group("gloo")
    try:
        model = read_checkpoint(a, device)
        with atomic_path(record) as tmp_record:
            tmp_record.write_text(json.dumps({"settings": settings, "command": ["sample.py", *argv],
                                              "checkpoint": str(a.checkpoint),
                                              "weights_sha256": model.card.get("weights", {}).get("sha256")},
                                             indent=2) + "\n")
        run = BatchRun(a.kind, prompts, a.num_samples, a.seed, options, a.batch_size,
                       prompt_rows=a.prompt_rows if a.kind == "image" else 32,
                       prompt_seconds=getattr(a, "prompt_seconds", None), samples=getattr(a, "samples", None))
        with tqdm(unit="sample", disable=a.quiet, dynamic_ncols=True, file=sys.stderr,
                  desc=f"rank {rank}/{world}" if world > 1 else None) as bar:
            def progress(made: int, todo: int) -> None:
                bar.total = todo
                bar.update(made - bar.n)

            try:
                made = sample_shard(run, model, out, rank, world, progress)
            except ValueError as e:
                raise UsageError(str(e)) from None
            except KeyboardInterrupt:
                raise KeyboardInterrupt(f"sample.py: interrupted; the finished batches are kept in {out}: the same "
                                        "command resumes the run") from None
        if group:
            dist.barrier()
        manifest = assemble(run, out, settings) if rank == 0 or not group else None
    finally:
        if group:
            dist.destroy_process_group()
    if not a.quiet:
        state = f"assembled {out / 'samples.npz'}" if manifest else "other ranks still sampling"
        print(f"rank {rank}: made {made} of {run.total} sample(s) ({len(prompts)} prompts); {state}")
    return out


def run(argv: list[str]) -> Path:
    t_start = time.perf_counter()
    argv, recipe = expand_recipe(argv)
    a = parse_args(argv)
    if a.prompts is not None or getattr(a, "npz", None) is not None:
        return run_batch(a, argv)
    check_args(a)
    out = output_dir(a)
    device = pick_device(a.device)
    try:  # the prompt first: a bad file fails before the model loads
        if a.kind == "image":
            prompt = load_image(a.prompt) if a.prompt is not None else np.zeros((64, 64, 3), np.uint8)
        else:
            # only the first --prompt-seconds are decoded (a whole file is read up to load_audio's limit)
            prompt = load_audio(a.prompt, SAMPLE_RATE, seconds=a.prompt_seconds) if a.prompt is not None else None
    except ValueError as e:  # unreadable or missing files, named in the message
        raise UsageError(str(e)) from None
    model = read_checkpoint(a, device)
    options = sampling_options(a, model.card)
    weights_warning = check_recipe_weights(recipe, model, a)
    if a.kind == "audio":
        prompt = fit_audio_prompt(a, prompt, model.cfg.seq_len)
    t_loaded = time.perf_counter()
    made = [p for p in [out.parent, *out.parent.parents] if not p.exists()]
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temp_folders(out)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.{os.getpid()}.", suffix=".tmp", dir=out.parent))
    try:
        if a.kind == "image":
            report = sample_images(a, model, options, prompt, tmp)
        else:
            report = sample_audio(a, model, options, prompt, tmp)
        meta = metadata(a, argv, model, device, report, t_start, t_loaded, tmp, out)
        if recipe is not None:
            meta["from_json"] = {"file": recipe["source"], "weights_match": weights_warning is None}
        (tmp / "metadata.json").write_text(json.dumps(meta, indent=2) + "\n")
        publish(tmp, out)
        made = []
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        for p in made:  # folders created for --out-dir, removed again if the run failed
            try:
                p.rmdir()
            except OSError:
                break
    if not a.quiet:
        print(f"wrote {a.num_samples} {a.kind} sample(s) to {out} ({meta['timings']['sampling_seconds']:.1f} s, "
              f"{meta['timings']['tokens_per_second']:.0f} tokens/s)")
    return out


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    in_main_thread = threading.current_thread() is threading.main_thread()
    old_handler = signal.signal(signal.SIGTERM, _terminate) if in_main_thread else None
    try:
        run(argv)
    except UsageError as e:
        print(f"sample.py: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        print(str(e) or "sample.py: interrupted; nothing was written", file=sys.stderr)
        return 130
    except Terminated:
        print("sample.py: terminated; nothing was written", file=sys.stderr)
        return 143
    except OSError as e:
        print(f"sample.py: error: cannot write the output: {' '.join(str(e).split())}", file=sys.stderr)
        return 1
    finally:
        if in_main_thread:
            signal.signal(signal.SIGTERM, old_handler)
    return 0


if __name__ == "__main__":
    sys.exit(main())
