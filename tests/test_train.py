"""train.py and training/: a tiny run end to end, exact resume, DDP/FSDP equivalence, non-finite steps, errors."""

import dataclasses
import json
import math
import os
import platform
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

import train
import training
from data import write_imagenet64_npz
from models import SparseTransformer, config_for, load_model

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--config", "tiny", "--batch-size", "2", "--peak-tflops", "1", "--quiet", "--eval-items", "2"]
# fp32: a CPU without native bf16 runs bf16 matmuls ~100x slower; the end-to-end run below uses bf16
FAST = [*TINY, "--precision", "fp32"]


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    """A tiny dataset in the official ImageNet-64 npz layout: smooth synthetic pictures."""
    root = tmp_path_factory.mktemp("imagenet64")
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:64, 0:64]
    imgs = np.stack([
        np.stack([127 + 120 * np.sin(a * x / 20 + b * y / 20 + ch) for ch in range(3)], -1)
        for a, b in rng.uniform(0, 4, (12, 2))
    ]).astype(np.uint8)
    write_imagenet64_npz(root / "Imagenet64_train_part1.npz", imgs[:10], list(range(10)))
    write_imagenet64_npz(root / "val_data.npz", imgs[10:], [0, 1])
    return root


def read_log(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]


def steps_of(run: Path) -> dict[int, dict]:
    return {r["step"]: r for r in read_log(run) if "event" not in r or r["event"] == "nonfinite"}


def saved_params(run: Path) -> dict[str, torch.Tensor]:
    return torch.load(run / "state.pt", weights_only=True)["model"]


def test_a_tiny_run_logs_checkpoints_and_exports(images, tmp_path):
    ck = tmp_path / "checkpoints"
    argv = ["image", "--data", str(images), "--out", str(tmp_path / "run"), *FAST, "--steps", "3",
            "--eval-every", "3", "--export", "tiny-img", "--checkpoints", str(ck), "--precision", "bf16"]
    assert train.main(argv) == 0
    log = read_log(tmp_path / "run")
    steps = [r for r in log if "event" not in r]
    assert [r["step"] for r in steps] == [1, 2, 3]
    for r in steps:
        assert {"loss", "bits_per_dim", "tokens_per_s", "lr", "mfu", "pf_days"} <= set(r)
        assert r["bits_per_dim"] == pytest.approx(r["loss"] / math.log(2))
    assert steps[-1]["tokens_seen"] == 3 * 2 * 12288
    assert any(r.get("event") == "eval" and r["step"] == 3 for r in log)
    model = load_model(ck / "tiny-img")
    card = model.card
    assert card["steps"] == 3 and card["tokens_seen"] == 3 * 2 * 12288 and card["codec"]["kind"] == "image"
    assert card["compute_pf_days"] > 0 and 0 < card["held_out_bits_per_dim"] <= 8.01
    assert card["data"]["train_items"] == 10 and card["data"]["val_items"] == 2
    # a finished run exported again with --resume, in bfloat16: half the bytes, the same weights rounded
    resume = ["image", "--data", str(images), "--out", str(tmp_path / "run"), "--resume", "--quiet",
              "--checkpoints", str(ck), "--export", "tiny-bf16", "--export-dtype", "bfloat16"]
    assert train.main(resume) == 0
    half = load_model(ck / "tiny-bf16")
    assert half.card["weights"]["dtype"] == "bfloat16" and card["weights"]["dtype"] == "float32"
    assert half.card["weights"]["bytes"] < 0.52 * card["weights"]["bytes"]
    for name, p in half.state_dict().items():
        assert torch.equal(p, model.state_dict()[name].bfloat16().float()), name
    assert half.card["held_out_bits_per_dim"] == pytest.approx(card["held_out_bits_per_dim"], abs=0.05)


def export_tiny(images: Path, out: Path, checkpoint: Path) -> SparseTransformer:
    """Train the tiny config 2 steps in ``out`` and export it as ``checkpoint``; the exported model."""
    argv = ["image", "--data", str(images), "--out", str(out), *FAST, "--steps", "2", "--eval-every", "0",
            "--export", checkpoint.name, "--checkpoints", str(checkpoint.parent)]
    assert train.main(argv) == 0
    return load_model(checkpoint)


