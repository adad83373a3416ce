"""Batch sampling over many prompts: batched across prompts, written as it goes, resumable, sharded over ranks.

Sample k of a run is sample j = k % num_samples of prompt i = k // num_samples, with seed ``seed + k`` (so a run
of one prompt gives the same samples as ``sample.py --prompt``). Rank r of ``world`` takes prompts r, r + world,
... (all their samples); each rank decodes its samples ``batch_size`` at a time, several prompts in one batch
(images: every prompt keeps the same rows, so the prompts have one length; audio: only prompts of equal length
share a batch). After each batch a rank writes the samples' PNG/WAV files and then ``parts/r<rank>-<k>.npz``
(the batch's sample indices and media), each atomically; the parts are the progress record, so a killed run,
started again with the same settings, skips what its parts hold. When every sample is done, ``samples.npz``
(images uint8 [N, 64, 64, 3]; audio int16 [N, T], zero-padded, with ``lengths``) and ``manifest.json`` (per
sample: prompt index and source, seed, file) are assembled from the parts (by rank 0 under torchrun).
"""

from __future__ import annotations

import glob
import json
import re
import time
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from media.audio import SAMPLE_RATE, load_audio, mu_law_encode, tokens_to_pcm16
from media.image import IMAGE_SIZE, IMAGE_TOKENS, image_to_tokens, load_image, tokens_to_image
from models.checkpoint import atomic_path

from .options import SamplingOptions
from .sampler import generate

IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".ppm"}
AUDIO_EXTENSIONS = {".wav", ".flac", ".ogg", ".mp3", ".aiff", ".aif", ".au"}
ROW_TOKENS = IMAGE_SIZE * 3
RUN_FILE = "run.json"


@dataclass(frozen=True)
class Prompt:
    """One prompt: ``source`` as the manifest names it (a path, or "FILE.npz[i]"); ``load()`` its media
    (image: uint8 [64, 64, 3]; audio: float32 [T] at 12 kHz)."""

    source: str
    load: Callable[[], np.ndarray]


def expand_paths(items: list[str], extensions: set[str]) -> list[Path]:
    """Files, folders (their files with a known extension, sorted) and glob patterns (sorted), in the order
    given, without repeats. ValueError for an item that names nothing."""
    found: list[Path] = []
    for item in items:
        path = Path(item)
        if path.is_dir():
            files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in extensions)
            if not files:
                raise ValueError(f"the folder {item} holds no {'/'.join(sorted(extensions))} files")
        elif path.is_file():
            files = [path]
        elif glob.has_magic(item):
            files = sorted(Path(p) for p in glob.glob(item, recursive=True) if Path(p).is_file())
            if not files:
                raise ValueError(f"the pattern {item} matches no file")
        else:
            raise ValueError(f"cannot read {item}: no such file or folder")
        found += files
    seen: set[Path] = set()
    return [p for p in found if not (p.resolve() in seen or seen.add(p.resolve()))]


def parse_range(text: str, n: int) -> range:
    """"A:B" (B excluded; either may be left out), as Python slices, within [0, n)."""
    m = re.fullmatch(r"\s*(\d*)\s*:\s*(\d*)\s*", text or "")
    if not m:
        raise ValueError(f"--range must be START:STOP (e.g. 0:100), got {text!r}")
    start = int(m.group(1)) if m.group(1) else 0
    stop = int(m.group(2)) if m.group(2) else n
    if not 0 <= start < stop <= n:
        raise ValueError(f"--range {text} must be within 0:{n} (the npz holds {n} images) and not empty")
    return range(start, stop)


def image_prompts(items: list[str], npz: str | None = None, index_range: str | None = None) -> list[Prompt]:
    """Prompts from image files / folders / globs, then from an ImageNet-64 npz (``index_range`` "A:B")."""
    prompts = [Prompt(str(p), lambda p=p: load_image(p)) for p in expand_paths(items, IMAGE_EXTENSIONS)]
    if npz is not None:
        from data.imagenet64 import ImageNet64

        try:
            images = ImageNet64(npz, "val")
        except (ValueError, OSError) as e:
            raise ValueError(f"cannot read the npz {npz}: {e}") from None
        for i in parse_range(index_range or ":", len(images)):
            prompts.append(Prompt(f"{npz}[{i}]", lambda i=i: tokens_to_image(images[i][None])[0]))
    elif index_range is not None:
        raise ValueError("--range needs --npz (an ImageNet-64 npz to take the images from)")
    return prompts


