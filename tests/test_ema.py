"""training.EMA: a debiased moving average of the weights the steps make, whatever the starting weights."""

import pytest
import torch

from training.ema import EMA
from training.export import shipped_params


def set_weights(model: torch.nn.Module, value: float) -> None:
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(value)


def test_the_average_holds_only_the_weights_after_each_step():
    model = torch.nn.Linear(3, 2)
    set_weights(model, 100.0)  # starting weights: no part of the average
    ema = EMA(model, 0.9)
    set_weights(model, 1.0)
    ema.update(model)
    assert all(torch.allclose(p, torch.ones_like(p)) for p in ema.averaged())
    set_weights(model, 2.0)
    ema.update(model)
    want = (0.9 * 0.1 * 1.0 + 0.1 * 2.0) / (1 - 0.9**2)  # the weights of steps 1 and 2, weighted 0.9 : 1
    assert all(torch.allclose(p, torch.full_like(p, want)) for p in ema.averaged())
    assert all(torch.equal(a, b) for a, b in zip(shipped_params(model, ema), ema.averaged(), strict=True))


def test_without_updates_the_model_ships_its_own_weights_and_an_old_state_restarts_the_average(capsys):
    model = torch.nn.Linear(3, 2)
    ema = EMA(model, 0.99)
    with pytest.raises(ValueError, match="no updates yet"):
        ema.averaged()
    assert all(torch.equal(a, b) for a, b in zip(shipped_params(model, ema), model.parameters(), strict=True))
    ema.update(model)
    state = ema.state_dict()
    again = EMA(model, 0.99)
    again.load_state_dict(state)
    assert again.updates == 1 and all(torch.equal(a, b) for a, b in zip(again.params, ema.params, strict=True))
    old = EMA(model, 0.99)
    old.load_state_dict({"decay": 0.99, "params": [p.detach().clone() for p in model.parameters()]})
    assert old.updates == 0 and not any(p.any() for p in old.params)
    assert "starts again from this step" in capsys.readouterr().err