def test_init_starts_a_new_run_from_an_exported_checkpoint(images, tmp_path, capsys):
    ck = tmp_path / "checkpoints"
    source = export_tiny(images, tmp_path / "a", ck / "a")
    second = ["image", "--data", str(images), "--out", str(tmp_path / "b"), "--init", str(ck / "a"),
              "--batch-size", "2", "--peak-tflops", "1", "--quiet", "--eval-items", "2", "--eval-every", "0",
              "--steps", "1", "--lr", "1e-9", "--warmup", "0", "--export", "b", "--checkpoints", str(ck)]
    assert train.main(second) == 0
    card = load_model(ck / "b").card
    assert card["config"] == source.card["config"] and card["training"]["init"] == str(ck / "a")
    assert card["tokens_seen"] == source.card["tokens_seen"] + 2 * 12288  # earlier training counts
    assert card["compute_pf_days"] > source.card["compute_pf_days"]
    first, second_run = card["training_history"]  # the source's run, then this one
    assert first == source.card["training_history"][0] and first["steps"] == 2 and first["init"] is None
    assert second_run | {"threads": 0} == {"steps": 1, "schedule_steps": 1, "layers": 2, "init": str(ck / "a"),
                                           "threads": 0, "processes": 1, "lr": 1e-9, "warmup": 0,
                                           "batch_size": 2, "precision": card["training"]["precision"], "seed": 0}
    for name, p in load_model(ck / "b").state_dict().items():  # lr 1e-9: one step leaves the weights as they were
        torch.testing.assert_close(p, source.state_dict()[name], atol=1e-6, rtol=0)
    bad = ["image", "--data", str(images), "--out", str(tmp_path / "c"), "--init", str(ck / "a"), "--width", "128"]
    assert train.main(bad) == 2
    assert "--init takes the model from" in capsys.readouterr().err
    fewer = ["image", "--data", str(images), "--out", str(tmp_path / "c"), "--init", str(ck / "a"), "--layers", "1"]
    assert train.main(fewer) == 2
    assert "--init can only add layers" in capsys.readouterr().err
    assert train.main(["audio", "--data", str(images), "--out", str(tmp_path / "d"), "--init", str(ck / "a")]) == 2
    assert "is not an audio model" in capsys.readouterr().err


def test_init_with_dropout_sets_it_and_keeps_the_weights(images, tmp_path, capsys):
    ck = tmp_path / "checkpoints"
    source = export_tiny(images, tmp_path / "a", ck / "a")
    assert source.cfg.dropout == 0.0
    run = ["image", "--data", str(images), "--out", str(tmp_path / "b"), "--init", str(ck / "a"), "--dropout", "0.1",
           "--batch-size", "2", "--peak-tflops", "1", "--quiet", "--eval-items", "2", "--eval-every", "0",
           "--steps", "1", "--lr", "1e-9", "--warmup", "0", "--export", "b", "--checkpoints", str(ck)]
    assert train.main(run) == 0
    model = load_model(ck / "b")
    assert model.cfg.dropout == 0.1 and model.cfg == dataclasses.replace(source.cfg, dropout=0.1)
    for name, p in model.state_dict().items():
        torch.testing.assert_close(p, source.state_dict()[name], atol=1e-6, rtol=0)
    bad = ["image", "--data", str(images), "--out", str(tmp_path / "c"), "--init", str(ck / "a"), "--dropout", "1.5"]
    assert train.main(bad) == 2
    assert "--dropout 1.5: dropout must be in [0, 1)" in capsys.readouterr().err


def test_init_with_lag_inputs_adds_them_zeroed_and_a_new_model_may_have_them(images, tmp_path, capsys):
    ck = tmp_path / "checkpoints"
    source = export_tiny(images, tmp_path / "a", ck / "a")
    grow = ["image", "--data", str(images), "--init", str(ck / "a"), "--lag-inputs", "24", "--batch-size", "2",
            "--peak-tflops", "1", "--quiet", "--eval-items", "2", "--eval-every", "0", "--precision", "fp32",
            "--lr", "1e-9", "--warmup", "0", "--steps", "1", "--checkpoints", str(ck), "--export", "b"]
    assert train.main([*grow, "--out", str(tmp_path / "b")]) == 0
    assert "given 24 lag inputs (zeroed)" in capsys.readouterr().err
    grown = load_model(ck / "b")
    assert grown.cfg.lag_inputs == 24 and grown.cfg.token_values == "linear"  # image intensities
    assert grown.lag.abs().max() < 1e-6  # lr 1e-9: still the source's function
    tokens = torch.randint(0, 256, (1, 12288))
    torch.testing.assert_close(grown.eval()(tokens), source.eval()(tokens), atol=1e-4, rtol=0)
    again = ["image", "--data", str(images), "--out", str(tmp_path / "c"), "--init", str(ck / "b"), "--lag-inputs",
             "8"]
    assert train.main(again) == 2
    assert "--init can only add lag inputs to a model without them" in capsys.readouterr().err
    new = ["audio", "--data", str(images), "--out", str(tmp_path / "d"), "--config", "tiny", "--lag-inputs", "4"]
    assert settings_model_config(new).token_values == "mu_law"
    lstm = ["image", "--data", str(images), "--out", str(tmp_path / "e"), "--arch", "lstm", "--lag-inputs", "4"]
    assert train.main(lstm) == 2
    assert "--lag-inputs is not for --arch lstm" in capsys.readouterr().err


