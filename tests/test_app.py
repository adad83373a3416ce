"""The web app through gradio_client, launched on a free local port with tiny checkpoints made here:
image completion keeps the prompt rows, audio has the requested length, bad input comes back as
errors while the server keeps serving, four clients queue and all finish, a cancelled job stops."""

from __future__ import annotations

import os
import threading
import time
from dataclasses import replace
from pathlib import Path

import httpx
import numpy as np
import pytest
import soundfile as sf
import torch
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError
from helpers import free_port, long_tone_with_counted_reads, running_app, tiny_checkpoint
from PIL import Image

import app.handlers
from app.cards import card_markdown
from app.registry import Registry
from app.ui import EXAMPLES, QUEUE_SIZE, build_demo, launch
from media.audio import load_audio, mu_law_encode, tokens_to_pcm16
from media.image import load_image

ROWS = 60  # prompt rows: 4 rows (768 tokens) to sample per image
HOUSE = EXAMPLES / "house.png"
CHIME = EXAMPLES / "chime.flac"


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("checkpoints")
    tiny_checkpoint(d / "image-a", "image", steps=3, held_out_bits_per_dim=7.5)
    tiny_checkpoint(d / "image-b", "image")
    tiny_checkpoint(d / "audio", "audio", steps=4)  # a context of 4,096 samples
    return d


@pytest.fixture(scope="module")
def url(checkpoints) -> str:
    with running_app(checkpoints) as url:
        yield url


@pytest.fixture
def client(url, tmp_path) -> Client:
    c = Client(url, analytics_enabled=False, verbose=False, download_files=str(tmp_path))
    yield c
    c.close()


def complete(client: Client, picture: Path | None = HOUSE, rows: int = ROWS, samples: int = 2, seed: int = 5,
             model: str = "image-a", **kw):
    """Submit an image completion (temperature 1, top-k and top-p off unless given); returns the job."""
    args = dict(temperature=1.0, top_k=0, top_p=1.0) | kw
    return client.submit(handle_file(str(picture)) if picture else None, rows, args["temperature"], samples, seed,
                         False, args["top_k"], args["top_p"], model, api_name="/complete_image")


def generate(client: Client, mode: str = "From scratch", clip: Path | None = None, prompt_s: float = 0.1,
             length_s: float = 0.1, seed: int = 3, model: str = "audio", top_k: int | None = 0,
             top_p: float | None = 1.0):
    return client.submit(mode, handle_file(str(clip)) if clip else None, prompt_s, length_s, 1.0, seed, False, top_k,
                         top_p, model, api_name="/generate_audio")


def png(path: str) -> np.ndarray:
    with Image.open(path) as im:
        assert im.format == "PNG" and im.mode == "RGB"
        return np.asarray(im)


def test_image_completion_keeps_the_prompt_rows(client):
    job = complete(client, samples=2, seed=5)
    grid, gallery, seed, status = job.result(timeout=120)
    assert len(job.outputs()) >= 2  # a preview while sampling, then the result
    assert seed == 5 and "seeds 5–6" in status
    original = load_image(HOUSE)
    assert [item["caption"] for item in gallery] == ["prompt", "seed 5", "seed 6", "original"]
    prompt, first, second, shown = (png(item["image"]) for item in gallery)
    assert np.array_equal(shown, original)
    assert np.array_equal(prompt[:ROWS], original[:ROWS]) and not prompt[ROWS:].any()
    for sample in (first, second):
        assert sample.shape == (64, 64, 3) and np.array_equal(sample[:ROWS], original[:ROWS])
    assert not np.array_equal(first, second)
    assert [Path(item["image"]).name for item in gallery][1:3] == ["sample_1_seed_5.png", "sample_2_seed_6.png"]
    assert png(grid).shape == (256, 4 * 256 + 3 * 4, 3)  # prompt | 2 samples | original, 4x
    again = complete(client, samples=1, seed=6, model="image-b").result(timeout=120)[1]  # same weights as image-a
    assert np.array_equal(png(again[1]["image"]), second)  # sample i depends on its seed only