def audio_prompts(items: list[str]) -> list[Prompt]:
    return [Prompt(str(p), lambda p=p: load_audio(p, SAMPLE_RATE)) for p in expand_paths(items, AUDIO_EXTENSIONS)]


def shard(n_prompts: int, rank: int, world: int) -> list[int]:
    """The prompts of rank ``rank``: rank, rank + world, ... (every prompt in exactly one shard)."""
    if not 0 <= rank < world:
        raise ValueError(f"rank must be in 0..{world - 1}, got {rank}")
    return list(range(rank, n_prompts, world))


def _atomic(path: Path, write: Callable[[Path], object]) -> None:
    """Write ``path`` through ``write(tmp)`` and models.checkpoint.atomic_path: never half a file."""
    with atomic_path(path) as tmp:
        write(tmp)


def _savez(path: Path, arrays: dict) -> None:
    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:  # a file object: np.savez would add ".npz" to a name
            np.savez(f, **arrays)

    _atomic(path, write)


def _save_png(path: Path, image: np.ndarray) -> None:
    from PIL import Image

    _atomic(path, lambda tmp: Image.fromarray(image).save(tmp, format="PNG"))


def _save_wav(path: Path, tokens: np.ndarray) -> None:
    import soundfile as sf

    _atomic(path, lambda tmp: sf.write(str(tmp), tokens_to_pcm16(tokens), SAMPLE_RATE, subtype="PCM_16",
                                       format="WAV"))


def done_samples(out: Path) -> dict[int, np.ndarray]:
    """Sample index -> media, from every readable part (a part is written whole or not at all)."""
    done: dict[int, np.ndarray] = {}
    for part in sorted((out / "parts").glob("r*.npz")):
        try:
            with np.load(part, allow_pickle=False) as z:
                for k, media in zip(z["indices"].tolist(), z["media"], strict=True):
                    done[int(k)] = media
        except (OSError, ValueError, KeyError, zipfile.BadZipFile):
            continue  # not ours, or unreadable: its samples are made again
    return done