def settings_model_config(argv: list[str]):
    """The model config train.py would build from ``argv`` (without reading data)."""
    from training.settings import model_config, resolve_settings
    args = vars(train.parse_args(argv))
    return model_config(resolve_settings({k: v for k, v in args.items() if v is not None}))


def test_init_with_more_layers_deepens_the_checkpoint_and_resumes_as_deepened(images, tmp_path, capsys):
    ck = tmp_path / "checkpoints"
    source = export_tiny(images, tmp_path / "a", ck / "a")
    grow = ["image", "--data", str(images), "--init", str(ck / "a"), "--layers", "3", "--batch-size", "2",
            "--peak-tflops", "1", "--quiet", "--eval-items", "2", "--eval-every", "0", "--precision", "fp32",
            "--lr", "1e-9", "--warmup", "0", "--steps", "3", "--checkpoints", str(ck)]
    assert train.main([*grow, "--out", str(tmp_path / "b"), "--stop-after", "1"]) == 0
    assert "deepened from 2 to 3 layers" in capsys.readouterr().err
    state_path = tmp_path / "b" / "state.pt"
    resume = ["image", "--data", str(images), "--out", str(tmp_path / "b"), "--resume", "--quiet", "--peak-tflops",
              "1", "--checkpoints", str(ck)]
    state = torch.load(state_path, weights_only=True)
    assert state["history"] == source.card["training_history"]  # the runs behind the --init weights
    del state["history"]  # as written before runs kept their history: resuming reads it from the --init card
    torch.save(state, state_path)
    assert train.main([*resume, "--stop-after", "1"]) == 0
    state = torch.load(state_path, weights_only=True)
    assert state["step"] == 2 and state["history"] == source.card["training_history"]
    state["history"] = [{"steps": 7, "note": "kept across --resume"}]
    torch.save(state, state_path)
    assert train.main([*resume, "--export", "b"]) == 0
    grown = load_model(ck / "b")
    assert grown.cfg.n_layers == 3 and source.cfg.n_layers == 2
    assert grown.card["tokens_seen"] == source.card["tokens_seen"] + 3 * 2 * 12288
    earlier, run = grown.card["training_history"]
    assert earlier == {"steps": 7, "note": "kept across --resume"}
    assert run["steps"] == run["schedule_steps"] == 3 and run["layers"] == 3 and run["init"] == str(ck / "a")
    tokens = torch.randint(0, 256, (1, 12288), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # lr 1e-9: the grown model still computes what the source did
        torch.testing.assert_close(grown.eval()(tokens), source.eval()(tokens), atol=1e-4, rtol=0)


def test_a_card_without_a_history_gives_one_entry_for_the_run_that_made_it():
    card = {"config": {"n_layers": 6}, "steps": 700,
            "training": {"init": None, "lr": 1.5e-3, "warmup": 50, "steps": 700, "batch_size": 2,
                         "precision": "fp32", "seed": 0, "clip": 1.0}}
    assert training.earlier_runs(card) == [{"steps": 700, "schedule_steps": 700, "layers": 6, "init": None,
                                            "lr": 1.5e-3, "warmup": 50, "batch_size": 2, "precision": "fp32",
                                            "seed": 0}]
    history = [{"steps": 700}, {"steps": 201}]
    assert training.earlier_runs({**card, "training_history": history}) == history
    assert training.earlier_runs({**card, "training_history": history}) is not history  # a copy to extend


def test_a_stopped_and_resumed_run_matches_an_uninterrupted_one(images, tmp_path):
    common = ["image", "--data", str(images), *FAST, "--steps", "4", "--dropout", "0.1", "--ema", "0.9",
              "--lr", "3e-3", "--warmup", "1", "--micro-batch", "1", "--eval-every", "0"]
    assert train.main([*common, "--out", str(tmp_path / "whole")]) == 0
    assert train.main([*common, "--out", str(tmp_path / "split"), "--stop-after", "2"]) == 0
    assert max(steps_of(tmp_path / "split")) == 2
    assert train.main(["image", "--data", str(images), "--out", str(tmp_path / "split"), "--resume", "--quiet",
                       "--peak-tflops", "1"]) == 0
    whole, split = steps_of(tmp_path / "whole"), steps_of(tmp_path / "split")
    assert sorted(split) == [1, 2, 3, 4]
    for step in range(1, 5):
        assert split[step]["loss"] == whole[step]["loss"], step
        assert split[step]["lr"] == whole[step]["lr"], step
    a, b = saved_params(tmp_path / "whole"), saved_params(tmp_path / "split")
    assert all(torch.equal(a[k], b[k]) for k in a)
    ema_a = torch.load(tmp_path / "whole" / "state.pt", weights_only=True)["ema"]["params"]
    ema_b = torch.load(tmp_path / "split" / "state.pt", weights_only=True)["ema"]["params"]
    assert all(torch.equal(x, y) for x, y in zip(ema_a, ema_b, strict=True))


def test_auto_precision_takes_bf16_on_a_cpu_only_where_its_matmuls_are_fast(monkeypatch):
    speeds, calls = {}, []

    def measured(device, dtype):
        calls.append(dtype)
        return speeds[dtype].pop(0), "measured"

    monkeypatch.setattr(training.precision, "device_peak_flops", measured)
    cpu = torch.device("cpu")
    speeds.update({torch.bfloat16: [1200e9, 1100e9], torch.float32: [300e9, 290e9]})  # AMX
    assert training.choose_precision(cpu) == ("bf16", "bf16 matmuls at 1,200 GFLOP/s, fp32 at 300 on this CPU")
    assert calls == [torch.bfloat16, torch.float32] * 2  # in turn
    speeds.update({torch.bfloat16: [1e9, 1e9], torch.float32: [150e9, 150e9]})  # emulated bf16
    assert training.choose_precision(cpu)[0] == "fp32"
    speeds.update({torch.bfloat16: [400e9, 390e9], torch.float32: [300e9, 300e9]})  # not enough to pay for the casts
    assert training.choose_precision(cpu)[0] == "fp32"
    # AVX512-BF16 at 2.0x, the bf16 probe once slowed by other work: the best of each decides
    speeds.update({torch.bfloat16: [240e9, 397e9], torch.float32: [176e9, 196e9]})
    assert training.choose_precision(cpu)[0] == "bf16"


@pytest.mark.parametrize("native, expected", [(True, "bf16"), (False, "fp16")])
def test_auto_precision_on_a_gpu_is_bf16_where_native_else_fp16(monkeypatch, native, expected):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: native)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Some GPU")
    assert training.choose_precision(torch.device("cuda", 0))[0] == expected