def test_the_api_takes_none_as_off_for_top_k_and_top_p(client):
    """None is "off" for top-k / top-p, on the page's own events and on the documented API (whose names and
    defaults are sample.py's: tests/test_app_api.py)."""
    first = complete(client, samples=1, seed=5).result(timeout=120)[1][1]  # top-k 0 and top-p 1: off
    with_none = complete(client, samples=1, seed=5, top_k=None, top_p=None).result(timeout=120)[1][1]
    assert np.array_equal(png(with_none["image"]), png(first["image"]))
    by_name = client.submit(prompt=handle_file(str(HOUSE)), prompt_rows=ROWS, num_samples=1, seed=5, top_k=None,
                            top_p=None, checkpoint="image-a", api_name="/sample_image").result(timeout=120)[1]
    assert np.array_equal(png(by_name[0]), png(first["image"]))  # the same sample through the API
    _, wav_file, _, status = generate(client, length_s=0.05, seed=3, top_k=None, top_p=None).result(timeout=120)
    assert "from scratch" in status and sf.info(wav_file).frames == 600


def test_the_crop_preview_shows_where_the_prompt_ends(client):
    preview = png(client.predict(handle_file(str(HOUSE)), 40, api_name="/crop_preview"))
    assert preview.shape == (256, 256, 3)
    assert (preview[40 * 4 - 1] == (255, 0, 0)).all()
    assert np.array_equal(preview[0:156:4, ::4], load_image(HOUSE)[:39])  # the prompt rows, enlarged 4x


def wav(path: str) -> tuple[np.ndarray, sf._SoundFileInfo]:
    return sf.read(path, dtype="int16")[0], sf.info(path)


def test_audio_has_the_requested_length(client):
    picture, audio, seed, status = generate(client, length_s=0.1).result(timeout=120)
    samples, info = wav(audio)
    assert (info.samplerate, info.channels, info.subtype, info.frames) == (12000, 1, "PCM_16", 1200)
    assert seed == 3 and "from scratch" in status and Path(audio).name == "generated_seed_3.wav"
    assert png(picture).shape[2] == 3

    job = generate(client, "Continue a clip", CHIME, prompt_s=0.1, length_s=0.05)
    picture, audio, _, status = job.result(timeout=120)
    samples, info = wav(audio)
    assert info.frames == 1200 + 600 and "after a 0.10 s prompt" in status
    prompt = tokens_to_pcm16(mu_law_encode(load_audio(CHIME)[:1200]))
    assert np.array_equal(samples[:1200], prompt)  # the prompt as the model heard it, then the continuation


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("bad")
    (d / "text.png").write_text("not a picture")
    (d / "cut.png").write_bytes(HOUSE.read_bytes()[:200])
    Image.new("1", (9000, 8000)).save(d / "huge.png")  # 72 million pixels in a few KB
    sf.write(d / "empty.wav", np.zeros(0, np.int16), 12000)
    (d / "noise.wav").write_bytes(b"RIFF" + os.urandom(300))
    sf.write(d / "silent.wav", np.zeros(6000, np.int16), 12000)
    return d


IMAGE_ERRORS = {
    "not an image": (dict(picture="text.png"), "cannot read image text.png"),
    "corrupt image": (dict(picture="cut.png"), "cannot read image cut.png"),
    "huge image": (dict(picture="huge.png"), "72,000,000 pixels, more than the limit"),
    "prompt rows past the image": (dict(rows=64), "Prompt rows must be a whole number from 0 to 63, got 64"),
    "too many samples": (dict(samples=9), "Number of samples must be a whole number from 1 to 8, got 9"),
    "negative temperature": (dict(temperature=-1), "Temperature must be a number from 0 to 2"),
    "top-p zero": (dict(top_p=0.0), "Top-p must be above 0"),
    "seeds past the largest": (dict(seed=2**31 - 1), "Seed must be at most 2147483646 with 2 samples"),
    "unknown model": (dict(model="nope"), "no image model called 'nope'; the image models are ['image-a', 'image-b']"),
    "audio model for images": (dict(model="audio"), "no image model called 'audio'"),
    "prompt rows without a picture": (dict(picture=None), "Upload a picture"),
}
AUDIO_ERRORS = {
    "empty clip": (dict(clip="empty.wav"), "cannot read audio empty.wav"),
    "corrupt clip": (dict(clip="noise.wav"), "cannot read audio noise.wav"),
    "silent clip": (dict(clip="silent.wav", prompt_s=1.0), "silent.wav is silent"),  # all 0.5 s of it read
    "silent prompt": (dict(clip="silent.wav"), "the first 0.10 s of silent.wav are silent"),  # only 0.1 s read
    "no clip to continue": (dict(clip=None), "Upload a clip to continue"),
    "longer than the context": (dict(mode="From scratch", length_s=1.0),
                                "Length must be above 0 and at most 0.34 seconds"),
    "prompt and length past the context": (dict(prompt_s=0.3, length_s=0.1), "after a 0.30 s prompt"),
    "image model for audio": (dict(model="image-a"), "no audio model called 'image-a'"),
}


