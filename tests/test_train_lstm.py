"""train.py --arch lstm: the sparse LSTM baseline trains with truncated BPTT, resumes exactly, exports."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

import train
from models import SparseLSTM, load_model

LSTM = ["--arch", "lstm", "--hidden", "32", "--block", "8", "--density", "0.5", "--seq-len", "256",
        "--batch-size", "2", "--precision", "fp32", "--peak-tflops", "1", "--quiet", "--eval-items", "2",
        "--threads", "1", "--val-fraction", "0.25"]


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("clips")
    t = np.arange(6000) / 12000
    for i in range(6):  # with --val-fraction 0.25, clip4 and clip5 are held out
        sf.write(root / f"clip{i}.wav", (0.5 * np.sin(2 * np.pi * (220 + 50 * i) * t)).astype(np.float32), 12000)
    return root


def log_of(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]


def step_losses(run: Path) -> list[float]:
    return [r["loss"] for r in log_of(run) if "event" not in r]


def test_an_lstm_run_trains_in_chunks_and_exports(clips, tmp_path):
    argv = ["audio", "--data", str(clips), "--out", str(tmp_path / "run"), *LSTM, "--tbptt", "64", "--steps", "2",
            "--eval-every", "2", "--export", "lstm", "--checkpoints", str(tmp_path / "ck")]
    assert train.main(argv) == 0
    model = load_model(tmp_path / "ck" / "lstm")
    assert isinstance(model, SparseLSTM) and model.cfg.hidden == 32 and model.cfg.density == 0.5
    card = model.card
    assert card["architecture"] == "lstm" and card["training"]["tbptt"] == 64 and card["training"]["arch"] == "lstm"
    assert card["steps"] == 2 and card["tokens_seen"] == 2 * 2 * 256 and card["compute_pf_days"] > 0
    assert 0 < card["held_out_bits_per_dim"] < 9
    start = log_of(tmp_path / "run")[0]
    assert start["parameters"] == model.num_parameters() and start["flops_per_sequence"] > 0


def test_chunking_does_not_change_the_loss(clips, tmp_path):
    """The forward pass over chunks with the state carried is the forward pass over the whole sequence."""
    losses = []
    for tbptt in ("256", "50"):
        out = tmp_path / f"run{tbptt}"
        argv = ["audio", "--data", str(clips), "--out", str(out), *LSTM, "--tbptt", tbptt, "--steps", "1",
                "--eval-every", "0"]
        assert train.main(argv) == 0
        losses.append(step_losses(out)[0])
    assert math.isclose(losses[0], losses[1], rel_tol=1e-6)


def test_a_stopped_lstm_run_resumes_exactly(clips, tmp_path):
    base = ["audio", "--data", str(clips), *LSTM, "--multiplicative", "--tbptt", "100", "--steps", "3",
            "--eval-every", "0"]
    assert train.main([*base, "--out", str(tmp_path / "whole")]) == 0
    assert train.main([*base, "--out", str(tmp_path / "parts"), "--stop-after", "1"]) == 0
    assert train.main(["audio", "--data", str(clips), "--out", str(tmp_path / "parts"), "--resume", "--quiet"]) == 0
    whole = torch.load(tmp_path / "whole" / "state.pt", weights_only=True)["model"]
    parts = torch.load(tmp_path / "parts" / "state.pt", weights_only=True)["model"]
    assert whole.keys() == parts.keys() and all(torch.equal(whole[k], parts[k]) for k in whole)


@pytest.mark.parametrize("extra, message", [
    (["--arch", "lstm", "--heads", "3"], "--heads is not for --arch lstm"),
    (["--arch", "lstm", "--config", "tiny"], "--config is not for --arch lstm"),
    (["--arch", "lstm", "--fsdp"], "--fsdp is not for --arch lstm"),
    (["--tbptt", "64"], "--tbptt is not for --arch transformer"),
    (["--hidden", "64", "--density", "0.5"], "--hidden, --density are not for --arch transformer"),
    (["--arch", "lstm", "--tbptt", "0"], "--tbptt must be >= 1"),
    (["--arch", "lstm", "--density", "0"], "invalid LSTM settings: density must be"),
    (["--arch", "lstm", "--hidden", "36", "--block", "8", "--density", "0.5"], "multiple of block"),
])
def test_bad_lstm_settings_exit_with_one_clear_line(clips, tmp_path, capsys, extra, message):
    argv = ["audio", "--data", str(clips), "--out", str(tmp_path / "run"), "--quiet", "--seq-len", "256",
            "--val-fraction", "0.25", *extra]
    assert train.main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.startswith("train.py: error:")


def test_stop_minutes_ends_the_run_with_a_checkpoint_and_the_export(clips, tmp_path):
    argv = ["audio", "--data", str(clips), "--out", str(tmp_path / "run"), *LSTM, "--steps", "50", "--eval-every",
            "0", "--stop-minutes", "0.0001", "--export", "lstm", "--checkpoints", str(tmp_path / "ck")]
    assert train.main(argv) == 0
    assert len(step_losses(tmp_path / "run")) == 1 and load_model(tmp_path / "ck" / "lstm").card["steps"] == 1