def test_the_default_precision_is_chosen_once_and_kept_on_resume(images, tmp_path, monkeypatch):
    run = tmp_path / "run"
    argv = ["image", "--data", str(images), "--out", str(run), *TINY, "--steps", "2", "--eval-every", "0"]
    monkeypatch.setattr(training.precision, "choose_precision", lambda device: ("fp32", "probed"))
    assert train.main([*argv, "--stop-after", "1"]) == 0
    assert json.loads((run / "run.json").read_text())["precision"] == "fp32"
    start = read_log(run)[0]
    assert (start["precision"], start["precision_how"]) == ("fp32", "probed")

    def probe_again(device):
        raise AssertionError("a resumed run must keep its precision, not choose again")

    monkeypatch.setattr(training.precision, "choose_precision", probe_again)
    assert train.main([*argv, "--resume", "--precision", "auto"]) == 0
    assert json.loads((run / "run.json").read_text())["precision"] == "fp32"
    assert [r["precision"] for r in read_log(run) if r.get("event") == "start"] == ["fp32", "fp32"]


def test_the_log_drops_lines_past_the_checkpoint_on_resume(images, tmp_path):
    run = tmp_path / "run"
    argv = ["image", "--data", str(images), "--out", str(run), *FAST, "--steps", "3", "--eval-every", "0"]
    assert train.main([*argv, "--stop-after", "1"]) == 0
    with open(run / "log.jsonl", "a") as f:  # as if killed after logging step 2 but before its checkpoint
        f.write(json.dumps({"step": 2, "loss": 1.0}) + "\n")
    assert train.main(["image", "--data", str(images), "--out", str(run), "--resume", "--quiet"]) == 0
    assert [r["step"] for r in read_log(run) if "event" not in r] == [1, 2, 3]