@pytest.mark.parametrize("case", IMAGE_ERRORS)
def test_bad_image_input_is_an_error(case, client, bad_files):
    args, message = IMAGE_ERRORS[case]
    if isinstance(args.get("picture"), str):
        args = args | {"picture": bad_files / args["picture"]}
    with pytest.raises(AppError) as e:
        complete(client, **args).result(timeout=60)
    assert message in str(e.value)


@pytest.mark.parametrize("case", AUDIO_ERRORS)
def test_bad_audio_input_is_an_error(case, client, bad_files):
    args, message = AUDIO_ERRORS[case]
    args = {"mode": "Continue a clip", "clip": CHIME} | args
    if isinstance(args["clip"], str):
        args["clip"] = bad_files / args["clip"]
    with pytest.raises(AppError) as e:
        generate(client, **args).result(timeout=60)
    assert message in str(e.value)


def test_a_long_upload_is_decoded_only_as_far_as_the_prompt(client, tmp_path, monkeypatch):
    sr = 192000
    frames = long_tone_with_counted_reads(tmp_path / "long.flac", monkeypatch, sr=sr)
    _, wav, _, status = generate(client, mode="Continue a clip", clip=tmp_path / "long.flac", prompt_s=0.1,
                                 length_s=0.01).result(timeout=60)
    assert "after a 0.10 s prompt" in status
    assert 0.1 * sr <= sum(frames) <= 0.15 * sr  # the prompt's 0.1 s (and the resampler's margin), not 20 s


def test_the_server_keeps_serving_after_errors(client, bad_files):
    with pytest.raises(AppError):
        complete(client, picture=bad_files / "text.png").result(timeout=60)
    grid, gallery, _, _ = complete(client, samples=1).result(timeout=120)
    assert len(gallery) == 3


def test_four_concurrent_clients_queue_and_all_finish(url, tmp_path):
    clients = [Client(url, analytics_enabled=False, verbose=False, download_files=str(tmp_path / str(i)))
               for i in range(4)]
    try:
        jobs = [complete(c, samples=1, seed=10 + i) for i, c in enumerate(clients)]
        ranks = set()
        while not all(j.done() for j in jobs):  # one sampling job at a time: the others wait in the queue
            ranks |= {j.status().rank for j in jobs if j.status().rank is not None}
            time.sleep(0.02)
        results = [j.result(timeout=120) for j in jobs]
    finally:
        for c in clients:
            c.close()
    assert max(ranks, default=0) >= 1
    original = load_image(HOUSE)
    for i, (_, gallery, seed, _) in enumerate(results):
        assert seed == 10 + i and gallery[1]["caption"] == f"seed {10 + i}"
        assert np.array_equal(png(gallery[1]["image"])[:ROWS], original[:ROWS])


def test_a_cancelled_job_stops(client, monkeypatch):
    closed, reports = threading.Event(), []
    real = app.handlers.complete_image

    def watched(*args, **kwargs):  # the sampler's generator, counting reports and noting when it is closed
        try:
            for report in real(*args, **kwargs):
                reports.append(report.done)
                yield report
        finally:
            closed.set()

    monkeypatch.setattr(app.handlers, "complete_image", watched)
    job = complete(client, rows=0, samples=8)  # 8 x 12,288 tokens: far longer than this test waits
    deadline = time.monotonic() + 60
    while not job.outputs() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert job.outputs(), "no preview came back"
    job.cancel()
    assert closed.wait(10), "the sampling generator was not closed"
    stopped_at = len(reports)
    time.sleep(0.5)
    assert len(reports) == stopped_at and reports[-1] < 8 * 12288
    monkeypatch.undo()
    assert len(complete(client, samples=1).result(timeout=60)[1]) == 3  # the queue moves on


def test_the_page_without_checkpoints_says_what_to_do(tmp_path):
    (tmp_path / "broken.json").write_text("{not json")
    for folder in (tmp_path / "missing", tmp_path):
        page = str(build_demo(Registry(folder, torch.device("cpu"))).config)
        assert "No models yet" in page and "python train.py image" in page and "--checkpoints DIR" in page
    assert "could not use broken.json" in page and "not valid JSON" in page


