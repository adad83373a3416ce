"""bench/gpu_check: every stage runs in its dry mode anywhere, and its checks run here on small problems
(Triton's interpreter without a GPU), so that the first GPU session spends its minutes on the GPU."""

import json
import subprocess
from pathlib import Path

import pytest
import torch

import bench.gpu_check as gc

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # CPU tensors run the kernels in the interpreter
ROOT = Path(__file__).resolve().parents[1]


def test_dry_run_of_every_stage_writes_its_json(tmp_path):
    for stage in ("versions", "patterns", "resources", "big"):
        assert gc.main([stage, "--out", str(tmp_path), "--dry-run"]) == 0
        rec = json.loads((tmp_path / f"{stage}.json").read_text())
        assert rec["stage"] == stage and rec["status"] in ("ok", "skipped") and "seconds" in rec
    assert json.loads((tmp_path / "patterns.json").read_text())["reason"] == "dry run"
    versions = json.loads((tmp_path / "versions.json").read_text())
    assert {"python", "torch", "triton", "modules"} <= set(versions)
    assert gc.main(["summary", "--out", str(tmp_path)]) == 0
    assert set(json.loads((tmp_path / "summary.json").read_text())["stages"]) == {"versions", "patterns",
                                                                                 "resources", "big"}


def test_bad_arguments_are_refused():
    for argv in (["nope"], ["resources", "--blocks", "x"], ["resources", "--dtypes", "float7"]):
        with pytest.raises(SystemExit):
            gc.parse_args(argv)


def test_the_shell_script_parses():
    subprocess.run(["bash", "-n", str(ROOT / "bench" / "gpu_check.sh")], check=True)


@pytest.mark.parametrize("name,dtype,kw", [("fixed-distinct-shared", torch.float32, {}),
                                           ("strided", torch.float32, {"fp32_precision": "tf32x3"}),
                                           ("local", torch.bfloat16, {})])
def test_pattern_check_passes_on_a_small_problem(name, dtype, kw, monkeypatch):
    monkeypatch.setattr(gc, "DEVICE", DEVICE)
    rec = gc.compare(name, gc.PATTERNS[name], dtype, 16, 32, 70, heads=2, batch=1, **kw)
    assert rec["ok"] and rec["finite"], rec
    assert set(rec["rel_err"]) == {"out", "dq", "dk", "dv"}


@pytest.mark.parametrize("kind", ["local", "strided"])
def test_big_case_checks_hold_on_a_small_problem(kind, monkeypatch):
    """The large-N stage's checks (rows of out and dQ, the dV identity) on a problem the interpreter can run."""
    monkeypatch.setattr(gc, "DEVICE", DEVICE)
    rec = gc.big_case(kind, 96, 2, 32, 16, 16)
    assert rec["finite"]
    assert max(rec["rows_out_rel_err"], rec["rows_dq_rel_err"], rec["dv_sum_rel_err"]) <= gc.TOLERANCE["bfloat16"]
    assert rec["dk_sum_over_dk_max"] < 0.5  # reported only: bf16 rounding keeps it from 0


def test_tune_times_the_table_config_and_its_neighbours(monkeypatch):
    """The optional tune stage on one small (block, D): every neighbour runs and agrees with the table's config."""
    from kernels.triton_attention import configs

    monkeypatch.setattr(gc, "DEVICE", DEVICE)
    args = gc.parse_args(["tune", "--blocks", "32", "--dims", "32", "--tune-n", "64", "--tune-heads", "1",
                          "--dtypes", "float32"])
    rows = gc.tune_rows(args)
    for kernel_pass in ("fwd", "dkv", "dq"):
        mine = [r for r in rows if r["pass"] == kernel_pass]
        assert len(mine) == len(gc.neighbours(configs(kernel_pass, 32, 32, torch.float32)[0], 32)) > 1
        assert sum(r["table"] for r in mine) == 1
        for r in mine:
            assert "error" not in r and r["max_rel_diff_vs_table"] < 1e-5 and r["ms"] > 0, r