@dataclass
class BatchRun:
    """What to sample: ``kind`` "image" or "audio", the prompts, the samples per prompt and their seeds."""

    kind: str
    prompts: list[Prompt]
    num_samples: int
    seed: int
    options: SamplingOptions
    batch_size: int
    prompt_rows: int = 32  # image
    prompt_seconds: float | None = None  # audio: the prompts' first seconds (default all)
    samples: int | None = None  # audio: samples generated per clip (default what the context leaves, <= 65,536)

    @property
    def total(self) -> int:
        return len(self.prompts) * self.num_samples

    def prompt_tokens(self, media: np.ndarray) -> np.ndarray:
        if self.kind == "image":
            return image_to_tokens(media)[: self.prompt_rows * ROW_TOKENS]
        if self.prompt_seconds is not None:
            media = media[: max(1, round(self.prompt_seconds * SAMPLE_RATE))]
        return mu_law_encode(media)

    def batches(self, model, mine: list[int], done: set[int]) -> Iterator[tuple[list[int], torch.Tensor, int]]:
        """(sample indices, prompt tokens [B, P], length) of each batch of this rank's samples not yet done."""
        tokens: dict[int, np.ndarray] = {}
        for i in mine:
            if any(i * self.num_samples + j not in done for j in range(self.num_samples)):
                tokens[i] = self.prompt_tokens(self.prompts[i].load())
        if self.kind == "audio":
            context = model.cfg.seq_len
            longest = max((len(t) for t in tokens.values()), default=0)
            if self.samples is None:
                self.samples = min(65_536, context - longest)
            for i, t in tokens.items():
                if len(t) + self.samples > context:
                    raise ValueError(f"the prompt {self.prompts[i].source} ({len(t)} samples) and --samples "
                                     f"{self.samples} do not fit the model's context of {context} samples; use "
                                     "--prompt-seconds or fewer --samples")
        # units in order of prompt length (one length per batch), then sample index
        units = sorted((len(tokens[i]), i * self.num_samples + j) for i in tokens for j in range(self.num_samples)
                        if i * self.num_samples + j not in done)
        while units:
            P = units[0][0]
            chunk = [k for p, k in units[: self.batch_size] if p == P]
            units = units[len(chunk):]
            prompt = torch.from_numpy(np.stack([tokens[k // self.num_samples] for k in chunk])).long()
            yield chunk, prompt, IMAGE_TOKENS if self.kind == "image" else P + self.samples

    def file(self, k: int) -> str:
        i, j = divmod(k, self.num_samples)
        stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(self.prompts[i].source.split("[")[0]).stem)[:40]
        return f"p{i:05d}_{stem}/sample_{j:03d}.{'png' if self.kind == 'image' else 'wav'}"


def sample_shard(run: BatchRun, model, out: Path, rank: int = 0, world: int = 1,
                 on_batch: Callable[[int, int], None] | None = None) -> int:
    """Sample this rank's prompts that are not done yet, writing each batch as it finishes; returns the number
    of samples made now. ``on_batch(done_now, todo)`` reports progress."""
    (out / "parts").mkdir(parents=True, exist_ok=True)
    mine = shard(len(run.prompts), rank, world)
    done = set(done_samples(out))
    todo = sum(1 for i in mine for j in range(run.num_samples) if i * run.num_samples + j not in done)
    made = 0
    for chunk, prompt, length in run.batches(model, mine, done):
        seeds = [run.seed + k for k in chunk]
        *_, last = generate(model, prompt, length, seeds, run.options, report_every=length)
        tokens = last.tokens.cpu().numpy().astype(np.uint8)
        media = tokens_to_image(tokens) if run.kind == "image" else tokens
        for k, m in zip(chunk, media, strict=True):
            path = out / run.file(k)
            path.parent.mkdir(exist_ok=True)
            (_save_png if run.kind == "image" else _save_wav)(path, m)
        _savez(out / "parts" / f"r{rank}-{chunk[0]:08d}.npz", {"indices": np.array(chunk, np.int64), "media": media})
        made += len(chunk)
        if on_batch:
            on_batch(made, todo)
    return made


def assemble(run: BatchRun, out: Path, settings: dict) -> dict | None:
    """samples.npz and manifest.json from the parts, when every sample is done (else None)."""
    done = done_samples(out)
    if len(done) < run.total or any(k not in done for k in range(run.total)):
        return None
    media = [done[k] for k in range(run.total)]
    if run.kind == "image":
        arrays = {"samples": np.stack(media)}
    else:
        lengths = np.array([len(m) for m in media], np.int64)
        pcm = np.zeros((run.total, int(lengths.max())), np.int16)
        for n, m in enumerate(media):
            pcm[n, : len(m)] = tokens_to_pcm16(m)
        arrays = {"samples": pcm, "lengths": lengths, "sample_rate": np.array(SAMPLE_RATE)}
    arrays |= {"prompt_index": np.arange(run.total) // run.num_samples,
               "seeds": run.seed + np.arange(run.total, dtype=np.int64)}
    _savez(out / "samples.npz", arrays)
    manifest = {"kind": run.kind, "settings": settings, "num_prompts": len(run.prompts),
                "num_samples_per_prompt": run.num_samples, "samples_npz": "samples.npz",
                "prompts": [p.source for p in run.prompts],
                "samples": [{"index": k, "prompt_index": k // run.num_samples,
                             "prompt": run.prompts[k // run.num_samples].source, "seed": run.seed + k,
                             "file": run.file(k)} for k in range(run.total)],
                "assembled": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    _atomic(out / "manifest.json", lambda tmp: tmp.write_text(json.dumps(manifest, indent=2) + "\n"))
    return manifest
