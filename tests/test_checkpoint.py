"""Checkpoint I/O: safetensors + JSON card, and clear errors for anything wrong with them."""

import json
import re

import pytest
import torch

from models import CheckpointError, SparseTransformer, codec_card, config_for, load_card, load_model, save_model


def make_model(**kw) -> SparseTransformer:
    torch.manual_seed(0)
    model = SparseTransformer(config_for("audio", "tiny", seq_len=512, **kw))
    torch.nn.init.normal_(model.head.weight, std=0.5)
    return model


CARD = {"codec": codec_card("audio"), "data": {"path": "x"}, "steps": 3, "tokens_seen": 1536,
        "compute_pf_days": 1e-9, "held_out_bits_per_dim": 7.9}


def test_round_trip_gives_the_same_model_and_card(tmp_path):
    model = make_model()
    card_path = save_model(model, tmp_path / "ck" / "m", CARD)
    assert card_path == tmp_path / "ck" / "m.json"
    loaded = load_model(tmp_path / "ck" / "m")
    assert not loaded.training
    tokens = torch.randint(0, 256, (1, 300))
    assert torch.equal(loaded(tokens), model.eval()(tokens))
    card = loaded.card
    assert card["config"] == model.cfg.to_dict() and card["steps"] == 3 and card["held_out_bits_per_dim"] == 7.9
    assert card["parameters"] == model.num_parameters() and "date" in card
    assert card["codec"]["sample_rate"] == 12000
    assert load_card(tmp_path / "ck" / "m.safetensors") == card  # either suffix names the checkpoint
    assert not list((tmp_path / "ck").glob("*.tmp"))


def test_bfloat16_weights_take_half_the_bytes_and_load_as_the_rounded_float32_model(tmp_path):
    from models.checkpoint import round_weights

    model = make_model()
    save_model(model, tmp_path / "f", CARD)
    save_model(model, tmp_path / "b", CARD, weights_dtype="bfloat16")
    full, half = (tmp_path / "f.safetensors").stat().st_size, (tmp_path / "b.safetensors").stat().st_size
    assert half < 0.52 * full
    loaded = load_model(tmp_path / "b")
    assert loaded.card["weights"]["dtype"] == "bfloat16"
    assert load_model(tmp_path / "f").card["weights"]["dtype"] == "float32"
    assert all(p.dtype == torch.float32 for p in loaded.parameters())  # computes in float32
    round_weights(model, "bfloat16")
    for (name, a), b in zip(model.state_dict().items(), loaded.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    tokens = torch.randint(0, 256, (1, 300))
    assert torch.equal(loaded(tokens), model.eval()(tokens))
    # saving a loaded model keeps the dtype its card records (the promotion of an export over a shipped model)
    save_model(loaded, tmp_path / "again", loaded.card)
    assert (tmp_path / "again.safetensors").stat().st_size == half
    assert torch.equal(load_model(tmp_path / "again")(tokens), loaded(tokens))


def test_weights_of_another_dtype_than_the_card_says_fail_clearly(tmp_path):
    save_model(make_model(), tmp_path / "m", CARD, weights_dtype="bfloat16")
    card = json.loads((tmp_path / "m.json").read_text())
    for dtype, message in (("float32", "hold torch.bfloat16 tensors .* says torch.float32"),
                           ("float16", r"'weights.dtype' must be one of \['bfloat16', 'float32'\]")):
        (tmp_path / "m.json").write_text(json.dumps(card | {"weights": card["weights"] | {"dtype": dtype}}))
        with pytest.raises(CheckpointError, match=message):
            load_model(tmp_path / "m")
    del card["weights"]["dtype"]  # a card from before bf16 storage: float32
    (tmp_path / "m.json").write_text(json.dumps(card))
    with pytest.raises(CheckpointError, match="says torch.float32"):
        load_model(tmp_path / "m")


def test_weights_are_safetensors_not_pickle(tmp_path):
    save_model(make_model(), tmp_path / "m", CARD)
    head = (tmp_path / "m.safetensors").read_bytes()[:8]
    header_len = int.from_bytes(head, "little")
    header = json.loads((tmp_path / "m.safetensors").read_bytes()[8: 8 + header_len])
    assert "__metadata__" in header and "config" in header["__metadata__"]


def test_missing_checkpoint_names_what_exists(tmp_path):
    save_model(make_model(), tmp_path / "real", CARD)
    with pytest.raises(CheckpointError, match=r"no model card .*nope\.json.*\['real'\]"):
        load_model(tmp_path / "nope")
    (tmp_path / "real.safetensors").unlink()
    with pytest.raises(CheckpointError, match="weights .* are missing"):
        load_model(tmp_path / "real")


def test_truncated_weights_fail_clearly(tmp_path):
    save_model(make_model(), tmp_path / "m", CARD)
    w = tmp_path / "m.safetensors"
    w.write_bytes(w.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match="truncated"):
        load_model(tmp_path / "m")


def test_corrupt_weights_fail_clearly(tmp_path):
    save_model(make_model(), tmp_path / "m", CARD)
    w = tmp_path / "m.safetensors"
    data = bytearray(w.read_bytes())
    data[-5] ^= 0xFF
    w.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="corrupt"):
        load_model(tmp_path / "m")


def test_unreadable_weights_matching_their_card_fail_clearly(tmp_path):
    save_model(make_model(), tmp_path / "m", CARD)
    w = tmp_path / "m.safetensors"
    w.write_bytes(b"\xff" * w.stat().st_size)
    card = json.loads((tmp_path / "m.json").read_text())
    import hashlib

    card["weights"]["sha256"] = hashlib.sha256(w.read_bytes()).hexdigest()
    (tmp_path / "m.json").write_text(json.dumps(card))
    with pytest.raises(CheckpointError, match="cannot be read"):
        load_model(tmp_path / "m")