def test_resume_drops_a_torn_last_line_of_the_log(tmp_path):
    log = tmp_path / "log.jsonl"
    whole = [json.dumps({"event": "start", "step": 0}), json.dumps({"step": 1, "loss": 2.0}),
             json.dumps({"step": 2, "loss": 1.5})]
    log.write_text("\n".join(whole) + "\n" + json.dumps({"step": 3, "loss": 1.25})[:9])  # killed mid-write
    training.log.Log(log, True, resume_step=2).close()
    assert log.read_text() == "".join(line + "\n" for line in whole)
    log.write_text(log.read_text() + '{"step": 2, "lo')
    lg = training.log.Log(log, True, resume_step=1)
    lg.write(step=2, loss=1.0)
    lg.close()
    assert [json.loads(line)["step"] for line in log.read_text().splitlines()] == [0, 1, 2]


def torchrun(args: list[str], tmp_path: Path) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(ROOT / "train.py"), *args], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stderr


@pytest.mark.parametrize("shard", [[], ["--fsdp"]], ids=["ddp", "fsdp"])
def test_two_processes_take_the_same_step_as_one_on_the_same_global_batch(images, tmp_path, shard):
    common = ["image", "--data", str(images), *FAST, "--steps", "2", "--precision", "fp32", "--lr", "1e-2",
              "--warmup", "1", "--eval-every", "0"]
    assert train.main([*common, "--out", str(tmp_path / "one"), "--micro-batch", "2"]) == 0
    err = torchrun([*common, "--out", str(tmp_path / "two"), "--micro-batch", "1", *shard], tmp_path)
    assert "returned a view tensor" not in err and "wrong gradients" not in err  # FSDP's warning, on every step
    one, two = saved_params(tmp_path / "one"), saved_params(tmp_path / "two")
    assert one.keys() == two.keys()
    torch.manual_seed(0)
    initial = SparseTransformer(config_for("image", "tiny")).state_dict()
    moved = (one["head.weight"] - initial["head.weight"]).abs().max()
    assert moved > 1e-4  # the steps did change the weights
    for k in one:  # Adam normalises by |grad|: summation-order noise of tiny gradients shows as ~1e-5 (lr 1e-2)
        assert torch.allclose(one[k], two[k], atol=2e-5, rtol=1e-5), k
    log_one, log_two = steps_of(tmp_path / "one"), steps_of(tmp_path / "two")
    assert log_one[2]["loss"] == pytest.approx(log_two[2]["loss"], rel=1e-5)


def test_fp16_with_dynamic_loss_scaling_trains(images, tmp_path):
    run = tmp_path / "run"
    argv = ["image", "--data", str(images), "--out", str(run), *FAST, "--steps", "2", "--precision", "fp16",
            "--eval-every", "2"]
    assert train.main(argv) == 0
    assert all(math.isfinite(r["loss"]) for r in steps_of(run).values())
    assert torch.load(run / "state.pt", weights_only=True)["scaler"]["scale"] > 0


def test_gradient_accumulation_equals_one_big_batch(images, tmp_path):
    common = ["image", "--data", str(images), *FAST, "--steps", "2", "--precision", "fp32", "--lr", "1e-2",
              "--warmup", "1", "--eval-every", "0"]
    assert train.main([*common, "--out", str(tmp_path / "big"), "--micro-batch", "2"]) == 0
    assert train.main([*common, "--out", str(tmp_path / "acc"), "--micro-batch", "1"]) == 0
    big, acc = saved_params(tmp_path / "big"), saved_params(tmp_path / "acc")
    # Rounding differs (one sum over 2 sequences or two sums of 1), and Adam's first steps, which normalise
    # each gradient, amplify it to ~3e-5 here; a lost or repeated micro-batch shows at the learning rate's scale (1e-2).
    for k in big:
        assert torch.allclose(big[k], acc[k], atol=1e-4, rtol=1e-5), k


def nan_forward_on(calls: set[int]):
    original = SparseTransformer.forward
    count = {"n": 0}

    def forward(self, tokens, **kw):
        count["n"] += 1
        out = original(self, tokens, **kw)
        return out * float("nan") if count["n"] in calls and self.training else out

    return forward


