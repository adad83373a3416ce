"""sample.py: image and audio runs end to end on tiny checkpoints, determinism, output folders, bad input."""

from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from helpers import long_tone_with_counted_reads, tiny_checkpoint
from PIL import Image

import sample
from media.image import load_image
from media.pictures import LINE_COLOR
from models import load_model
from models.checkpoint import checkpoint_paths
from sampling import decoding_step

ROWS = 60  # prompt rows: 4 rows (768 tokens) to sample per image keeps the image runs well under a second


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("inputs")
    y, x = np.mgrid[0:80, 0:100]
    picture = np.stack([x * 2, y * 3, (x + y) % 256], -1).astype(np.uint8)  # smooth, not square: gets cropped
    Image.fromarray(picture).save(d / "prompt.png")
    t = np.arange(11025) / 44100  # 0.25 s of stereo at 44.1 kHz
    sf.write(d / "prompt.wav", np.stack([np.sin(2 * np.pi * 220 * t), 0.5 * np.sin(2 * np.pi * 330 * t)], -1) * 0.5,
             44100)
    return {"image": tiny_checkpoint(d / "image", "image", steps=3, held_out_bits_per_dim=7.5),
            "audio": tiny_checkpoint(d / "audio", "audio", steps=4), "png": d / "prompt.png", "wav": d / "prompt.wav"}


def run(*args: object) -> int:
    return sample.main([str(a) for a in args] + ["--quiet", "--device", "cpu"])


def run_image(files, out: Path, *extra: object) -> int:
    return run("image", "--checkpoint", files["image"], "--prompt", files["png"], "--prompt-rows", ROWS,
               "--out-dir", out, *extra)