def test_corrupt_card_fails_clearly(tmp_path):
    save_model(make_model(), tmp_path / "m", CARD)
    (tmp_path / "m.json").write_text('{"format": "sparse-trans')
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_model(tmp_path / "m")
    (tmp_path / "m.json").write_text('{"hello": 1}')
    with pytest.raises(CheckpointError, match="not a model card"):
        load_card(tmp_path / "m")


def test_weights_of_another_config_fail_clearly(tmp_path):
    save_model(make_model(), tmp_path / "a", CARD)
    save_model(make_model(n_layers=3), tmp_path / "b", CARD)
    card_b = json.loads((tmp_path / "b.json").read_text())
    card_a = json.loads((tmp_path / "a.json").read_text())
    card_a["config"] = card_b["config"]  # card says 3 layers, weights hold 2
    (tmp_path / "a.json").write_text(json.dumps(card_a))
    with pytest.raises(CheckpointError, match="another config"):
        load_model(tmp_path / "a")
    card_a["config"]["n_heads"] = 3
    (tmp_path / "a.json").write_text(json.dumps(card_a))
    with pytest.raises(CheckpointError, match="invalid config"):
        load_model(tmp_path / "a")


def test_save_model_validates_its_arguments(tmp_path):
    with pytest.raises(ValueError, match="SparseTransformer"):
        save_model(torch.nn.Linear(2, 2), tmp_path / "m")
    with pytest.raises(ValueError, match="JSON"):
        save_model(make_model(), tmp_path / "m", {"when": object()})
    with pytest.raises(ValueError, match="card must be a dict"):
        save_model(make_model(), tmp_path / "m", ["x"])
    with pytest.raises(ValueError, match=r"weights_dtype must be one of \['bfloat16', 'float32'\], got 'float16'"):
        save_model(make_model(), tmp_path / "m", weights_dtype="float16")


def test_update_card_adds_fields_and_keeps_the_weights_loadable(tmp_path):
    from models.checkpoint import update_card

    model = make_model()
    save_model(model, tmp_path / "m", {"steps": 3})
    card = update_card(tmp_path / "m", {"evaluation": {"model": 3.5, "codecs": {"PNG": 4.6}}, "steps": 4})
    assert card["evaluation"]["codecs"]["PNG"] == 4.6 and card["steps"] == 4
    assert load_model(tmp_path / "m").card == card
    assert not list(tmp_path.glob("*.tmp"))
    for fields, message in (({"weights": {}}, "describe the weights"), ({"config": {}}, "describe the weights"),
                            ({"x": object()}, "JSON-serialisable"), ([1], "must be a dict")):
        with pytest.raises(ValueError, match=message):
            update_card(tmp_path / "m", fields)
    with pytest.raises(CheckpointError, match="no model card"):
        update_card(tmp_path / "missing", {"a": 1})



@pytest.mark.parametrize("field, value, message", [
    ("codec", "oops", "'codec' must be an object or null, got \"oops\""),
    ("weights", "oops", "'weights' must be an object, got \"oops\""),
    ("config", [1], "'config' must be an object, got [1]"),
    ("config", {"n_layers": "two"}, "'config' holds an invalid config"),
    ("steps", "3", "'steps' must be a whole number or null, got \"3\""),
    ("held_out_bits_per_dim", True, "'held_out_bits_per_dim' must be a number or null, got true"),
    ("data", 5, "'data' must be an object or a string or null, got 5"),
    ("training_history", {"a": 1}, "'training_history' must be a list or null"),
    ("format", 1, "not a model card of this project"),
])
def test_a_card_field_of_the_wrong_type_is_reported_by_name(tmp_path, field, value, message):
    from models import check_card

    save_model(make_model(), tmp_path / "m", CARD)
    card = json.loads((tmp_path / "m.json").read_text())
    (tmp_path / "m.json").write_text(json.dumps(card | {field: value}))
    for load in (load_card, load_model):
        with pytest.raises(CheckpointError) as e:
            load(tmp_path / "m")
        assert message in str(e.value) and "m.json" in str(e.value)
    with pytest.raises(CheckpointError, match="is missing"):
        check_card({k: v for k, v in card.items() if k != "weights"})
    for part, bad, said in (("codec", {"kind": 3}, "'codec.kind' must be a string or null"),
                            ("weights", {**card["weights"], "bytes": "9"}, "'weights.bytes' must be a whole number"),
                            ("weights", {**card["weights"], "sha256": "abc"}, "64 lower-case hex digits")):
        with pytest.raises(CheckpointError, match=re.escape(said)):
            check_card(card | {part: bad})
    assert check_card(card) is card


def test_save_model_never_writes_a_card_that_load_card_refuses(tmp_path):
    with pytest.raises(CheckpointError, match="'steps' must be a whole number"):
        save_model(make_model(), tmp_path / "m", {"steps": "many"})
    assert not (tmp_path / "m.json").exists()


def test_save_model_removes_the_temporaries_of_a_killed_save(tmp_path):
    import subprocess
    import sys

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = [tmp_path / f"m.safetensors.{int(dead.stdout)}.tmp", tmp_path / f"m.json.{int(dead.stdout)}.tmp"]
    other = tmp_path / f"n.safetensors.{int(dead.stdout)}.tmp"
    for p in (*stale, other):
        p.write_bytes(b"half")
    save_model(make_model(), tmp_path / "m", CARD)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.json", "m.safetensors", other.name]
