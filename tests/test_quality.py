"""Held-out bits (models.evaluate) and the quality benchmark against lossless codecs (bench.quality)."""

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from bench.quality import evaluate, flac_bits, png_bits, sample_measures, webp_lossless_bits
from data.imagenet64 import write_imagenet64_npz
from media import mu_law_encode
from models import SparseTransformer, codec_card, config_for, load_card, save_model
from models.evaluate import sequence_bits
from sampling import SamplingOptions

ROOT = Path(__file__).resolve().parent.parent


def test_sequence_bits_is_the_cross_entropy_of_each_sequence_in_bits():
    torch.manual_seed(0)
    model = SparseTransformer(config_for("audio", "tiny", seq_len=512)).train()
    torch.nn.init.normal_(model.head.weight, std=0.5)
    tokens = torch.randint(0, 256, (3, 512), dtype=torch.uint8)
    bits = torch.cat(list(sequence_bits(model, [tokens[:2], tokens[2:]])))
    assert model.training  # restored afterwards
    with torch.no_grad():
        logits = model.eval()(tokens.long())
    expected = F.cross_entropy(logits.transpose(1, 2), tokens.long(), reduction="none").sum(1) / math.log(2)
    assert bits.dtype == torch.float64 and bits.shape == (3,)
    torch.testing.assert_close(bits.float(), expected, rtol=1e-5, atol=1e-3)


def test_codecs_spend_few_bits_on_flat_data_and_about_eight_on_noise():
    rng = np.random.default_rng(0)
    flat, noise = np.full((64, 64, 3), 90, np.uint8), rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    for coder in (png_bits, webp_lossless_bits):
        assert coder(flat) / flat.size < 0.5
        assert 7.9 < coder(noise) / noise.size < 8.5
    clip_flat, clip_noise = np.full(65536, 128, np.uint8), rng.integers(0, 256, 65536, dtype=np.uint8)
    assert flac_bits(clip_flat) / clip_flat.size < 0.5
    assert 7.9 < flac_bits(clip_noise) / clip_noise.size < 8.6


def test_the_benchmark_compares_a_checkpoint_with_codecs_and_updates_its_card(tmp_path):
    rng = np.random.default_rng(0)
    images = np.repeat(np.repeat(rng.integers(0, 256, (4, 8, 8, 3), dtype=np.uint8), 8, 1), 8, 2)
    write_imagenet64_npz(tmp_path / "data" / "val_data.npz", images, [0, 1, 2, 3])
    torch.manual_seed(0)
    save_model(SparseTransformer(config_for("image", "tiny")), tmp_path / "ck" / "img",
               {"codec": codec_card("image"), "data": {"path": str(tmp_path / "data")}})
    command = [sys.executable, "-m", "bench.quality", "--checkpoint", str(tmp_path / "ck" / "img"),
               "--items", "2", "--update-card", "--measure", "2", "--temperature", "0.9"]
    run = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    result = json.loads(run.stdout.strip().splitlines()[-1])[0]
    assert result["items"] == 2 and result["unit"] == "bits/dim" and set(result["codecs"]) == {"PNG", "WebP lossless"}
    assert result["model"] == pytest.approx(8.0, abs=0.05)  # an untrained model: uniform over 256 values
    assert "PNG" in run.stdout and "model saves" in run.stdout
    evaluation = load_card(tmp_path / "ck" / "img")["evaluation"]
    assert evaluation["items"] == 2 and evaluation["codecs"]["PNG"] == pytest.approx(result["codecs"]["PNG"], rel=1e-3)
    measures = result["samples"]  # an untrained model samples uniform noise: rough and speckled, unlike the data
    assert measures["count"] == 2 and measures["options"]["temperature"] == 0.9 and "roughness" in run.stdout
    assert measures["from_scratch"]["speckle"] > 3 * measures["data"]["speckle"]
    assert measures["continuations"]["roughness"] > 2 * measures["data_continued_part"]["roughness"]
    assert evaluation["samples"]["from_scratch"] == measures["from_scratch"]


def test_the_benchmark_codes_training_items_with_split_train_but_never_writes_them_to_the_card(tmp_path):
    rng = np.random.default_rng(1)
    flat = np.full((3, 64, 64, 3), 128, np.uint8)  # train: flat grey, val: noise
    write_imagenet64_npz(tmp_path / "data" / "train_data_batch_1.npz", flat, [0, 1, 2])
    write_imagenet64_npz(tmp_path / "data" / "val_data.npz", rng.integers(0, 256, (2, 64, 64, 3), np.uint8), [0, 1])
    torch.manual_seed(0)
    save_model(SparseTransformer(config_for("image", "tiny")), tmp_path / "ck" / "img",
               {"codec": codec_card("image"), "data": {"path": str(tmp_path / "data")}})
    command = [sys.executable, "-m", "bench.quality", "--checkpoint", str(tmp_path / "ck" / "img"), "--measure", "0"]
    run = subprocess.run([*command, "--split", "train"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    result = json.loads(run.stdout.strip().splitlines()[-1])[0]
    assert (result["split"], result["items"], result["of_items"]) == ("train", 3, 3)
    assert "3 of 3 train items" in run.stdout
    assert result["codecs"]["WebP lossless"] < 0.1  # the flat training images, not the noisy validation ones
    refused = subprocess.run([*command, "--split", "train", "--update-card"], cwd=ROOT, capture_output=True, text=True,
                             timeout=300)
    assert refused.returncode == 2 and "only with --split val" in refused.stderr
    assert "evaluation" not in load_card(tmp_path / "ck" / "img")
    with pytest.raises(ValueError, match="split must be one of"):
        evaluate(tmp_path / "ck" / "img", None, None, 1, split="test")


def test_audio_measures_tell_a_models_noise_from_the_datas_tone():
    torch.manual_seed(0)
    model = SparseTransformer(config_for("audio", "tiny", seq_len=4096)).eval()
    model.card = {"codec": codec_card("audio")}
    t = np.arange(4096) / 12000
    tone = mu_law_encode((0.5 * np.sin(2 * np.pi * 440 * t)).astype(np.float32))
    measures = sample_measures(model, "audio", [tone, tone], 2, SamplingOptions(), 1500, 2)
    assert measures["length"] == 1500
    assert measures["data"]["flatness"] < 0.01
    assert measures["from_scratch"]["flatness"] > 0.4 and measures["continuations"]["flatness"] > 0.4
