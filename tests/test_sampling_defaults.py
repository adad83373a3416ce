"""Sampling defaults in the model card: read by sample.py and the app when the user gives no value (explicit values
win, cards without them keep temperature 1 and no filter), and chosen by bench/sampling_sweep.py."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from helpers import tiny_checkpoint
from PIL import Image

import sample
from bench import sampling_sweep as sweep
from media.pictures import labelled, stack
from models import CheckpointError, load_card, load_model
from models.checkpoint import check_card, update_card
from sampling import SamplingOptions, card_defaults, resolve_options

ROWS = 60  # image prompt rows: 4 rows to sample keeps each run well under a second


def test_card_defaults_and_explicit_values():
    assert card_defaults({}) == card_defaults(None) == SamplingOptions()
    card = {"sampling": {"temperature": 0.9, "top_k": None, "top_p": 0.95, "chosen_by": "a sweep"}}
    assert card_defaults(card) == SamplingOptions(0.9, None, 0.95)
    assert resolve_options(card) == SamplingOptions(0.9, None, 0.95)
    assert resolve_options(card, temperature=1.0) == SamplingOptions(1.0, None, 0.95)  # the user's value wins
    assert resolve_options(card, top_p=1) == SamplingOptions(0.9, None, None)  # 1 = off, whatever the card says
    assert resolve_options({"sampling": {"temperature": 1, "top_k": 40}}, top_k=0).top_k is None  # 0 = off
    assert resolve_options({}, 0.5, 10, 0.8) == SamplingOptions(0.5, 10, 0.8)
    with pytest.raises(ValueError, match="model card's sampling defaults are invalid: top_p must be in"):
        card_defaults({"sampling": {"temperature": 1.0, "top_p": 1.5}})
    with pytest.raises(ValueError, match="temperature must be"):
        resolve_options(card, temperature=-1)


def test_the_card_schema_checks_the_sampling_field_types(tmp_path):
    card = load_card(tiny_checkpoint(tmp_path / "m", "audio"))
    check_card(card | {"sampling": {"temperature": 0.9, "top_k": None, "top_p": 0.9, "measured": []}})
    with pytest.raises(CheckpointError, match="'sampling.temperature' must be a number"):
        check_card(card | {"sampling": {"temperature": "warm"}})
    with pytest.raises(CheckpointError, match="'sampling' must be an object"):
        check_card(card | {"sampling": 0.9})


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    d = tmp_path_factory.mktemp("defaults")
    y, x = np.mgrid[0:64, 0:64]
    Image.fromarray(np.stack([x * 4, y * 4, (x + y) % 256], -1).astype(np.uint8)).save(d / "prompt.png")
    return {"plain": tiny_checkpoint(d / "plain", "image"),
            "greedy": tiny_checkpoint(d / "greedy", "image", sampling={"temperature": 0.0, "top_k": None,
                                                                       "top_p": None, "chosen_by": "a test"}),
            "top-p": tiny_checkpoint(d / "top-p", "image", sampling={"temperature": 1.0, "top_p": 0.5}),
            "png": d / "prompt.png"}


def _sample(checkpoints, name: str, out, *flags) -> tuple[np.ndarray, dict]:
    args = ["image", "--checkpoint", checkpoints[name], "--prompt", checkpoints["png"], "--prompt-rows", ROWS,
            "--num-samples", 1, "--out-dir", out, "--quiet", "--device", "cpu", *flags]
    assert sample.main([str(a) for a in args]) == 0
    with Image.open(out / "sample_000.png") as im:
        return np.asarray(im), json.loads((out / "metadata.json").read_text())["arguments"]


def test_sample_py_uses_the_card_defaults_unless_told_otherwise(checkpoints, tmp_path):
    greedy, args = _sample(checkpoints, "greedy", tmp_path / "a")
    assert (args["temperature"], args["top_k"], args["top_p"]) == (0.0, None, None)  # recorded as used
    explicit, _ = _sample(checkpoints, "plain", tmp_path / "b", "--temperature", 0)
    assert np.array_equal(greedy, explicit)
    plain, args = _sample(checkpoints, "plain", tmp_path / "c")  # no defaults in the card: temperature 1
    assert args["temperature"] == 1.0
    overridden, args = _sample(checkpoints, "greedy", tmp_path / "d", "--temperature", 1)  # the user's value wins
    assert args["temperature"] == 1.0 and np.array_equal(overridden, plain)
    _, args = _sample(checkpoints, "top-p", tmp_path / "e")
    assert args["top_p"] == 0.5
    off, args = _sample(checkpoints, "top-p", tmp_path / "f", "--top-p", 1)  # 1 turns the card's top-p off
    assert args["top_p"] is None and np.array_equal(off, plain)
    # a recipe made with top-p off replays with top-p off, whatever the card's defaults say
    argv, _ = sample.expand_recipe(["--from-json", str(tmp_path / "f" / "metadata.json")])
    assert argv[argv.index("--top-p") + 1] == "1.0" and argv[argv.index("--top-k") + 1] == "0"


def test_sample_py_refuses_a_card_with_bad_defaults(checkpoints, tmp_path, capsys):
    bad = tiny_checkpoint(tmp_path / "bad", "image")
    update_card(bad, {"sampling": {"temperature": -1.0}})
    assert sample.main(["image", "--checkpoint", str(bad), "--out-dir", str(tmp_path / "o"), "--quiet"]) == 2
    assert "sampling defaults are invalid: temperature must be" in capsys.readouterr().err


def test_the_app_starts_from_each_models_defaults(checkpoints, tmp_path):
    from app.cards import card_markdown
    from app.handlers import Studio
    from app.registry import Registry

    folder = checkpoints["plain"].parent
    tiny_checkpoint(tmp_path / "bad", "image", sampling={"temperature": 9.0, "top_p": 0})
    registry = Registry(folder, torch.device("cpu"))
    studio = Studio(registry)
    assert studio.options("greedy", "image", None, None, None) == SamplingOptions(0.0)
    assert studio.options("greedy", "image", 0.7, 0, 1) == SamplingOptions(0.7)  # the page's values win
    assert studio.options("top-p", "image", None, None, None) == SamplingOptions(1.0, None, 0.5)
    assert studio.options("plain", "image", None, None, None) == SamplingOptions()
    assert "**Sampling defaults**: temperature 0 (chosen by `a test`)" in card_markdown(registry.entry("greedy",
                                                                                                      "image"))
    assert [p.split(":")[0] for p in Registry(tmp_path, torch.device("cpu")).problems] == ["bad.json"]


def test_the_pages_controls_start_at_the_first_models_defaults(checkpoints):
    import gradio as gr

    from app.registry import Registry
    from app.ui import build_demo

    demo = build_demo(Registry(checkpoints["plain"].parent, torch.device("cpu")))  # image models: greedy first
    sliders = {b.label: b.value for b in demo.blocks.values() if isinstance(b, gr.Slider)}
    assert sliders["Temperature"] == 0.0 and sliders["Top-k"] == 0 and sliders["Top-p"] == 1


def test_sweep_parsing_distances_and_verdicts():
    assert sweep.number_list("0.9, 1", "temperature") == [0.9, 1.0]
    with pytest.raises(ValueError, match="--top-p must be numbers"):
        sweep.number_list("a", "top-p")
    grid = sweep.settings_grid([0.9, 1.0], [1, 0.95], None)
    assert grid[0] == SamplingOptions(0.9) and grid[3] == SamplingOptions(1.0, None, 0.95)
    assert sweep.log_distance([(2.0, 1.0), (0.5, 1.0)]) == pytest.approx(math.log(2))
    data = {"flatness": 0.01, "rms": 0.1, "quietest_rms": 0.03, "loudest_rms": 0.2, "stuck": 0.0}
    ok = {"flatness": 0.1, "rms": 0.12, "quietest_rms": 0.02, "stuck": 0.0}  # as quiet as a quiet data window
    assert sweep.audio_verdict(ok, data, 3)[0] == pytest.approx(math.log(10))
    assert "quietest data window" in sweep.audio_verdict(ok | {"quietest_rms": 0.009}, data, 3)[1]  # near-silent
    assert "loudest data window" in sweep.audio_verdict(ok | {"rms": 0.25}, data, 3)[1]  # a buzz
    assert "stuck" in sweep.audio_verdict(ok | {"stuck": 1 / 6}, data, 3)[1]
    held = np.full((2, 2048), 128, np.uint8)  # one value: a stuck (and silent) clip
    noise = np.random.default_rng(0).integers(0, 256, (2, 2048), dtype=np.uint8)
    assert sweep.clip_figures(held)["stuck"] == 1.0 and sweep.clip_figures(held)["quietest_rms"] < 0.01
    buzz = np.tile(np.repeat(np.array([10, 245], np.uint8), 300), (2, 4))  # a square wave: loud, flatness low
    assert sweep.clip_figures(buzz)["loudest_rms"] > 0.5 and sweep.clip_figures(buzz)["flatness"] < 0.05
    assert sweep.clip_figures(noise)["stuck"] == 0.0 and sweep.clip_figures(noise)["flatness"] > 0.3


def test_an_audio_sweep_chooses_writes_the_card_and_a_figure(tmp_path):
    path = tiny_checkpoint(tmp_path / "a", "audio")
    model = load_model(path)
    data = {"flatness": 0.3, "rms": 0.2, "quietest_rms": 0.06, "loudest_rms": 1.0, "stuck": 0.0}
    row = sweep.audio_setting(model, 2, 1024, SamplingOptions(1.0), 2)
    assert row["media"]["clips"].shape == (2, 1024) and 0 < row["flatness"] <= 1 and row["rms"] > 0
    row["distance"], row["degenerate"] = sweep.audio_verdict(row, data, 3)
    quiet = row | {"quietest_rms": 0.01, "options": SamplingOptions(0.5), "seconds": 0.1}
    quiet["distance"], quiet["degenerate"] = sweep.audio_verdict(quiet, data, 3)
    rows = [quiet, row | {"options": SamplingOptions(1.0), "seconds": 0.1, "chosen": True}]
    assert quiet["distance"] == math.inf and math.isfinite(row["distance"])
    result = {"kind": "audio", "rows": rows, "samples": 2, "data_items": 4, "data_figures": data}
    update_card(path, {"sampling": sweep.card_sampling(result, "python -m bench.sampling_sweep ...")})
    card = load_card(path)
    assert card_defaults(card) == SamplingOptions(1.0)
    assert [r.get("chosen", False) for r in card["sampling"]["measured"]] == [False, True]
    assert card["sampling"]["measured"][0]["distance"] is None and card["sampling"]["chosen_by"].startswith("python")
    picture = sweep.audio_figure(data, rows)
    assert picture.dtype == np.uint8 and picture.shape[1] == 816


def test_image_distance_and_figure():
    data = {"from_scratch": {"roughness": 10.0, "speckle": 1.0}, "completed": {"roughness": 10.0, "speckle": 1.0}}
    row = {"from_scratch": {"roughness": 20.0, "speckle": 1.0}, "completed": {"roughness": 5.0, "speckle": 1.0}}
    assert sweep.image_distance(row, data) == pytest.approx(math.log(2) / 2)
    images = np.random.default_rng(0).integers(0, 256, (4, 64, 64, 3), dtype=np.uint8)
    row |= {"media": {"from_scratch": images, "completed": images}, "options": SamplingOptions(0.9), "distance": 0.3,
            "chosen": True}
    picture = sweep.image_figure(images, images, data, [row])
    assert picture.shape[1] == 2 * (4 * 128 + 3 * 4) + 24


def test_labelled_and_stacked_pictures():
    a, b = np.zeros((10, 30, 3), np.uint8), np.zeros((5, 20, 3), np.uint8)
    out = labelled(a, "T 0.9")
    assert out.shape == (28, 30, 3) and (out[18:] == 0).all() and (out[:18] < 255).any()  # text drawn
    s = stack([a, b], gap=2)
    assert s.shape == (17, 30, 3) and (s[10:12] == 255).all() and (s[12:, 20:] == 255).all()
    with pytest.raises(ValueError, match="uint8"):
        labelled(np.zeros((4, 4)), "x")
