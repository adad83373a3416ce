"""An exponential moving average of the weights (--ema), exported instead of the last weights when kept."""

from __future__ import annotations

import torch

from .distributed import local_tensor


class EMA:
    """Exponential moving average of the parameters (fp32, sharded like them under FSDP)."""

    def __init__(self, model: torch.nn.Module, decay: float) -> None:
        self.decay = decay
        self.names = [n for n, _ in model.named_parameters()]
        self.params = [local_tensor(p.detach()).float().clone() for p in model.parameters()]

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        current = [local_tensor(p.detach()).float() for p in model.parameters()]
        torch._foreach_lerp_(self.params, current, 1.0 - self.decay)

    def state_dict(self) -> dict:
        return {"decay": self.decay, "params": self.params}

    def load_state_dict(self, state: dict) -> None:
        for dst, src in zip(self.params, state["params"], strict=True):
            dst.copy_(src)
