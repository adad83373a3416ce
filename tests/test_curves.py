"""bench.curves: learning curves from train.py logs (held-out evaluations, windows of training bits), its
figure, and clear errors for folders that are not runs."""

import json

import pytest
from PIL import Image

from bench.curves import main, read_run, windows


def write_log(folder, steps, evals, tokens_per_step=100, seconds=30.0):
    folder.mkdir(parents=True)
    lines = [{"event": "start", "step": 0}]
    for s in range(1, steps + 1):
        lines.append({"step": s, "loss": 1.0, "bits_per_dim": 8.0 - s / 10, "tokens_seen": s * tokens_per_step,
                      "seconds": seconds})
        if s in evals:
            lines.append({"event": "eval", "step": s, "held_out_bits_per_dim": evals[s], "items": 4})
    (folder / "log.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))


def test_runs_give_evaluations_at_their_tokens_and_minutes_and_windows_of_training_bits(tmp_path, capsys):
    write_log(tmp_path / "a", 10, {5: 7.0, 10: 6.5})
    write_log(tmp_path / "b", 4, {4: 7.2}, tokens_per_step=250, seconds=60.0)
    run = read_run(tmp_path / "a")
    assert run["evals"] == [(5, 500, 2.5, 7.0, 4), (10, 1000, 5.0, 6.5, 4)]
    # windows of 500 tokens: steps 1-4 (tokens < 500), 5-9, 10
    got = windows(run, 500)
    assert [(t, m) for t, m, _ in got] == [(400, 2.0), (900, 4.5), (1000, 5.0)]
    assert got[0][2] == pytest.approx(7.75) and got[1][2] == pytest.approx(7.3) and got[2][2] == pytest.approx(7.0)
    figure = tmp_path / "docs" / "curves.png"
    assert main([str(tmp_path / "a"), str(tmp_path / "b"), "--names", "dense,wide", "--figure", str(figure)]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["every_tokens"] == 100.0  # the longest run's tokens / 10
    assert out["runs"]["wide"]["evals"] == [{"step": 4, "tokens": 1000, "minutes": 4.0, "bits": 7.2, "items": 4}]
    assert out["runs"]["dense"]["tokens"] == 1000 and len(out["runs"]["dense"]["train_windows"]) == 10
    with Image.open(figure) as img:
        assert img.size == (1100, 430)


def test_bad_runs_and_names_are_refused(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit):
        main([str(tmp_path / "empty")])
    assert "has no log.jsonl" in capsys.readouterr().err
    write_log(tmp_path / "a", 3, {})
    with pytest.raises(SystemExit):
        main([str(tmp_path / "a"), "--names", "x,y"])
    assert "--names must give 1 distinct names" in capsys.readouterr().err
    (tmp_path / "a" / "log.jsonl").write_text('{"event": "start"}\nnot json\n')
    with pytest.raises(SystemExit):
        main([str(tmp_path / "a")])
    assert "log.jsonl:2 is not JSON" in capsys.readouterr().err