def test_a_non_finite_loss_skips_the_step_and_is_logged(images, tmp_path, monkeypatch):
    monkeypatch.setattr(SparseTransformer, "forward", nan_forward_on({3}))  # step 2 (2 micro-batches per step)
    run = tmp_path / "run"
    argv = ["image", "--data", str(images), "--out", str(run), *FAST, "--steps", "3", "--eval-every", "0"]
    assert train.main(argv) == 0
    steps = steps_of(run)
    assert steps[2].get("event") == "nonfinite" and steps[1].get("event") is None and steps[3].get("event") is None
    assert math.isfinite(steps[3]["loss"])
    assert all(torch.isfinite(v).all() for v in saved_params(run).values())


def test_repeated_non_finite_losses_stop_the_run_with_a_clear_message(images, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(SparseTransformer, "forward", nan_forward_on(set(range(1, 100))))
    argv = ["image", "--data", str(images), "--out", str(tmp_path / "run"), *FAST, "--steps", "10",
            "--max-nonfinite", "3", "--eval-every", "0"]
    assert train.main(argv) == 2
    assert "3 non-finite losses in a row" in capsys.readouterr().err
    assert sum(r.get("event") == "nonfinite" for r in read_log(tmp_path / "run")) == 3


def test_sigterm_saves_a_checkpoint_that_resumes(images, tmp_path):
    run = tmp_path / "run"
    cmd = [sys.executable, str(ROOT / "train.py"), "image", "--data", str(images), "--out", str(run), *FAST,
           "--steps", "200", "--eval-every", "0", "--save-every", "1000"]
    proc = subprocess.Popen(cmd, cwd=tmp_path, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not ((run / "log.jsonl").exists() and len(read_log(run)) >= 2):
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-2000:]
    saved_step = torch.load(run / "state.pt", weights_only=True)["step"]
    assert 1 <= saved_step < 200 and "resume with --resume" in err
    assert train.main(["image", "--data", str(images), "--out", str(run), "--resume", "--quiet", "--steps",
                       str(saved_step + 1)]) == 0
    assert max(steps_of(run)) == saved_step + 1


def test_checkpoints_are_replaced_atomically(tmp_path, monkeypatch):
    path = tmp_path / "state.pt"
    training.atomic_torch_save({"step": 1}, path)

    def broken_save(obj, f):
        f.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError):
        training.atomic_torch_save({"step": 2}, path)
    assert torch.load(path)["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["state.pt"]


class OpensAFile:
    """Unpickling this calls open(path, "w"): a stand-in for what a hostile state.pt could run."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (str(self.path), "w"))


def test_resume_reads_state_as_tensors_and_plain_data_and_refuses_pickled_objects(images, tmp_path, capsys):
    run = tmp_path / "run"
    argv = ["image", "--data", str(images), "--out", str(run), *FAST, "--steps", "2", "--eval-every", "0",
            "--ema", "0.9"]
    assert train.main([*argv, "--stop-after", "1"]) == 0
    state = torch.load(run / "state.pt", weights_only=True)  # what a run writes needs no unpickling of objects
    assert state["step"] == 1 and state["ema"]["decay"] == 0.9
    resume = ["image", "--data", str(images), "--out", str(run), "--resume", "--quiet"]
    marker = tmp_path / "unpickled"
    torch.save({**state, "data": OpensAFile(marker)}, run / "state.pt")
    assert train.main(resume) == 2
    err = capsys.readouterr().err
    assert "train.py: error: --resume:" in err and "holds objects other than tensors and plain data" in err
    assert "was not loaded" in err and not marker.exists()
    (run / "state.pt").write_bytes(b"half a checkpoint")
    assert train.main(resume) == 2
    assert "the file is corrupt" in capsys.readouterr().err


def test_temporaries_of_a_run_killed_during_a_save_are_removed_on_the_next_start(images, tmp_path, capsys):
    run = tmp_path / "run"
    argv = ["image", "--data", str(images), "--out", str(run), *FAST, "--steps", "2", "--eval-every", "0"]
    assert train.main([*argv, "--stop-after", "1"]) == 0
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)  # a process that has ended
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        stale = [run / f"state.pt.{dead_pid}.tmp", run / f"log.jsonl.{dead_pid}.tmp"]
        kept = [run / f"state.pt.{alive.pid}.tmp", run / f"other.pt.{dead_pid}.tmp", run / "state.pt.tmp",
                run / f"state.pt.{dead_pid}.tmp.bak"]
        for p in stale + kept:
            p.write_bytes(b"x" * 1000)
        assert train.main(["image", "--data", str(images), "--out", str(run), "--resume", "--quiet"]) == 0
        assert not any(p.exists() for p in stale) and all(p.exists() for p in kept)
        assert f"removed {stale[0]}, a temporary file of a killed run" in capsys.readouterr().err
    finally:
        alive.kill()
        alive.wait()


def test_run_settings_are_replaced_atomically(tmp_path, monkeypatch):
    cfg, settings = config_for("image", "tiny"), {"kind": "image", **training.RUN_SETTINGS}
    training.settings.save_run_settings(tmp_path, settings, cfg)
    before = (tmp_path / "run.json").read_text()

    def torn_write(path, text, *args, **kwargs):  # half the file reaches the disk, then it is full
        with open(path, "w") as f:
            f.write(text[: len(text) // 2])
        raise OSError("disk full")

    monkeypatch.setattr(Path, "write_text", torn_write)
    with pytest.raises(OSError):
        training.settings.save_run_settings(tmp_path, {**settings, "steps": 5}, cfg)
    assert (tmp_path / "run.json").read_text() == before
    assert [p.name for p in tmp_path.iterdir()] == ["run.json"]


def test_audio_training_from_a_folder_of_clips(tmp_path):
    clips = tmp_path / "clips"
    clips.mkdir()
    t = np.arange(22050 * 2) / 22050
    for i in range(4):
        stereo = np.stack([np.sin(2 * np.pi * (220 + 50 * i) * t), np.sin(2 * np.pi * 330 * t)], 1) * 0.5
        sf.write(clips / f"clip{i}.wav", stereo.astype(np.float32), 22050)
    sf.write(clips / "extra.flac", (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32), 22050)
    (clips / "broken.wav").write_bytes(b"RIFF....not audio")
    argv = ["audio", "--data", str(clips), "--out", str(tmp_path / "run"), *FAST, "--seq-len", "2048",
            "--steps", "2", "--eval-every", "2", "--export", "tiny-audio", "--checkpoints", str(tmp_path / "ck")]
    assert train.main(argv) == 0
    model = load_model(tmp_path / "ck" / "tiny-audio")
    assert model.cfg.seq_len == 2048 and model.card["codec"]["sample_rate"] == 12000
    start = read_log(tmp_path / "run")[0]
    assert start["event"] == "start" and start["skipped_files"] >= 1


def test_audio_windows_train_at_offsets_of_the_models_sequence(tmp_path, monkeypatch):
    clips = tmp_path / "clips"
    clips.mkdir()
    t = np.arange(12000 * 3) / 12000
    for i in range(3):
        sf.write(clips / f"clip{i}.wav", (0.5 * np.sin(2 * np.pi * (220 + 50 * i) * t)).astype(np.float32), 12000)
    offsets, forward = [], SparseTransformer.forward

    def spy(self, tokens, flat=False, offset=0):
        if torch.is_grad_enabled():
            offsets.append((tokens.shape[1], offset))
        return forward(self, tokens, flat, offset)

    monkeypatch.setattr(SparseTransformer, "forward", spy)
    argv = ["audio", "--data", str(clips), "--out", str(tmp_path / "run"), *FAST, "--seq-len", "4096",
            "--window", "512", "--steps", "6", "--eval-every", "6", "--val-fraction", "0.5",
            "--export", "w", "--checkpoints", str(tmp_path)]
    assert train.main(argv) == 0
    log = read_log(tmp_path / "run")
    assert log[0]["window"] == 512 and log[1]["tokens_seen"] == 2 * 512
    cfg = load_model(tmp_path / "w").cfg
    assert cfg.seq_len == 4096 and cfg.window_offset_step == 256  # lcm(block 32, stride 256)
    assert {n for n, _ in offsets} == {512} and len({o for _, o in offsets}) > 1
    assert all(o % 256 == 0 and 0 <= o <= 4096 - 512 for _, o in offsets)
    assert load_model(tmp_path / "w").card["training"]["window"] == 512


@pytest.mark.parametrize("extra, message", [
    (["--window", "100"], "--window is for audio"),
    (["--seq-len", "100"], "--seq-len is for audio"),
    (["--batch-size", "3", "--micro-batch", "2"], "multiple of --micro-batch"),
    (["--steps", "0"], "--steps must be >= 1"),
    (["--heads", "3"], "invalid model settings"),
    (["--resume"], "no run to resume"),
])
def test_bad_settings_exit_with_one_clear_line(images, tmp_path, capsys, extra, message):
    argv = ["image", "--data", str(images), "--out", str(tmp_path / "run"), *FAST, *extra]
    assert train.main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.startswith("train.py: error:")


def test_an_existing_run_is_never_overwritten(images, tmp_path, capsys):
    argv = ["image", "--data", str(images), "--out", str(tmp_path / "run"), *FAST, "--steps", "1",
            "--eval-every", "0"]
    assert train.main(argv) == 0
    before = (tmp_path / "run" / "state.pt").read_bytes()
    assert train.main(argv) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert (tmp_path / "run" / "state.pt").read_bytes() == before
    assert train.main([*argv, "--resume", "--width", "128"]) == 2
    assert "cannot change" in capsys.readouterr().err


def test_missing_or_empty_data_is_a_clear_error(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    for data in (tmp_path / "nowhere", tmp_path / "empty"):
        assert train.main(["image", "--data", str(data), "--out", str(tmp_path / "run"), *FAST]) == 2
        assert "cannot read --data" in capsys.readouterr().err


def picture_folder(folder: Path, n: int) -> Path:
    from PIL import Image

    folder.mkdir()
    y, x = np.mgrid[0:64, 0:64]
    for i in range(n):
        Image.fromarray(np.stack([x * 4 + i, y * 4, (x + y) * 2], -1).astype(np.uint8)).save(folder / f"p{i}.png")
    return folder


def test_a_folder_of_three_pictures_trains_without_a_held_out_split(tmp_path, capsys):
    data = picture_folder(tmp_path / "three", 3)
    argv = ["image", "--data", str(data), "--out", str(tmp_path / "run"), *FAST, "--steps", "1"]
    assert train.main([*argv, "--eval-every", "0"]) == 0  # no val split needed: no evaluation, no export
    assert read_log(tmp_path / "run")[0]["val_items"] == 0
    assert train.main([*argv, "--out", str(tmp_path / "run2"), "--eval-every", "1"]) == 2
    err = capsys.readouterr().err
    assert "no readable images for split 'val'" in err and "--val-fraction" in err and "--eval-every 0" in err


def test_val_fraction_goes_to_the_folder_readers_and_is_kept_on_resume(tmp_path, capsys):
    data = picture_folder(tmp_path / "six", 6)
    run = tmp_path / "run"
    argv = ["image", "--data", str(data), "--out", str(run), *FAST, "--steps", "2", "--eval-every", "1",
            "--val-fraction", "0.5"]
    assert train.main([*argv, "--stop-after", "1"]) == 0
    start = read_log(run)[0]
    assert start["val_items"] >= 1 and start["train_items"] + start["val_items"] == 6
    assert json.loads((run / "run.json").read_text())["val_fraction"] == 0.5
    assert train.main(["image", "--data", str(data), "--out", str(run), "--resume", "--quiet"]) == 0
    assert [r["train_items"] for r in read_log(run) if r.get("event") == "start"] == [start["train_items"]] * 2
    assert train.main([*argv, "--out", str(tmp_path / "bad"), "--val-fraction", "1"]) == 2
    assert "--val-fraction must be in [0, 1)" in capsys.readouterr().err


def test_data_smaller_than_a_batch_is_a_clear_error(images, tmp_path, capsys):
    data = picture_folder(tmp_path / "three", 3)
    argv = ["image", "--data", str(data), "--out", str(tmp_path / "run"), *FAST, "--eval-every", "0",
            "--batch-size", "4", "--micro-batch", "4"]
    assert train.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("train.py: error:") and "fewer than one global batch" in err and "--micro-batch" in err
    assert train.main(["image", "--data", str(images), "--out", str(tmp_path / "npz"), *FAST,
                       "--val-fraction", "0.1"]) == 2
    assert "--val-fraction is for folders" in capsys.readouterr().err


def test_learning_rate_warms_up_linearly_then_decays_by_cosine():
    f = [training.lr_factor(s, 10, 100, 0.1) for s in range(100)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(f[10:], f[11:], strict=False))
    assert training.lr_factor(100, 10, 100, 0.1) == pytest.approx(0.1)
    assert f[55] == pytest.approx(0.55, abs=0.01)  # half way through the decay


@pytest.mark.skipif(not (sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"), reason="glibc only")
def test_keep_freed_memory_sets_glibcs_malloc_and_declines_elsewhere(monkeypatch):
    """glibc takes every setting (mallopt returns 1); a C library that refuses one, or none to load, is reported."""
    from training import memory

    assert memory.keep_freed_memory()

    class Refusing:
        def __init__(self, name):
            self.mallopt = lambda param, value: 0

    monkeypatch.setattr(memory.ctypes, "CDLL", Refusing)
    assert not memory.keep_freed_memory()
    monkeypatch.setattr(memory.ctypes.util, "find_library", lambda name: None)
    assert not memory.keep_freed_memory()
