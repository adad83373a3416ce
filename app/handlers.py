"""Event functions of the page: check what the user sent, call into models/, turn reports into outputs.

The sampling events are generators (progress as pictures every few rows or fractions of a
second; the Stop button closes them between two reports). Files arrive unprocessed (the events
run with preprocess=False) so that a bad upload is reported by our readers with its own name,
never as a Gradio processing error. Every bad input raises gr.Error naming what was wrong and
what is allowed.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import gradio as gr
import numpy as np
from PIL import Image

from media.audio import SAMPLE_RATE, load_audio, save_wav, tokens_to_audio, tokens_to_pcm16
from media.image import load_image
from media.pictures import audio_picture, make_grid, masked_prompt
from models import CheckpointError
from models.architectures import Model
from sampling import MediaProgress, SamplingOptions, complete_image, generate_audio
from sampling.recipe import make_recipe, write_recipe

from .history import History, HistoryEntry
from .registry import Registry

MAX_SAMPLES = 8  # images per run
MAX_TEMPERATURE = 2.0
MAX_SEED = 2**31 - 1
RANDOM_SEEDS = 100_000  # random seeds are below this: short enough to read and type
REPORT_ROWS = 2  # image preview every 2 sampled rows
REPORT_SAMPLES = 1024  # audio preview every 1,024 samples
STREAM_SAMPLES = 6000  # the growing clip is sent to the page every 0.5 s of audio (played as it grows)
PREVIEW_COLUMNS = 6  # tiles per row of the preview grid, at most
SILENCE = 1e-3  # a clip whose peak is below this (-60 dBFS) is silent
FROM_SCRATCH, CONTINUE = "From scratch", "Continue a clip"
T = TypeVar("T")


def _number(label: str, value: object, lo: float, hi: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or not lo <= value <= hi:
        raise gr.Error(f"{label} must be a number from {lo:g} to {hi:g}, got {value!r}")
    return float(value)


def _whole(label: str, value: object, lo: int, hi: int) -> int:
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise gr.Error(f"{label} must be a whole number from {lo} to {hi}, got {value!r}")
    return value


def _sample_seeds(seed: int, n: int) -> list[int]:
    """The seeds of n samples: sample i uses seed + i, and each must be a seed the Seed field takes back."""
    if seed + n - 1 > MAX_SEED:
        raise gr.Error(f"Seed must be at most {MAX_SEED - n + 1} with {n} samples (sample i uses seed + i, and "
                       f"seeds go up to {MAX_SEED}), got {seed}")
    return list(range(seed, seed + n))


def sampling_options(temperature: object, top_k: object, top_p: object,
                     defaults: SamplingOptions | None = None) -> SamplingOptions:
    """Temperature 0..2 (0 = greedy); top-k 0 (off) .. 256; top-p in (0, 1] (1 = off). A value not given (None,
    as a program calling the API may pass, and as sample.py's flags default to) is the model's ``defaults``
    (none: temperature 1, no filter)."""
    defaults = defaults or SamplingOptions()
    t = defaults.temperature if temperature is None else _number("Temperature", temperature, 0, MAX_TEMPERATURE)
    k = (defaults.top_k or 0) if top_k is None else _whole("Top-k", top_k, 0, 256)
    p = (defaults.top_p or 1.0) if top_p is None else _number("Top-p", top_p, 0, 1)
    if p == 0:
        raise gr.Error("Top-p must be above 0 (1 keeps every token), got 0")
    return SamplingOptions(t, k or None, p if p < 1 else None)


def choose_seed(seed: object, randomize: object) -> int:
    """A fresh random seed when ``randomize`` is set, else ``seed`` (0 .. 2^31 - 1)."""
    if not isinstance(randomize, bool):
        raise gr.Error(f"Randomize seed must be true or false, got {randomize!r}")
    return secrets.randbelow(RANDOM_SEEDS) if randomize else _whole("Seed", seed, 0, MAX_SEED)


def uploaded(value: object, what: str) -> tuple[Path, str] | None:
    """(server path, the name the user's file had) of an upload (Gradio's FileData as a dict), None if none."""
    if value is None:
        return None
    if not isinstance(value, dict) or not isinstance(value.get("path"), str):
        raise gr.Error(f"the {what} must be an uploaded file, got {type(value).__name__}")
    path = Path(value["path"])
    return path, str(value.get("orig_name") or path.name)


def _read(reader: Callable[[Path], T], upload: tuple[Path, str]) -> T:
    """``reader(path)``, its ValueError turned into a gr.Error naming the user's file, not the server's copy."""
    path, name = upload
    try:
        return reader(path)
    except ValueError as e:
        raise gr.Error(str(e).replace(str(path), name)) from None


def crop_preview(picture: object, prompt_rows: object) -> np.ndarray | None:
    """The 64x64 crop the model sees, enlarged, with the rows to be sampled faded and a line under the prompt."""
    upload = uploaded(picture, "picture")
    if upload is None:
        return None
    rows = _whole("Prompt rows", prompt_rows, 0, 63)
    crop = _read(load_image, upload)
    faded = crop.copy()
    faded[rows:] = (crop[rows:] * 0.35 + 255 * 0.65).astype(np.uint8)
    return make_grid([faded], rows)


def pcm16(tokens: np.ndarray) -> tuple[int, np.ndarray]:
    """(rate, int16 samples) of mu-law tokens, as gr.Audio plays them unchanged (float arrays are peak-normalised)."""
    return SAMPLE_RATE, tokens_to_pcm16(tokens)


def _png(path: Path, image: np.ndarray) -> str:
    Image.fromarray(image).save(path, format="PNG")
    return str(path)


def _speed(report: MediaProgress) -> str:
    return f"{report.seconds:.1f} s, {report.total / max(report.seconds, 1e-9):,.0f} tokens/s"


@dataclass
class Job:
    """A checked sampling job: the model's name, seeds and options, and the prompt."""

    model_name: str
    seeds: list[int]
    options: SamplingOptions
    prompt: np.ndarray | None  # image: the 64x64 crop (None: from scratch); audio: float samples at 12 kHz
    prompt_name: str | None  # the user's file name
    rows: int = 0  # image: prompt rows
    length: int = 0  # audio: samples to generate
    prompt_seconds: float | None = None  # audio, as the user gave it


class Studio:
    """The event functions, bound to the checkpoints of one folder on one device; ``history`` keeps each
    browser session's results (files and settings JSON) on the server."""

    def __init__(self, registry: Registry, history: History | None = None):
        self.registry = registry
        self.history = history or History()

    def _model(self, name: object, kind: str) -> Model:
        try:
            return self.registry.model(name, kind)
        except CheckpointError as e:
            raise gr.Error(f"the model {name} cannot be loaded: {e}") from None
        except ValueError as e:
            raise gr.Error(str(e)) from None

    def default_model(self, name: object, kind: str) -> str:
        """``name``, or the first model of ``kind`` when None."""
        if name is None:
            entries = self.registry.of_kind(kind)
            if not entries:
                raise gr.Error(f"there is no {kind} model in {self.registry.folder}")
            return entries[0].name
        return name

    def options(self, model_name: str, kind: str, temperature: object, top_k: object, top_p: object
                ) -> SamplingOptions:
        """The options asked for, each one not given (None) from the model card's sampling defaults."""
        try:
            defaults = self.registry.entry(model_name, kind).defaults
        except ValueError as e:
            raise gr.Error(str(e)) from None
        return sampling_options(temperature, top_k, top_p, defaults)

    # ---- images ----

    def image_job(self, picture: object, prompt_rows: object, num_samples: object, temperature: object,
                  top_k: object, top_p: object, seed: int, model_name: object) -> Job:
        upload = uploaded(picture, "picture")
        rows = _whole("Prompt rows", prompt_rows, 0, 63)
        if upload is None and rows:
            raise gr.Error("Upload a picture (or pick an example) to complete, or set prompt rows to 0 to "
                           "sample whole pictures from scratch")
        n = _whole("Number of samples", num_samples, 1, MAX_SAMPLES)
        model_name = self.default_model(model_name, "image")
        options = self.options(model_name, "image", temperature, top_k, top_p)
        seeds = _sample_seeds(seed, n)
        original = _read(load_image, upload) if upload else None
        return Job(str(model_name), seeds, options, original, upload[1] if upload else None,
                   rows=rows)

    def run_images(self, job: Job, progress: Callable) -> Iterator[tuple[np.ndarray, str] | HistoryEntry]:
        """Sample ``job``: yields (preview grid, status) while sampling, then the result's HistoryEntry."""
        model = self._model(job.model_name, "image")
        rows, seeds, n, original = job.rows, job.seeds, len(job.seeds), job.prompt
        image = original if original is not None else np.zeros((64, 64, 3), np.uint8)
        # (file name, caption, picture) of the tiles around the samples: prompt | samples | original
        first = [("prompt", "prompt", masked_prompt(image, rows))] if rows else []
        last = [("original", "original", original)] if original is not None else []
        tiles = len(first) + n + len(last)
        columns = math.ceil(tiles / math.ceil(tiles / PREVIEW_COLUMNS))  # rows of tiles as even as can be

        def grid(media: np.ndarray) -> np.ndarray:
            return make_grid([t for *_, t in first] + list(media) + [t for *_, t in last], rows, columns=columns)

        reports = complete_image(model, image, rows, seeds, job.options, report_rows=REPORT_ROWS)
        try:
            for report in reports:
                progress((report.done, report.total), desc="Sampling", unit="tokens")
                if report.finished:
                    break
                yield grid(report.media), f"Sampling… {report.done:,} of {report.total:,} tokens"
        finally:
            reports.close()
        files = first + [(f"sample_{i + 1}_seed_{s}", f"seed {s}", report.media[i]) for i, s in enumerate(seeds)]
        files += last
        status = (f"{n} completion{'s' * (n > 1)} of {rows} prompt rows · seeds {seeds[0]}–{seeds[-1]} · "
                  f"{_speed(report)} · model {job.model_name}")
        folder = self.history.new_folder()  # named files: downloads keep the names
        gallery = [(_png(folder / f"{name}.png", tile), caption) for name, caption, tile in files]
        grid_png = Path(_png(folder / "grid.png", grid(report.media)))
        samples = [Path(p) for (p, c), (name, *_) in zip(gallery, files, strict=True) if name.startswith("sample")]
        options = {"prompt_rows": rows, "num_samples": n, "temperature": job.options.temperature,
                   "top_k": job.options.top_k, "top_p": job.options.top_p, "seed": seeds[0]}
        recipe = self._recipe(folder, "image", options, job, "original.png" if original is not None else None,
                              [p.name for p in samples])
        yield HistoryEntry("image", folder, grid_png, samples, recipe, status, options, job.model_name,
                           [(Path(p), c) for p, c in gallery])

    def _recipe(self, folder: Path, kind: str, options: dict, job: Job, prompt: str | None,
                outputs: list[str]) -> Path:
        card = self.registry.entry(job.model_name, kind).card
        sha = card.get("weights", {}).get("sha256") if isinstance(card.get("weights"), dict) else None
        return write_recipe(folder / "settings.json",
                            make_recipe(kind, options, job.model_name, sha, prompt, job.seeds, outputs))

    # The page's sampling events' arguments default to None so that the API's parameters all have defaults: Gradio
    # gives each the initial value of its control on the page, and None (no upload) to the picture and the clip.
    def complete_images(self, picture: object = None, prompt_rows: object = None, temperature: object = None,
                        num_samples: object = None, seed: object = None, randomize: object = None,
                        top_k: object = None, top_p: object = None, model_name: object = None,
                        history: list | None = None, progress: gr.Progress = gr.Progress()) -> Iterator[tuple]:
        """Complete the picture's bottom rows ``num_samples`` times: yields (preview grid, gallery, seed, status,
        this session's history)."""
        seed = choose_seed(seed, randomize)
        job = self.image_job(picture, prompt_rows, num_samples, temperature, top_k, top_p, seed, model_name)
        for out in self.run_images(job, progress):
            if isinstance(out, HistoryEntry):
                gallery = [(str(p), c) for p, c in out.gallery]
                yield str(out.picture), gallery, seed, out.status, self.history.add(history, out)
            else:
                yield out[0], gr.skip(), seed, out[1], gr.skip()

    # ---- audio ----

    def audio_job(self, clip: object, prompt_seconds: object, length: int | None, num_samples: object,
                  temperature: object, top_k: object, top_p: object, seed: int, model_name: object,
                  length_label: str = "Length", length_given: object = None) -> Job:
        """length None: what the model's context leaves after the prompt, at most 65,536 samples."""
        upload = uploaded(clip, "clip")
        n = _whole("Number of samples", num_samples, 1, MAX_SAMPLES)
        model_name = self.default_model(model_name, "audio")
        options = self.options(model_name, "audio", temperature, top_k, top_p)
        seeds = _sample_seeds(seed, n)
        prompt, seconds = None, None
        if upload:
            seconds = _number("Prompt length (seconds)", prompt_seconds, 0, 3600) if prompt_seconds is not None \
                else None
            if seconds is not None and round(seconds * SAMPLE_RATE) < 1:
                raise gr.Error("Prompt length must be above 0 seconds when continuing a clip")
            # only the prompt's seconds of the upload are decoded: a long or high-rate file costs no more
            prompt = _read(lambda path: load_audio(path, SAMPLE_RATE, seconds=seconds), upload)
            whole = seconds is None or len(prompt) < round(seconds * SAMPLE_RATE)  # the whole clip was read
            if whole and np.abs(prompt).max() < SILENCE:
                raise gr.Error(f"{upload[1]} is silent (its loudest sample is below -60 dBFS): upload a clip with "
                               "sound, or choose 'From scratch'")
            if np.abs(prompt).max() < SILENCE:
                raise gr.Error(f"the first {len(prompt) / SAMPLE_RATE:.2f} s of {upload[1]} are silent: use a longer "
                               "prompt, or a clip that starts with sound")
        try:
            context = self.registry.entry(model_name, "audio").config.seq_len
        except ValueError as e:
            raise gr.Error(str(e)) from None
        used = 0 if prompt is None else len(prompt)
        room = context - used
        if length is None:
            length = min(65_536, room)
        if not 1 <= length <= room:
            after = f" after a {used / SAMPLE_RATE:.2f} s prompt" if used else ""
            raise gr.Error(f"{length_label} must be above 0 and at most {room / SAMPLE_RATE:.2f} seconds ({room:,} "
                           f"samples): the model {model_name} holds {context:,} samples ({context / SAMPLE_RATE:.2f} "
                           f"s){after}, got {length_given!r}")
        return Job(str(model_name), seeds, options, prompt, upload[1] if upload else None,
                   length=length, prompt_seconds=seconds)

    def run_audio(self, job: Job, progress: Callable) -> Iterator[tuple[np.ndarray, np.ndarray | None, str]
                                                                  | HistoryEntry]:
        """Sample ``job``: yields (picture, the first clip's tokens so far or None, status) while sampling (the
        clip every STREAM_SAMPLES), then the result's HistoryEntry."""
        model = self._model(job.model_name, "audio")
        used = 0 if job.prompt is None else len(job.prompt)
        length, seeds = job.length, job.seeds
        reports = generate_audio(model, length, seeds, job.prompt, job.options, report_every=REPORT_SAMPLES)
        streamed = 0
        try:
            for report in reports:
                progress((report.done, report.total), desc="Sampling", unit="samples")
                done = report.done // len(seeds)  # the first clip's (all clips are one batch: MAX_SAMPLES <= 8)
                sampled = tokens_to_audio(report.media[0, : used + done])
                picture = audio_picture(sampled, used, used + length)
                if report.finished:
                    break
                clip = None
                if done - streamed >= STREAM_SAMPLES and done <= length:
                    clip, streamed = report.media[0, : used + done].copy(), done
                yield picture, clip, f"Sampling… {report.done / SAMPLE_RATE:.2f} of " \
                                     f"{length * len(seeds) / SAMPLE_RATE:.2f} s"
        finally:
            reports.close()
        start = f"after a {used / SAMPLE_RATE:.2f} s prompt" if used else "from scratch"
        n = len(seeds)
        which = f"seed {seeds[0]}" if n == 1 else f"{n} clips · seeds {seeds[0]}–{seeds[-1]}"
        status = f"{length / SAMPLE_RATE:.2f} s {start} · {which} · {_speed(report)} · model {job.model_name}"
        folder = self.history.new_folder()  # named 16-bit WAVs: downloads keep the names
        name = "continuation" if used else "generated"
        wavs = [save_wav(folder / f"{name}_seed_{s}.wav", report.media[i]) for i, s in enumerate(seeds)]
        picture_png = Path(_png(folder / "picture.png", picture))
        prompt_file = None
        if job.prompt is not None:  # the prompt exactly as it was used (float32 at 12 kHz): the recipe's prompt
            import soundfile as sf
            prompt_file = "prompt.wav"
            sf.write(str(folder / prompt_file), job.prompt.astype(np.float32), SAMPLE_RATE, subtype="FLOAT")
        options = {"prompt_seconds": None if job.prompt is None else len(job.prompt) / SAMPLE_RATE,
                   "samples": length, "num_samples": n, "temperature": job.options.temperature,
                   "top_k": job.options.top_k, "top_p": job.options.top_p, "seed": seeds[0]}
        recipe = self._recipe(folder, "audio", options, job, prompt_file, [w.name for w in wavs])
        yield HistoryEntry("audio", folder, picture_png, wavs, recipe, status, options, job.model_name, [])

    def generate_clip(self, mode: object = None, clip: object = None, prompt_seconds: object = None,
                      length_seconds: object = None, temperature: object = None, seed: object = None,
                      randomize: object = None, top_k: object = None, top_p: object = None,
                      model_name: object = None, history: list | None = None,
                      progress: gr.Progress = gr.Progress()) -> Iterator[tuple]:
        """Generate ``length_seconds`` of audio, from scratch or after the clip's first ``prompt_seconds``:
        yields (waveform + spectrogram picture, the clip (growing while sampling, then a 16-bit WAV), seed, status,
        this session's history)."""
        if mode not in (FROM_SCRATCH, CONTINUE):
            raise gr.Error(f"Start must be {FROM_SCRATCH!r} or {CONTINUE!r}, got {mode!r}")
        upload = clip if mode == CONTINUE else None
        if mode == CONTINUE and upload is None:
            raise gr.Error("Upload a clip to continue (or pick an example), or choose 'From scratch'")
        length = round(_number("Length (seconds)", length_seconds, 0, 3600) * SAMPLE_RATE)
        if upload is not None:
            seconds = _number("Prompt length (seconds)", prompt_seconds, 0, 3600)
            if round(seconds * SAMPLE_RATE) < 1:
                raise gr.Error("Prompt length must be above 0 seconds when continuing a clip")
        sampling_options(temperature, top_k, top_p)
        seed = choose_seed(seed, randomize)
        job = self.audio_job(upload, prompt_seconds if upload is not None else None, length, 1, temperature,
                             top_k, top_p, seed, model_name, "Length", f"{length_seconds!r} s")
        for out in self.run_audio(job, progress):
            if isinstance(out, HistoryEntry):
                yield str(out.picture), str(out.media[0]), seed, out.status, self.history.add(history, out)
            else:
                picture, tokens, status = out
                yield picture, gr.skip() if tokens is None else pcm16(tokens), seed, status, gr.skip()