def test_cards_with_fields_of_the_wrong_type_are_listed_as_unusable_and_the_app_starts(checkpoints, tmp_path):
    import json
    import shutil

    for name in ("audio.json", "audio.safetensors"):
        shutil.copy(checkpoints / name, tmp_path / name)
    card = json.loads((checkpoints / "audio.json").read_text())
    for name, bad in (("codec", {"codec": "oops"}), ("weights", {"weights": "oops"}), ("config", {"config": 7})):
        shutil.copy(checkpoints / "audio.safetensors", tmp_path / f"{name}.safetensors")
        (tmp_path / f"{name}.json").write_text(json.dumps(card | bad))
    registry = Registry(tmp_path, torch.device("cpu"))
    assert [e.name for e in registry.entries] == ["audio"]
    config = build_demo(registry).config
    texts = "\n".join(str(c["props"].get("value")) for c in config["components"] if c["type"] == "markdown")
    for name, message in (("codec", "'codec' must be an object or null, got \"oops\""),
                          ("weights", "'weights' must be an object, got \"oops\""),
                          ("config", "'config' must be an object, got 7")):
        assert f"**Could not use** {name}.json: model card" in texts and message in texts, (name, message)


def test_each_tab_has_a_model_selector_only_when_there_is_a_choice(checkpoints):
    config = build_demo(Registry(checkpoints, torch.device("cpu"))).config
    dropdowns = [c["props"] for c in config["components"] if c["type"] == "dropdown"]
    assert [(d["choices"], d["visible"]) for d in dropdowns] == [
        ([("image-a", "image-a"), ("image-b", "image-b")], True), ([("audio", "audio")], False)]
    page = str(config)
    assert "7.500 bits/dim" in page and "Attention layout of image-a" in page  # the models tab


def test_the_server_is_local_private_and_bounded(checkpoints, tmp_path):
    demo = build_demo(Registry(checkpoints, torch.device("cpu")))
    port = free_port()
    launch(demo, "127.0.0.1", port, block=False)
    try:
        assert os.environ["GRADIO_ANALYTICS_ENABLED"] == "False" and os.environ["HF_HUB_OFFLINE"] == "1"
        assert demo.server_name == "127.0.0.1" and demo.share is False and demo.analytics_enabled is False
        assert demo._queue.max_size == QUEUE_SIZE
        big = tmp_path / "big.png"
        big.write_bytes(b"x" * (21 * 1024**2))
        with open(big, "rb") as f:
            answer = httpx.post(f"http://127.0.0.1:{port}/gradio_api/upload", files={"files": f}, timeout=60)
        assert answer.status_code == 413  # over MAX_UPLOAD
    finally:
        demo.close()


def test_app_py_refuses_bad_options(capsys):
    import importlib.util

    spec = importlib.util.spec_from_file_location("app_main", Path(__file__).parents[1] / "app.py")
    main = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(main)
    for argv, message in ((["--port", "70000"], "--port must be in 1..65535"),
                          (["--device", "tpu"], "--device must be auto, cpu, cuda or cuda:N")):
        with pytest.raises(SystemExit) as e:
            main.main(argv)
        assert e.value.code == 2 and message in capsys.readouterr().err


def test_model_cards_show_what_they_have(checkpoints):
    entry = Registry(checkpoints, torch.device("cpu")).entry("image-a", "image")
    full = card_markdown(entry)
    assert "142k parameters" in full and "7.500 bits/dim" in full and "3 steps" in full and "Data" not in full
    card = entry.card | {"evaluation": {"items": 500, "unit": "bits/dim", "model": 3.9, "codecs": {"PNG": 4.9}},
                         "data": {"reader": "ImageNet64", "train_items": 1000}, "tokens_seen": 2_500_000,
                         "compute_pf_days": 0.0123}
    more = card_markdown(replace(entry, card=card))
    for text in ("3.900 bits/dim on 500 items (lossless codecs: PNG 4.900)", "ImageNet64 (1,000 training items)",
                 "2.5M", "0.0123 PF-days"):
        assert text in more
    assert "bfloat16" not in full
    half = card | {"weights": card["weights"] | {"dtype": "bfloat16", "bytes": 290_000}}
    assert "0.3 MB in bfloat16 (computed in float32)" in card_markdown(replace(entry, card=half))
    bare = {k: entry.card[k] for k in ("format", "config", "weights")} | {"parameters": "?"}
    assert card_markdown(replace(entry, card=bare)).startswith("### image-a\n**image** model\n")
