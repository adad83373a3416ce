"""The sparse LSTM baseline: chunked state equals one pass, layouts, checkpoints, bad options."""

import json

import pytest
import torch

import sample
from app.cards import card_markdown, weight_layout_picture
from app.registry import Registry
from models import CheckpointError, LSTMConfig, SparseLSTM, codec_card, load_card, load_model, save_model
from models.checkpoint import checkpoint_paths
from models.lstm import matmul_parameters
from sampling import Decoder, SamplingOptions, decoding_step, generate, generate_audio

SPARSE = dict(hidden=64, block=8, density=0.4, n_layers=2, seq_len=256)


def make_model(**kw) -> SparseLSTM:
    torch.manual_seed(0)
    model = SparseLSTM(LSTMConfig(**{**SPARSE, **kw}))
    torch.nn.init.normal_(model.head.weight, std=0.5)  # the head starts at zero: make the logits differ
    return model.eval()


@pytest.mark.parametrize("kw", [{}, {"density": 1.0}, {"multiplicative": True, "layout": "ba"}])
def test_chunks_with_carried_state_equal_one_pass(kw):
    model = make_model(**kw)
    tokens = torch.randint(0, 256, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full, end = model(tokens)
        parts, state = [], None
        for chunk in tokens.split([7, 1, 20, 12], dim=1):
            logits, state = model(chunk, state)
            parts.append(logits)
    assert full.shape == (2, 40, 256)
    torch.testing.assert_close(torch.cat(parts, 1), full, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(state.h, end.h, rtol=1e-5, atol=1e-5)
    assert torch.equal(state.last, tokens[:, -1])


def test_position_zero_reads_the_start_embedding_only():
    model = make_model()
    a = torch.tensor([[5, 6, 7]])
    b = torch.tensor([[9, 6, 7]])
    with torch.no_grad():
        la, _ = model(a)
        lb, _ = model(b)
    assert torch.equal(la[:, 0], lb[:, 0]) and not torch.allclose(la[:, 1], lb[:, 1])


def test_decode_steps_equal_the_forward_pass():
    model = make_model(multiplicative=True)
    tokens = torch.randint(0, 256, (3, 25), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full, _ = model(tokens)
    h, c = model.zero_state(3)
    steps = []
    for t in range(25):
        logits, h, c = model.decode(tokens[:, t - 1] if t else None, h, c)
        steps.append(logits)
    torch.testing.assert_close(torch.stack(steps, 1), full, rtol=1e-5, atol=1e-5)


def test_sparse_layouts_are_small_world_and_about_five_times_wider_at_equal_parameters():
    dense = LSTMConfig(hidden=128, density=1.0)
    sparse = LSTMConfig(hidden=640, block=8, density=0.04)  # 5x wider, 1/25 of the blocks
    recurrent = [matmul_parameters(c) - c.hidden * c.vocab for c in (sparse, dense)]  # without the head
    assert 0.8 < recurrent[0] / recurrent[1] < 1.2
    model = SparseLSTM(sparse)
    assert model.layouts.shape == (2, 80, 80) and model.layouts.dtype == torch.uint8
    assert abs(model.layouts.float().mean().item() - 0.04) < 0.01
    assert not torch.equal(model.layouts[0], model.layouts[1])  # each matrix has its own seed
    assert torch.equal(SparseLSTM(sparse).layouts, model.layouts)  # rebuilt from the recipe
    ba = SparseLSTM(LSTMConfig(hidden=640, block=8, density=0.04, layout="ba"))
    assert abs(ba.layouts.float().mean().item() - 0.04) < 0.015


def test_training_reaches_every_weight_through_chunks():
    model = make_model(multiplicative=True).train()
    tokens = torch.randint(0, 256, (2, 16))
    logits, state = model(tokens[:, :8])
    logits2, _ = model(tokens[:, 8:], state.detach())
    (logits.sum() + logits2.sum()).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for n, p in model.named_parameters() if n != "start")


CARD = {"codec": codec_card("audio"), "steps": 2, "tokens_seen": 512}


@pytest.mark.parametrize("kw", [{}, {"density": 1.0, "multiplicative": True}])
def test_save_load_round_trip(tmp_path, kw):
    model = make_model(**kw)
    save_model(model, tmp_path / "lstm", CARD)
    card = load_card(tmp_path / "lstm")
    assert card["architecture"] == "lstm" and card["config"] == model.cfg.to_dict()
    assert card["parameters"] == model.num_parameters()
    loaded = load_model(tmp_path / "lstm")
    assert isinstance(loaded, SparseLSTM) and loaded.cfg == model.cfg and not loaded.training
    tokens = torch.randint(0, 256, (1, 30))
    with torch.no_grad():
        assert torch.equal(loaded(tokens)[0], model(tokens)[0])


def test_stored_layouts_that_differ_from_the_recipe_are_refused(tmp_path):
    model = make_model()
    with torch.no_grad():
        model.layouts[0, 0, 1] ^= 1
    save_model(model, tmp_path / "lstm", CARD)
    with pytest.raises(CheckpointError, match="other block layouts than the config builds"):
        load_model(tmp_path / "lstm")


def test_unknown_architecture_and_bad_lstm_configs_in_cards_are_refused(tmp_path):
    save_model(make_model(), tmp_path / "lstm", CARD)
    card_path = checkpoint_paths(tmp_path / "lstm")[1]
    text = card_path.read_text()
    card_path.write_text(text.replace('"architecture": "lstm"', '"architecture": "gru"'))
    with pytest.raises(CheckpointError, match="unknown 'architecture' 'gru'"):
        load_card(tmp_path / "lstm")
    card_path.write_text(text.replace('"density": 0.4', '"density": 1.5'))
    with pytest.raises(CheckpointError, match="density must be a number in"):
        load_card(tmp_path / "lstm")


@pytest.mark.parametrize("kw, message", [
    ({"hidden": 0}, "hidden must be a positive integer"),
    ({"density": 0.0}, r"density must be a number in \(0, 1\]"),
    ({"density": "0.1"}, "density must be a number"),
    ({"layout": "er"}, "layout must be one of"),
    ({"block": 12}, "block must be one of"),
    ({"hidden": 60, "block": 8, "density": 0.5}, "must be a multiple of block"),
    ({"hidden": 32, "block": 16, "density": 0.5}, "leaves no room for a Watts-Strogatz graph"),
    ({"layout_seed": -1}, "layout_seed must be an integer >= 0"),
    ({"multiplicative": 1}, "multiplicative must be true or false"),
    ({"rewire_p": 2.0}, r"rewire_p must be in \[0, 1\]"),
])
def test_bad_configs_are_refused(kw, message):
    with pytest.raises(ValueError, match=message):
        LSTMConfig(**{**SPARSE, **kw})


def test_bad_inputs_are_refused():
    model = make_model()
    with pytest.raises(ValueError, match="tokens must be an int64 tensor"):
        model(torch.zeros(2, 3, dtype=torch.int32))
    with pytest.raises(ValueError, match=r"token values must be in \[0, 256\)"):
        model(torch.tensor([[1, 256]]))
    _, state = model(torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="state must be the LSTMState"):
        model(torch.zeros(3, 3, dtype=torch.long), state)
    with pytest.raises(ValueError, match="unknown LSTM config fields"):
        LSTMConfig.from_dict({"hidden": 64, "width": 3})


def test_the_decoder_step_after_a_prefill_equals_the_forward_pass():
    model = make_model()
    tokens = torch.randint(0, 256, (2, 30), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        full, _ = model(tokens)
    decoder = Decoder(model, 2, 30)
    decoder.prefill(tokens[:, :12])
    steps = [decoder.step(tokens, pos) for pos in range(12, 30)]
    torch.testing.assert_close(torch.stack(steps, 1), full[:, 12:], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="runs positions in order"):
        decoder.step(tokens, 5)
    assert "LSTM" in decoding_step(model) and decoder.cache_bytes == 0


def test_greedy_generation_continues_the_prompt_with_the_forward_passes_argmax():
    model = make_model()
    prompt = torch.randint(0, 256, (2, 10), generator=torch.Generator().manual_seed(4))
    *_, last = generate(model, prompt, 40, seeds=[0, 1], options=SamplingOptions(temperature=0.0), report_every=7)
    assert last.finished and last.tokens.shape == (2, 40) and torch.equal(last.tokens[:, :10], prompt)
    with torch.no_grad():
        logits, _ = model(last.tokens)
    assert torch.equal(logits[:, 10:].argmax(-1), last.tokens[:, 10:])


def test_sampled_audio_depends_on_the_seed_only():
    model = make_model(seq_len=64)
    model.card = {"codec": codec_card("audio")}
    a = list(generate_audio(model, 48, seeds=[3, 4], batch_size=2))[-1].media
    b = list(generate_audio(model, 48, seeds=[4], batch_size=1))[-1].media
    assert a.shape == (2, 48) and a.dtype.name == "uint8" and (a[1] == b[0]).all()


def test_lstm_decoding_refuses_transformer_only_options():
    model = make_model()
    with pytest.raises(ValueError, match="decodes with its PyTorch step"):
        Decoder(model, 1, step="compiled")
    with pytest.raises(ValueError, match="decodes with its PyTorch step"):
        Decoder(model, 1, dense=True)
    with pytest.raises(ValueError, match="decodes with its PyTorch step"):
        Decoder(model, 1, cache_dtype=torch.float32)


def test_sample_py_samples_audio_from_an_lstm_checkpoint(tmp_path):
    save_model(make_model(seq_len=512), tmp_path / "lstm", {"codec": codec_card("audio")})
    out = tmp_path / "out"
    assert sample.main(["audio", "--checkpoint", str(tmp_path / "lstm"), "--samples", "300", "--num-samples", "2",
                        "--out-dir", str(out), "--quiet", "--device", "cpu"]) == 0
    meta = json.loads((out / "metadata.json").read_text())
    assert "LSTM" in meta["decoding_step"] and sorted(p.name for p in out.glob("*.wav")) == ["sample_000.wav",
                                                                                           "sample_001.wav"]


def test_the_app_lists_and_describes_an_lstm_checkpoint(tmp_path):
    save_model(make_model(), tmp_path / "lstm", {"codec": codec_card("audio")})
    registry = Registry(tmp_path, torch.device("cpu"))
    assert not registry.problems and [e.name for e in registry.of_kind("audio")] == ["lstm"]
    entry = registry.entry("lstm", "audio")
    assert "LSTM baseline, 2 layers, 64 units, small-world block-sparse weights (WS, density 0.4" in \
        card_markdown(entry)
    picture, caption = weight_layout_picture(entry.config)
    assert picture.ndim == 3 and picture.dtype.name == "uint8" and "8 blocks of 8 units" in caption
    assert isinstance(registry.model("lstm", "audio"), SparseLSTM)