def pixels(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        assert im.format == "PNG" and im.mode == "RGB"
        return np.asarray(im)


def leftovers(folder: Path) -> list[str]:
    """Hidden temporary folders (.NAME.*.tmp, .NAME.old-*) left next to an output folder."""
    return [p.name for p in folder.iterdir() if p.name.startswith(".")]


def test_image_completion_writes_pngs_grid_and_metadata(files, tmp_path):
    out = tmp_path / "run"
    assert run_image(files, out, "--num-samples", 2, "--batch-size", 2, "--seed", 5) == 0
    names = {"sample_000.png", "sample_001.png", "prompt.png", "original.png", "grid.png", "metadata.json"}
    assert {p.name for p in out.iterdir()} == names and leftovers(tmp_path) == []
    original, prompt = pixels(out / "original.png"), pixels(out / "prompt.png")
    assert np.array_equal(original, load_image(files["png"]))
    assert np.array_equal(prompt[:ROWS], original[:ROWS]) and not prompt[ROWS:].any()
    samples = [pixels(out / f"sample_{i:03d}.png") for i in range(2)]
    for s in samples:
        assert s.shape == (64, 64, 3) and np.array_equal(s[:ROWS], original[:ROWS])
    assert not np.array_equal(samples[0], samples[1])
    grid = pixels(out / "grid.png")  # prompt | 2 samples | original, 4x, 4-pixel gaps
    assert grid.shape == (256, 4 * 256 + 3 * 4, 3)
    assert np.array_equal(grid[::4, 260:516:4], samples[0]) and np.array_equal(grid[::4, 780::4], original)
    assert (grid[ROWS * 4 - 1] == LINE_COLOR).all()  # the line where the prompt ends
    meta = json.loads((out / "metadata.json").read_text())
    card = json.loads(checkpoint_paths(files["image"])[1].read_text())
    assert meta["seeds"] == [5, 6] and [o["seed"] for o in meta["outputs"]] == [5, 6]
    assert meta["checkpoint"]["weights_sha256"] == card["weights"]["sha256"]
    assert meta["checkpoint"]["steps"] == 3 and meta["checkpoint"]["held_out_bits_per_dim"] == 7.5
    assert meta["arguments"]["prompt_rows"] == ROWS and meta["arguments"]["temperature"] == 1.0
    assert meta["device"] == "cpu" and set(meta["versions"]) == {"python", "torch", "numpy"}
    assert meta["decoding_step"] == decoding_step(load_model(files["image"]))
    timings = meta["timings"]
    assert timings["tokens_sampled"] == 2 * (64 - ROWS) * 192
    assert timings["sampling_seconds"] > 0 and timings["tokens_per_second"] > 0 and timings["total_seconds"] > 0
    assert meta["files"] == sorted(names)


def test_the_same_seed_gives_the_same_images_whatever_the_batch_size(files, tmp_path):
    runs = {"b2": ("--batch-size", 2), "b2-again": ("--batch-size", 2), "b1": ("--batch-size", 1)}
    for name, extra in runs.items():
        assert run_image(files, tmp_path / name, "--num-samples", 2, "--seed", 7, *extra) == 0
    for i in range(2):
        first = pixels(tmp_path / "b2" / f"sample_{i:03d}.png")
        for name in ("b2-again", "b1"):
            assert np.array_equal(first, pixels(tmp_path / name / f"sample_{i:03d}.png")), (name, i)
    assert run_image(files, tmp_path / "other", "--num-samples", 1, "--seed", 8) == 0
    assert np.array_equal(pixels(tmp_path / "other" / "sample_000.png"), pixels(tmp_path / "b1" / "sample_001.png"))


def test_image_sampling_from_scratch_without_a_prompt(files, tmp_path):
    out = tmp_path / "scratch"
    assert run("image", "--checkpoint", files["image"], "--num-samples", 1, "--temperature", 0, "--out-dir", out) == 0
    assert sorted(p.name for p in out.iterdir()) == ["grid.png", "metadata.json", "sample_000.png"]
    assert pixels(out / "grid.png").shape == (256, 256, 3)


def wav(path: Path) -> tuple[np.ndarray, object]:
    return sf.read(path, dtype="int16")[0], sf.info(path)


def test_audio_continues_a_prompt(files, tmp_path):
    out = tmp_path / "cont"
    assert run("audio", "--checkpoint", files["audio"], "--prompt", files["wav"], "--prompt-seconds", 0.1,
               "--samples", 500, "--num-samples", 2, "--top-k", 50, "--out-dir", out) == 0
    assert sorted(p.name for p in out.iterdir()) == ["metadata.json", "prompt.wav", "sample_000.wav",
                                                     "sample_001.wav"]
    prompt, info = wav(out / "prompt.wav")
    assert (info.samplerate, info.channels, info.subtype, info.frames) == (12000, 1, "PCM_16", 1200)
    assert np.abs(prompt).max() > 1000  # the sine, not silence
    for i in range(2):
        audio, info = wav(out / f"sample_{i:03d}.wav")
        assert (info.samplerate, info.channels, info.subtype, info.frames) == (12000, 1, "PCM_16", 1200 + 500)
        assert np.array_equal(audio[:1200], prompt)
    meta = json.loads((out / "metadata.json").read_text())
    assert meta["seeds"] == [0, 1] and meta["timings"]["tokens_sampled"] == 1000
    assert meta["arguments"]["samples"] == 500 and meta["arguments"]["top_k"] == 50


def test_a_long_prompt_is_decoded_only_for_its_prompt_seconds(files, tmp_path, monkeypatch):
    sr = 192000
    frames = long_tone_with_counted_reads(tmp_path / "long.flac", monkeypatch, sr=sr)
    assert run("audio", "--checkpoint", files["audio"], "--prompt", tmp_path / "long.flac", "--prompt-seconds", 0.1,
               "--samples", 10, "--out-dir", tmp_path / "out") == 0
    assert 0.1 * sr <= sum(frames) <= 0.15 * sr  # 0.1 s (and the resampler's margin) of the 20 s file
    assert sf.info(tmp_path / "out" / "prompt.wav").frames == 1200


def test_audio_from_scratch_defaults_to_the_model_context_in_a_timestamped_folder(files, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert run("audio", "--checkpoint", files["audio"]) == 0
    (out,) = (tmp_path / "out").iterdir()
    assert re.fullmatch(r"audio-\d{8}-\d{6}", out.name)
    assert sorted(p.name for p in out.iterdir()) == ["metadata.json", "sample_000.wav"]
    _, info = wav(out / "sample_000.wav")
    assert (info.samplerate, info.subtype, info.frames) == (12000, "PCM_16", 4096)  # the tiny model's context
    assert json.loads((out / "metadata.json").read_text())["seeds"] == [0]


@pytest.fixture
def broken(files, tmp_path) -> dict[str, Path]:
    """A text file named x.png and a truncated copy of the image checkpoint."""
    (tmp_path / "x.png").write_text("not an image")
    weights, card = checkpoint_paths(files["image"])
    for src in (weights, card):
        shutil.copy(src, tmp_path / src.name.replace("image", "cut"))
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(cut.read_bytes()[:-1000])
    card_of = json.loads(card.read_text())
    shutil.copy(weights, tmp_path / "oops.safetensors")
    (tmp_path / "oops.json").write_text(json.dumps(card_of | {"weights": "oops"}))  # a field of the wrong type
    return {"png": tmp_path / "x.png", "ckpt": tmp_path / "cut", "oops": tmp_path / "oops"}


ERRORS = {
    "unreadable prompt": (["image", "--checkpoint", "{image}", "--prompt", "{bad_png}"], "cannot read image"),
    "prompt rows past the image": (["image", "--checkpoint", "{image}", "--prompt", "{png}", "--prompt-rows", "64"],
                                   "--prompt-rows must be in 0..63"),
    "negative temperature": (["image", "--checkpoint", "{image}", "--temperature", "-1"], "--temperature must be"),
    "top-p out of range": (["audio", "--checkpoint", "{audio}", "--top-p", "1.5"], "--top-p must be in (0, 1]"),
    "no samples": (["image", "--checkpoint", "{image}", "--num-samples", "0"], "--num-samples must be >= 1"),
    "a billion samples": (["image", "--checkpoint", "{image}", "--num-samples", "1000000000"],
                          "--num-samples must be at most 10,000 per call, got 1,000,000,000"),
    "seed past 2^64": (["audio", "--checkpoint", "{audio}", "--seed", str(2**64)],
                       "--seed must be in 0..18446744073709551615 with --num-samples 1"),
    "seeds past 2^64": (["image", "--checkpoint", "{image}", "--seed", str(2**64 - 2)],
                        "--seed must be in 0..18446744073709551612 with --num-samples 4"),
    "negative seed": (["image", "--checkpoint", "{image}", "--seed", "-1"], "--seed must be in 0.."),
    "no batch": (["audio", "--checkpoint", "{audio}", "--batch-size", "0"], "--batch-size must be >= 1"),
    "missing checkpoint": (["image", "--checkpoint", "{tmp}/nothing"], "no model card"),
    "truncated checkpoint": (["image", "--checkpoint", "{cut}"], "truncated"),
    "card field of the wrong type": (["image", "--checkpoint", "{oops}"], "'weights' must be an object, got \"oops\""),
    "image model for audio": (["audio", "--checkpoint", "{image}"], "is an image model"),
    "audio past the context": (["audio", "--checkpoint", "{audio}", "--samples", "4097"],
                               "--samples must be in 1..4096"),
    "prompt and samples past the context": (["audio", "--checkpoint", "{audio}", "--prompt", "{wav}", "--samples",
                                             "4000"], "--samples must be in 1..1096"),
    "unknown flag": (["image", "--bogus"], "unrecognized arguments"),
    "not a number": (["image", "--prompt-rows", "half"], "invalid int value"),
}


@pytest.mark.parametrize("case", ERRORS)
def test_bad_input_exits_2_with_one_line_and_writes_nothing(case, files, broken, tmp_path, capsys):
    args, message = ERRORS[case]
    values = {"image": files["image"], "audio": files["audio"], "png": files["png"], "wav": files["wav"],
              "bad_png": broken["png"], "cut": broken["ckpt"], "oops": broken["oops"], "tmp": tmp_path}
    before = sorted(p.name for p in tmp_path.iterdir())
    args = [a.format(**values) for a in args] + ["--out-dir", str(tmp_path / "new" / "run")]
    assert run(*args) == 2
    err = capsys.readouterr().err
    assert err.startswith("sample.py: error:") and err.count("\n") == 1 and "Traceback" not in err
    assert message in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no output folder, no parents, no temp folders


def test_an_existing_folder_is_replaced_only_with_overwrite(files, tmp_path, capsys):
    out = tmp_path / "run"
    assert run_image(files, out, "--num-samples", 2) == 0
    assert run_image(files, out, "--num-samples", 1) == 2
    err = capsys.readouterr().err
    assert err.startswith("sample.py: error:") and "--overwrite" in err and err.count("\n") == 1
    assert (out / "sample_001.png").is_file()
    assert run_image(files, out, "--num-samples", 1, "--overwrite") == 0
    assert not (out / "sample_001.png").exists() and (out / "sample_000.png").is_file()
    assert json.loads((out / "metadata.json").read_text())["seeds"] == [0]
    assert leftovers(tmp_path) == []


def test_overwrite_never_replaces_a_folder_that_sample_py_did_not_write(files, tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("precious")
    assert run_image(files, out, "--num-samples", 1, "--overwrite") == 2
    assert "not written by sample.py" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["notes.txt"]
    empty = tmp_path / "empty"
    empty.mkdir()
    assert run_image(files, empty, "--num-samples", 1) == 0 and (empty / "sample_000.png").is_file()


def test_an_interrupted_run_leaves_the_old_folder_and_no_temporary_files(files, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    assert run_image(files, out, "--num-samples", 1) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    real_save = sample.save_png

    def save_then_interrupt(path, image):
        real_save(path, image)
        raise KeyboardInterrupt

    monkeypatch.setattr(sample, "save_png", save_then_interrupt)
    assert run_image(files, out, "--num-samples", 1, "--seed", 1, "--overwrite") == 130
    assert "interrupted" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before and leftovers(tmp_path) == []
    assert run_image(files, tmp_path / "a" / "b", "--num-samples", 1) == 130
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # the folders made for --out-dir are gone too


def test_the_script_runs_from_the_command_line(files, tmp_path):
    script = Path(sample.__file__)
    done = subprocess.run([sys.executable, str(script), "audio", "--checkpoint", str(files["image"]), "--out-dir",
                           str(tmp_path / "run")], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.splitlines() == [f"sample.py: error: checkpoint {files['image']} is an image model; "
                                        "'sample.py audio' needs an audio model"]
    assert list(tmp_path.iterdir()) == []


def _start_long_run(files, out: Path) -> tuple[subprocess.Popen, Path]:
    """sample.py in its own process on a long job, once its hidden temporary folder exists."""
    cmd = [sys.executable, str(Path(sample.__file__)), "image", "--checkpoint", str(files["image"]), "--num-samples",
           "500", "--out-dir", str(out), "--quiet", "--device", "cpu"]
    proc = subprocess.Popen(cmd, cwd=out.parent, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not leftovers(out.parent):
        assert proc.poll() is None, proc.stderr.read()
        time.sleep(0.05)
    (tmp,) = [out.parent / name for name in leftovers(out.parent)]
    return proc, tmp


def test_sigterm_is_handled_like_ctrl_c(files, tmp_path):
    proc, tmp = _start_long_run(files, tmp_path / "run")
    assert re.fullmatch(rf"\.run\.{proc.pid}\.[a-z0-9_]{{8}}\.tmp", tmp.name)  # the writer's PID in the name
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143 and "sample.py: terminated; nothing was written" in err
    assert list(tmp_path.iterdir()) == []  # no output, no temporary folder


def test_the_temporary_folders_of_killed_runs_are_removed_by_the_next(files, tmp_path):
    out = tmp_path / "run"
    proc, tmp = _start_long_run(files, out)
    proc.kill()  # SIGKILL: nothing can clean up
    proc.communicate(timeout=60)
    assert tmp.is_dir()
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        running = tmp_path / f".run.{alive.pid}.abcd1234.tmp"  # a run still writing: kept
        others = [tmp_path / ".run.keep", tmp_path / ".other.1.abcd1234.tmp", tmp_path / f".run.{proc.pid}.old-x"]
        for p in (running, *others):
            p.mkdir()
        assert run_image(files, out, "--num-samples", 1) == 0
        assert not tmp.exists() and running.is_dir() and all(p.is_dir() for p in others)
        assert (out / "sample_000.png").is_file()
    finally:
        alive.kill()
        alive.wait()
