"""An exponential moving average of the weights (--ema), exported instead of the last weights when kept."""

from __future__ import annotations

import sys

import torch

from .distributed import local_tensor


class EMA:
    """Exponential moving average of the weights the run's steps make (fp32, sharded like them under FSDP).

    Debiased as Adam debiases its moments: the sum starts at zero and :meth:`averaged` divides it by
    1 - decay^updates, so the starting weights (a fresh initialisation, or an --init checkpoint) count for
    nothing. Started from the starting weights instead, a run grown from --init at decay 0.998 would still
    hold 9% of them after 1,200 steps (0.998^1200)."""

    def __init__(self, model: torch.nn.Module, decay: float) -> None:
        self.decay = decay
        self.params = [torch.zeros_like(local_tensor(p.detach()), dtype=torch.float32) for p in model.parameters()]
        self.updates = 0

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        current = [local_tensor(p.detach()).float() for p in model.parameters()]
        torch._foreach_lerp_(self.params, current, 1.0 - self.decay)
        self.updates += 1

    def averaged(self) -> list[torch.Tensor]:
        """The averaged weights (fp32; local shards under FSDP), after at least one update."""
        if not self.updates:
            raise ValueError("the moving average has no updates yet")
        return torch._foreach_div(self.params, 1.0 - self.decay ** self.updates)

    def state_dict(self) -> dict:
        return {"decay": self.decay, "params": self.params, "updates": self.updates}

    def load_state_dict(self, state: dict) -> None:
        if "updates" not in state:  # saved before the average was debiased: it holds the starting weights
            print("--resume: the saved moving average started from the run's starting weights; it starts again "
                  "from this step", file=sys.stderr)
            return
        for dst, src in zip(self.params, state["params"], strict=True):
            dst.copy_(src)
        self.updates = int(state["updates"])
