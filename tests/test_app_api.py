"""The app's API (/sample_image, /sample_audio) through gradio_client: sample.py's option names and defaults,
results that `sample.py --from-json` makes again bit for bit (and a warning when the weights differ), the audio
clip sent as it grows, and the documented example of docs/app.md run as written."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError
from helpers import running_app, tiny_checkpoint
from PIL import Image

import app.handlers
import app.history
import sample
from app.history import History, HistoryEntry
from app.ui import EXAMPLES
from sampling.recipe import FORMAT, OPTIONS, read_recipe

HOUSE = EXAMPLES / "house.png"
CHIME = EXAMPLES / "chime.flac"
DOCS = Path(__file__).resolve().parents[1] / "docs" / "app.md"


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("checkpoints")
    tiny_checkpoint(d / "image64", "image", steps=3)
    tiny_checkpoint(d / "audio12k", "audio", steps=4)  # a context of 4,096 samples
    return d


@pytest.fixture(scope="module")
def url(checkpoints) -> str:
    with running_app(checkpoints) as url:
        yield url


@pytest.fixture
def client(url, tmp_path) -> Client:
    c = Client(url, analytics_enabled=False, verbose=False, download_files=str(tmp_path / "downloads"))
    yield c
    c.close()


def pixels(path: str | Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def cli(*args: object) -> int:
    return sample.main([str(a) for a in args] + ["--quiet", "--device", "cpu"])


def test_the_api_takes_sample_py_options_under_its_names_and_defaults(client):
    endpoints = client.view_api(return_format="dict", print_info=False)["named_endpoints"]
    assert {"/sample_image", "/sample_audio", "/crop_preview"} <= set(endpoints)
    assert "/complete_image" not in endpoints  # the page's own events are callable but undocumented
    for kind in ("image", "audio"):
        params = {p["parameter_name"]: p for p in endpoints[f"/sample_{kind}"]["parameters"]}
        cli_defaults = vars(sample.parse_args([kind]))
        for name in OPTIONS[kind]:  # every option a recipe (and sample.py) has, with sample.py's default
            assert params[name]["parameter_has_default"], name
            assert params[name]["parameter_default"] == cli_defaults[name], name
        assert params["prompt"]["parameter_default"] is None and params["checkpoint"]["parameter_default"] is None
        assert "sample.py" in endpoints[f"/sample_{kind}"]["description"]


def test_an_image_result_is_made_again_by_sample_py_from_its_json(client, checkpoints, tmp_path, capsys):
    job = client.submit(handle_file(str(HOUSE)), prompt_rows=60, num_samples=2, seed=5, top_k=None, top_p=None,
                        api_name="/sample_image")
    grid, samples, settings, status = job.result(timeout=120)
    assert len(job.outputs()) >= 2 and job.outputs()[0][2] is None  # previews first, the settings at the end
    assert "seeds 5–6" in status and [Path(p).name for p in samples] == ["sample_1_seed_5.png", "sample_2_seed_6.png"]
    recipe = json.loads(Path(settings).read_text())
    assert recipe["format"] == FORMAT and recipe["kind"] == "image" and recipe["seeds"] == [5, 6]
    assert recipe["settings"] == {"prompt_rows": 60, "num_samples": 2, "temperature": 1.0, "top_k": None,
                                  "top_p": None, "seed": 5}
    assert recipe["checkpoint"]["name"] == "image64" and len(recipe["checkpoint"]["weights_sha256"]) == 64
    # the JSON alone does not carry the prompt: sample.py says so, and takes --prompt
    assert cli("--from-json", settings, "--out-dir", tmp_path / "no") == 2
    assert "the prompt original.png named by" in capsys.readouterr().err
    out = tmp_path / "again"
    assert cli("--from-json", settings, "--prompt", HOUSE, "--checkpoint", checkpoints / "image64",
               "--out-dir", out) == 0
    for i, made in enumerate(samples):
        assert np.array_equal(pixels(out / f"sample_{i:03d}.png"), pixels(made))
    meta = json.loads((out / "metadata.json").read_text())
    assert meta["from_json"]["weights_match"] and meta["seeds"] == [5, 6]
    # explicit flags win over the JSON's settings
    assert cli("image", "--from-json", settings, "--prompt", HOUSE, "--checkpoint", checkpoints / "image64",
               "--num-samples", 1, "--seed", 6, "--out-dir", tmp_path / "one") == 0
    assert np.array_equal(pixels(tmp_path / "one" / "sample_000.png"), pixels(samples[1]))
    # other weights: the run goes ahead, and says that its samples will differ
    other = json.loads(Path(settings).read_text())
    other["checkpoint"]["weights_sha256"] = "0" * 64
    (tmp_path / "other.json").write_text(json.dumps(other))
    assert cli("--from-json", tmp_path / "other.json", "--prompt", HOUSE, "--checkpoint", checkpoints / "image64",
               "--out-dir", tmp_path / "other") == 0
    assert "are not the ones" in capsys.readouterr().err
    assert not json.loads((tmp_path / "other" / "metadata.json").read_text())["from_json"]["weights_match"]


def test_an_audio_result_streams_and_is_made_again_from_its_json(client, checkpoints, tmp_path, monkeypatch):
    monkeypatch.setattr(app.handlers, "STREAM_SAMPLES", 1024)
    job = client.submit(handle_file(str(CHIME)), prompt_seconds=0.1, samples=2800, seed=3, top_k=40,
                        api_name="/sample_audio")
    clip, clips, settings, status = job.result(timeout=120)
    growing = [sf.info(out[0]).frames for out in job.outputs()[:-1] if out[0] is not None]
    assert len(growing) >= 2 and growing == sorted(growing) and growing[-1] < 1200 + 2800  # the clip as it grew
    assert sf.info(clip).frames == 1200 + 2800 and clips == [clip] and "after a 0.10 s prompt" in status
    recipe = read_recipe(settings)
    assert recipe["settings"]["samples"] == 2800 and recipe["settings"]["top_k"] == 40
    assert recipe["settings"]["prompt_seconds"] == 0.1 and recipe["prompt"].name == "prompt.wav"
    out = tmp_path / "again"
    assert cli("--from-json", settings, "--prompt", CHIME, "--checkpoint", checkpoints / "audio12k",
               "--out-dir", out) == 0
    assert np.array_equal(sf.read(out / "sample_000.wav", dtype="int16")[0], sf.read(clip, dtype="int16")[0])


def test_the_api_refuses_bad_options_with_sample_py_names(client):
    for kwargs, message in ((dict(top_k=0.5), "Top-k must be a whole number"),
                            (dict(seed=-1), "seed must be a whole number from 0"),
                            (dict(checkpoint="nope"), "no image model called 'nope'")):
        with pytest.raises(AppError, match=message):
            client.predict(api_name="/sample_image", prompt_rows=0, num_samples=1, **kwargs)
    with pytest.raises(AppError, match="prompt_seconds needs a prompt"):
        client.predict(prompt_seconds=1.0, api_name="/sample_audio")


def test_the_documented_client_example_runs(url, checkpoints, tmp_path, monkeypatch):
    """docs/app.md's example, run as written (only the URL and the checkpoint folder are this test's)."""
    code = re.search(r"```python\n(# example: gradio_client\n.*?)```", DOCS.read_text(), re.S).group(1)
    monkeypatch.chdir(tmp_path)
    shutil.copy(HOUSE, tmp_path / "house.png")
    env = {"__name__": "example"}
    exec(compile(code.replace("http://127.0.0.1:7860/", url), str(DOCS), "exec"), env)  # noqa: S102
    assert Path(env["grid"]).is_file() and len(env["samples"]) == 2 and Path(env["settings"]).is_file()


def test_a_session_keeps_its_last_results_and_deletes_the_older_ones(tmp_path):
    history = History(tmp_path / "h")
    entries = []
    for i in range(app.history.HISTORY_SIZE + 2):
        folder = history.new_folder()
        (folder / "settings.json").write_text("{}")
        entries = history.add(entries, HistoryEntry("image", folder, folder / "settings.json", [],
                                                    folder / "settings.json", f"run {i}", {"seed": i}, "m"))
    assert len(entries) == app.history.HISTORY_SIZE and entries[0].status == f"run {app.history.HISTORY_SIZE + 1}"
    assert len(list((tmp_path / "h").iterdir())) == app.history.HISTORY_SIZE
    assert history.clear(entries) == [] and not any((tmp_path / "h").iterdir())


@pytest.mark.parametrize("kind", ["image", "audio"])
def test_a_history_download_is_made_again_by_sample_py(kind, checkpoints, tmp_path, monkeypatch):
    """The zip the History tab offers, unzipped anywhere: `sample.py --from-json settings.json` needs nothing else
    (the prompt is in it: the 64x64 crop, or the audio prompt as float samples) but the checkpoint."""
    import torch

    from app.registry import Registry

    studio = app.handlers.Studio(Registry(checkpoints, torch.device("cpu")), History(tmp_path / "history"))
    if kind == "image":
        job = studio.image_job({"path": str(HOUSE)}, 61, 2, 0.9, None, 0.95, 11, None)
        entry = list(studio.run_images(job, lambda *a, **k: None))[-1]
    else:
        job = studio.audio_job({"path": str(CHIME)}, 0.05, 700, 2, 1.0, 30, None, 4, None)
        entry = list(studio.run_audio(job, lambda *a, **k: None))[-1]
    assert isinstance(entry, HistoryEntry) and entry.kind == kind
    unpacked = tmp_path / "unpacked"
    shutil.unpack_archive(entry.bundle(), unpacked)
    assert (unpacked / "settings.json").is_file() and len(list(unpacked.iterdir())) == 4  # json, 2 samples, prompt
    monkeypatch.chdir(unpacked)
    out = tmp_path / "again"
    assert cli("--from-json", "settings.json", "--checkpoint", checkpoints / f"{kind}64" if kind == "image"
               else checkpoints / "audio12k", "--out-dir", out) == 0
    for i, made in enumerate(entry.media):
        if kind == "image":
            assert np.array_equal(pixels(out / f"sample_{i:03d}.png"), pixels(made))
        else:
            assert np.array_equal(sf.read(out / f"sample_{i:03d}.wav", dtype="int16")[0],
                                  sf.read(made, dtype="int16")[0])
