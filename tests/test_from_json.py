"""sample.py --from-json: a settings JSON (the app's, or an earlier run's metadata.json) is read back, explicit
flags win over it, and bad JSON is one clear line (exit 2)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from helpers import tiny_checkpoint
from PIL import Image

import sample
from sampling.recipe import FORMAT, make_recipe, read_recipe


@pytest.fixture(scope="module")
def image_checkpoint(tmp_path_factory) -> Path:
    return tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "image64", "image")


def cli(*args: object) -> int:
    return sample.main([str(a) for a in args] + ["--quiet", "--device", "cpu"])


def pixels(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im)


def test_a_metadata_json_runs_again_with_the_same_samples(image_checkpoint, tmp_path):
    first = tmp_path / "first"
    assert cli("image", "--checkpoint", image_checkpoint, "--num-samples", 2, "--seed", 9, "--top-p", 0.9,
               "--out-dir", first) == 0
    again = tmp_path / "again"
    assert cli("--from-json", first / "metadata.json", "--checkpoint", image_checkpoint, "--out-dir", again) == 0
    for i in range(2):
        assert np.array_equal(pixels(again / f"sample_{i:03d}.png"), pixels(first / f"sample_{i:03d}.png"))
    meta = json.loads((again / "metadata.json").read_text())
    assert meta["arguments"]["top_p"] == 0.9 and meta["seeds"] == [9, 10] and meta["from_json"]["weights_match"]


def test_a_recipe_round_trips_and_names_its_checkpoint(tmp_path):
    recipe = make_recipe("audio", {"samples": 100, "seed": 2, "top_k": 5}, "audio12k", "ab" * 32, "prompt.wav", [2])
    (tmp_path / "settings.json").write_text(json.dumps(recipe))
    (tmp_path / "prompt.wav").write_bytes(b"")  # only its presence is checked here
    back = read_recipe(tmp_path / "settings.json")
    assert back["kind"] == "audio" and back["settings"]["samples"] == 100 and back["settings"]["top_p"] is None
    assert back["prompt"] == tmp_path / "prompt.wav" and back["checkpoint_name"] == "audio12k"
    argv, _ = sample.expand_recipe(["--from-json", str(tmp_path / "settings.json"), "--seed", "5"])
    assert argv[0] == "audio" and argv[-2:] == ["--seed", "5"] and "--checkpoint" in argv
    assert Path(argv[argv.index("--checkpoint") + 1]).name == "audio12k"


BAD = {
    "not JSON": ("{nope", "cannot read the settings JSON"),
    "another format": (json.dumps({"format": "x"}), "is not a settings JSON of this project"),
    "an unknown option": (json.dumps({"format": FORMAT, "kind": "image", "settings": {"steps": 3}}),
                          "unknown image settings ['steps']"),
    "a wrong type": (json.dumps({"format": FORMAT, "kind": "image", "settings": {"seed": "x"}}),
                     "seed must be a whole number or null"),
    "a path as checkpoint": (json.dumps({"format": FORMAT, "kind": "image", "settings": {},
                                         "checkpoint": {"name": "../x"}}), "checkpoint name must be a plain name"),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_json_is_one_line_and_exit_2(case, tmp_path, capsys):
    text, message = BAD[case]
    (tmp_path / "s.json").write_text(text)
    assert cli("--from-json", tmp_path / "s.json", "--out-dir", tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and not (tmp_path / "out").exists()


def test_the_kind_must_match(tmp_path, capsys):
    (tmp_path / "s.json").write_text(json.dumps(make_recipe("image", {}, "image64", None, None, [0])))
    assert cli("audio", "--from-json", tmp_path / "s.json") == 2
    assert "holds image settings, not audio" in capsys.readouterr().err
