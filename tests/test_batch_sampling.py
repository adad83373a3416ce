"""sample.py over many prompts (sampling/batch.py): files, folders, globs and an ImageNet-64 npz range; prompts
batched together; samples.npz + per-prompt files + manifest; a killed run resumes; ranks share the prompts
(RANK / WORLD_SIZE, and torchrun with two CPU processes) without losing or repeating any."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from helpers import free_port, tiny_checkpoint
from PIL import Image

import sample
import sampling.batch
from data import write_imagenet64_npz

ROOT = Path(__file__).resolve().parents[1]
ROWS = 62  # 2 rows (384 tokens) to sample per image


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("batch")
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (5, 64, 64, 3), dtype=np.uint8)
    write_imagenet64_npz(d / "val_data.npz", images, np.arange(5))
    (d / "pics").mkdir()
    for name, i in (("a.png", 0), ("b.png", 1)):
        Image.fromarray(images[i]).save(d / "pics" / name)
    (d / "clips").mkdir()
    t = np.arange(2400) / 12000
    sf.write(d / "clips" / "low.wav", 0.5 * np.sin(2 * np.pi * 220 * t), 12000)
    sf.write(d / "clips" / "short.wav", 0.5 * np.sin(2 * np.pi * 440 * t[:600]), 12000)
    return {"dir": d, "images": images, "npz": d / "val_data.npz",
            "image": tiny_checkpoint(d / "image64", "image"), "audio": tiny_checkpoint(d / "audio12k", "audio")}


def cli(*args: object) -> int:
    return sample.main([str(a) for a in args] + ["--quiet", "--device", "cpu"])


def image_run(files, out: Path, *extra: object) -> int:
    return cli("image", "--checkpoint", files["image"], "--npz", files["npz"], "--range", "1:4", "--prompt-rows",
               ROWS, "--num-samples", 2, "--batch-size", 4, "--seed", 3, "--out-dir", out, *extra)


def pixels(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im)


@pytest.fixture(scope="module")
def reference(files, tmp_path_factory) -> Path:
    """One uninterrupted single-process run of 3 npz prompts x 2 samples."""
    out = tmp_path_factory.mktemp("ref") / "run"
    assert image_run(files, out) == 0
    return out


def test_many_prompts_give_one_npz_per_prompt_files_and_a_manifest(files, reference, tmp_path, monkeypatch):
    z = np.load(reference / "samples.npz")
    assert z["samples"].shape == (6, 64, 64, 3) and z["samples"].dtype == np.uint8
    assert z["seeds"].tolist() == [3, 4, 5, 6, 7, 8] and z["prompt_index"].tolist() == [0, 0, 1, 1, 2, 2]
    manifest = json.loads((reference / "manifest.json").read_text())
    assert manifest["prompts"] == [f"{files['npz']}[{i}]" for i in (1, 2, 3)]
    for s in manifest["samples"]:
        image = pixels(reference / s["file"])
        assert np.array_equal(image, z["samples"][s["index"]]) and s["seed"] == 3 + s["index"]
        assert np.array_equal(image[:ROWS], files["images"][1 + s["prompt_index"]][:ROWS])  # the prompt rows kept
    # batched across prompts: one batch holds the samples of two prompts (different prompt tokens)
    shapes = []
    real = sampling.batch.generate

    def watched(model, prompt, *args, **kwargs):
        shapes.append(len({tuple(row.tolist()) for row in prompt}))
        return real(model, prompt, *args, **kwargs)

    monkeypatch.setattr(sampling.batch, "generate", watched)
    mixed = tmp_path / "mixed"
    assert cli("image", "--checkpoint", files["image"], "--prompts", files["dir"] / "pics", str(files["dir"] / "p*s" /
               "b.png"), "--prompt-rows", ROWS, "--num-samples", 2, "--batch-size", 4, "--seed", 3, "--out-dir",
               mixed) == 0
    assert shapes == [2]  # a.png and b.png (named twice: by the folder and the glob) in one batch of 4
    # the same samples as sample.py --prompt, one prompt at a time (sample k uses seed + k)
    single = tmp_path / "single"
    assert cli("image", "--checkpoint", files["image"], "--prompt", files["dir"] / "pics" / "b.png", "--prompt-rows",
               ROWS, "--num-samples", 2, "--seed", 5, "--out-dir", single) == 0
    assert np.array_equal(pixels(single / "sample_001.png"), pixels(mixed / "p00001_b" / "sample_001.png"))


def test_audio_prompts_of_different_lengths(files, tmp_path):
    out = tmp_path / "audio"
    assert cli("audio", "--checkpoint", files["audio"], "--prompts", files["dir"] / "clips", "--samples", 300,
               "--num-samples", 2, "--seed", 1, "--out-dir", out) == 0
    z = np.load(out / "samples.npz")
    assert z["samples"].dtype == np.int16 and z["lengths"].tolist() == [2700, 2700, 900, 900]
    assert z["samples"].shape == (4, 2700) and not z["samples"][2, 900:].any()
    manifest = json.loads((out / "manifest.json").read_text())
    clip, rate = sf.read(out / manifest["samples"][3]["file"], dtype="int16")
    assert rate == 12000 and np.array_equal(clip, z["samples"][3, :900])
    single = tmp_path / "single"
    assert cli("audio", "--checkpoint", files["audio"], "--prompt", files["dir"] / "clips" / "short.wav", "--samples",
               300, "--seed", 4, "--out-dir", single) == 0
    assert np.array_equal(sf.read(single / "sample_000.wav", dtype="int16")[0], clip)


def test_a_killed_run_resumes_where_it_stopped(files, reference, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    real, writes, batches = sampling.batch._savez, [], []

    def killed_at_the_second_part(path, arrays):
        writes.append(path.name)
        if len(writes) == 2:
            raise KeyboardInterrupt  # as Ctrl-C (or a kill) between two batches
        real(path, arrays)

    monkeypatch.setattr(sampling.batch, "_savez", killed_at_the_second_part)
    assert image_run(files, out) == 130
    assert "the same command resumes the run" in capsys.readouterr().err
    assert not (out / "samples.npz").exists() and len(list((out / "parts").glob("*.npz"))) == 1
    monkeypatch.setattr(sampling.batch, "_savez", real)
    real_generate = sampling.batch.generate
    monkeypatch.setattr(sampling.batch, "generate", lambda m, p, *a, **k: batches.append(len(p)) or
                        real_generate(m, p, *a, **k))
    assert image_run(files, out) == 0
    assert batches == [2]  # the 4 samples of the first batch were not made again
    assert np.array_equal(np.load(out / "samples.npz")["samples"], np.load(reference / "samples.npz")["samples"])
    assert not [p.name for p in out.rglob(".*")]  # no temporary files left
    assert image_run(files, out, "--seed", 4) == 2
    assert "holds a run with other settings" in capsys.readouterr().err


def test_ranks_share_the_prompts_without_losing_or_repeating_any(files, reference, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    monkeypatch.setenv("WORLD_SIZE", "2")
    for rank in (1, 0):  # no process group: the rank that finishes last assembles
        monkeypatch.setenv("RANK", str(rank))
        assert image_run(files, out, "--batch-size", 1) == 0
    by_rank = {r: sorted(k for p in (out / "parts").glob(f"r{r}-*.npz") for k in np.load(p)["indices"].tolist())
               for r in (0, 1)}
    assert by_rank == {0: [0, 1, 4, 5], 1: [2, 3]}  # prompts 0 and 2 on rank 0, prompt 1 on rank 1
    assert np.array_equal(np.load(out / "samples.npz")["samples"], np.load(reference / "samples.npz")["samples"])


def test_torchrun_with_two_cpu_processes(files, reference, tmp_path):
    out = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR")}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                           f"--master_port={free_port()}", str(ROOT / "sample.py"), "image", "--checkpoint",
                           str(files["image"]), "--npz", str(files["npz"]), "--range", "1:4", "--prompt-rows",
                           str(ROWS), "--num-samples", "2", "--batch-size", "4", "--seed", "3", "--out-dir", str(out),
                           "--device", "cpu", "--quiet"], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert {p.name.split("-")[0] for p in (out / "parts").glob("*.npz")} == {"r0", "r1"}
    assert np.array_equal(np.load(out / "samples.npz")["samples"], np.load(reference / "samples.npz")["samples"])
    assert len(json.loads((out / "manifest.json").read_text())["samples"]) == 6


BAD = {
    "range without npz": (["--prompts", "pics", "--range", "0:2"], "--range needs --npz"),
    "range past the npz": (["--npz", "val_data.npz", "--range", "3:9"], "must be within 0:5"),
    "a bad range": (["--npz", "val_data.npz", "--range", "x"], "--range must be START:STOP"),
    "a glob matching nothing": (["--prompts", "nope/*.png"], "matches no file"),
    "a missing file": (["--prompts", "missing.png"], "cannot read missing.png"),
    "one prompt and many": (["--prompts", "pics", "--prompt", "pics/a.png"], "--prompt is one prompt"),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_batch_input_is_one_line_and_exit_2(case, files, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(files["dir"])
    args, message = BAD[case]
    assert cli("image", "--checkpoint", files["image"], *args, "--out-dir", tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
