"""The programmatic API: /sample_image and /sample_audio take sample.py's options under sample.py's names and
defaults (None = "not given": temperature, top_k and top_p are then the model card's sampling defaults, as in
sample.py, and prompt_rows, prompt_seconds and samples follow the prompt), so that a program moves between the page,
gradio_client and sample.py without translating anything.

Both are generators: gradio_client's ``job.outputs()`` holds the previews (and the growing clip), ``job.result()``
the final files. Each result comes with its settings JSON, which ``python sample.py --from-json`` reads back.
The page's own events (/complete_image, /generate_audio) stay callable but undocumented: their arguments
follow the page's controls (a "Random seed" box, a "Start" choice), not sample.py.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import gradio as gr
from gradio.data_classes import FileData
from PIL import Image

from media.audio import SAMPLE_RATE, save_wav

from .handlers import MAX_SEED, HistoryEntry, Studio, _whole


def _file(path: str | Path) -> FileData:
    return FileData(path=str(path), orig_name=Path(path).name)


def _upload(value: FileData | dict | None) -> dict | None:
    if value is None:
        return None
    if isinstance(value, FileData):
        return {"path": value.path, "orig_name": value.orig_name}
    return value


def api_functions(studio: Studio) -> tuple:
    """(sample_image, sample_audio) bound to ``studio``, typed and documented for gr.api."""

    def sample_image(prompt: FileData | None = None, prompt_rows: int | None = None, num_samples: int = 4,
                     temperature: float | None = None, top_k: int | None = None, top_p: float | None = None,
                     seed: int = 0, checkpoint: str | None = None
                     ) -> Iterator[tuple[FileData, list[FileData], FileData | None, str]]:
        """Complete a 64x64 image from its top rows (or sample one from scratch), as `python sample.py image` does.

        Yields (grid, samples, settings, status): previews of the grid while sampling, then the grid
        (prompt | samples | original, enlarged 4x), the samples as 64x64 PNGs (sample i uses seed + i), the
        settings JSON (for `sample.py --from-json`) and a status line.

        Args:
            prompt: image to complete (any format; centre-cropped to 64x64); None samples from scratch
            prompt_rows: rows of the prompt kept, 0..63 (default 32 with a prompt, 0 without)
            num_samples: how many samples, 1..8 (default 4)
            temperature: 0 = greedy, up to 2 (default None: the model card's, else 1.0)
            top_k: keep the k likeliest values, 1..256, 0 = off (default None: the model card's, else off)
            top_p: keep the likeliest values up to this mass, in (0, 1], 1 = off (default None: the card's, else off)
            seed: sample i uses seed + i (default 0)
            checkpoint: the image model's name (see the Models tab); None = the first one
        """
        seed = _whole("seed", seed, 0, MAX_SEED)
        rows = prompt_rows if prompt_rows is not None else (32 if prompt is not None else 0)
        job = studio.image_job(_upload(prompt), rows, num_samples, temperature, top_k, top_p, seed, checkpoint)
        previews = studio.history.new_folder()
        try:
            for i, out in enumerate(studio.run_images(job, _no_progress)):
                if isinstance(out, HistoryEntry):
                    studio.history.add_api(out)
                    yield _file(out.picture), [_file(p) for p in out.media], _file(out.recipe), out.status
                else:
                    preview = previews / f"preview_{i}.png"
                    Image.fromarray(out[0]).save(preview, format="PNG")
                    yield _file(preview), [], None, out[1]
        finally:
            studio.history.remove_later(previews)

    def sample_audio(prompt: FileData | None = None, prompt_seconds: float | None = None,
                     samples: int | None = None, num_samples: int = 1, temperature: float | None = None,
                     top_k: int | None = None, top_p: float | None = None, seed: int = 0,
                     checkpoint: str | None = None
                     ) -> Iterator[tuple[FileData | None, list[FileData], FileData | None, str]]:
        """Generate 12 kHz audio, or continue a clip, as `python sample.py audio` does.

        Yields (clip, clips, settings, status): while sampling, the first clip as it grows (a 16-bit WAV every
        0.5 s of audio) and a status line; then the first clip, every clip (prompt + continuation, 16-bit WAV,
        sample i uses seed + i), the settings JSON (for `sample.py --from-json`) and a status line.

        Args:
            prompt: audio file to continue (any rate and channels); None generates from scratch
            prompt_seconds: use the prompt's first seconds (default all of it)
            samples: samples to generate after the prompt (default 65,536, or what the model's context leaves)
            num_samples: how many clips, 1..8 (default 1)
            temperature: 0 = greedy, up to 2 (default None: the model card's, else 1.0)
            top_k: keep the k likeliest values, 1..256, 0 = off (default None: the model card's, else off)
            top_p: keep the likeliest values up to this mass, in (0, 1], 1 = off (default None: the card's, else off)
            seed: sample i uses seed + i (default 0)
            checkpoint: the audio model's name (see the Models tab); None = the first one
        """
        seed = _whole("seed", seed, 0, MAX_SEED)
        if samples is not None:
            samples = _whole("samples", samples, 1, 1 << 24)
        if prompt_seconds is not None and prompt is None:
            raise gr.Error("prompt_seconds needs a prompt (a clip to continue)")
        job = studio.audio_job(_upload(prompt), prompt_seconds, samples, num_samples, temperature, top_k, top_p,
                               seed, checkpoint, "samples", samples)
        previews = studio.history.new_folder()
        try:
            for out in studio.run_audio(job, _no_progress):
                if isinstance(out, HistoryEntry):
                    studio.history.add_api(out)
                    yield _file(out.media[0]), [_file(p) for p in out.media], _file(out.recipe), out.status
                elif out[1] is not None:
                    wav = save_wav(previews / f"partial_{len(out[1])}.wav", out[1], SAMPLE_RATE)
                    yield _file(wav), [], None, out[2]
        finally:
            studio.history.remove_later(previews)

    return sample_image, sample_audio


def _no_progress(*args, **kwargs) -> None:
    pass
