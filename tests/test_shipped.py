"""The shipped checkpoints: present, small, loadable, with complete cards, and the CLI's and app's defaults."""

from pathlib import Path

import pytest

from models import load_card, load_model, model_kind
from sampling import SamplingOptions, card_defaults

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = {"image64": ("image", "bits/dim", {"PNG", "WebP lossless"}), "audio12k": ("audio", "bits/byte", {"FLAC"})}
MAX_BYTES = 25_000_000  # "under 25 MB", in the decimal MB the READMEs give sizes in


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_a_shipped_checkpoint_loads_and_its_card_says_what_it_is(name):
    kind, unit, codecs = SHIPPED[name]
    path = ROOT / "checkpoints" / name
    card = load_card(path)
    assert (ROOT / "checkpoints" / f"{name}.safetensors").stat().st_size < MAX_BYTES
    model = load_model(path)  # checks size and SHA-256 against the card
    assert model_kind(model) == kind and card["parameters"] == model.num_parameters()
    for field in ("steps", "tokens_seen", "compute_pf_days", "held_out_bits_per_dim"):
        assert card[field] > 0, field
    data = card["data"]
    assert data["train_items"] > 0 and data["val_items"] > 0 and data["sources"] and data["licences"]
    evaluation = card["evaluation"]
    assert evaluation["unit"] == unit and set(evaluation["codecs"]) == codecs and evaluation["items"] > 0
    assert 0 < evaluation["model"] < 8
    sampling = card["sampling"]  # the defaults bench/sampling_sweep.py chose, with every setting it measured
    chosen = [r for r in sampling["measured"] if r.get("chosen")]
    assert sampling["chosen_by"].startswith("python -m bench.sampling_sweep") and len(chosen) == 1
    assert card_defaults(card) == SamplingOptions(chosen[0]["temperature"], chosen[0]["top_k"], chosen[0]["top_p"])


def test_the_cli_defaults_to_the_shipped_checkpoints_and_the_app_finds_them():
    import argparse

    import torch

    import sample
    from app.registry import Registry

    for kind, name in (("image", "image64"), ("audio", "audio12k")):
        a = argparse.Namespace(checkpoint=None, kind=kind)
        model = sample.read_checkpoint(a, torch.device("cpu"))
        assert Path(a.checkpoint) == ROOT / "checkpoints" / name and model_kind(model) == kind
    registry = Registry(ROOT / "checkpoints", torch.device("cpu"))
    assert {(e.name, e.kind) for e in registry.entries} >= {("image64", "image"), ("audio12k", "audio")}
    assert not registry.problems
