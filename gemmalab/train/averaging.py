"""Weight-space averaging as plain state-dict math (imports torch only).

    ema_(avg, new, eta)     avg <- (1 - eta) avg + eta new, in place: the moving anchor of J-BOND
                            (Sessa et al. 2024, eta) and WARP (Rame et al. 2024, mu)
    EMA                     an exponential moving average of a model's trainable tensors, with
                            state_dict / load_state_dict so the trainer checkpoints and resumes it

eta = 1 copies the policy, eta = 0 keeps the anchor where it started.
"""
from __future__ import annotations

import torch

__all__ = ["ema_", "EMA"]


@torch.no_grad()
def ema_(avg: dict[str, torch.Tensor], new: dict[str, torch.Tensor], eta: float) -> None:
    """avg <- (1 - eta) * avg + eta * new for every tensor of `avg` (the same names in `new`)."""
    if not 0.0 <= eta <= 1.0:
        raise ValueError(f"the EMA rate must be in [0, 1], got {eta}")
    missing = sorted(set(avg) - set(new))
    if missing:
        raise ValueError(f"the EMA tracks tensors the model no longer has: {missing[:3]}")
    for name, a in avg.items():
        n = new[name]
        if n.shape != a.shape:
            raise ValueError(f"{name}: the EMA holds {tuple(a.shape)}, the model {tuple(n.shape)}")
        a.lerp_(n.to(a.dtype), eta)


class EMA:
    """The exponential moving average of `model`'s trainable tensors (fp32), started at their
    current values; `update(model)` after each optimizer step (a trainer hook)."""

    def __init__(self, model: torch.nn.Module, eta: float):
        if not 0.0 <= eta <= 1.0:
            raise ValueError(f"the EMA rate must be in [0, 1], got {eta}")
        self.eta = eta
        self.tensors = {n: p.detach().float().clone() for n, p in model.named_parameters()
                        if p.requires_grad}
        if not self.tensors:
            raise ValueError("the model has no trainable tensors to average")

    def update(self, model: torch.nn.Module) -> None:
        ema_(self.tensors, dict(model.named_parameters()), self.eta)

    def __call__(self, model: torch.nn.Module, step: int) -> None:  # the trainer's hook signature
        self.update(model)

    def state_dict(self) -> dict:
        return {"eta": self.eta, "tensors": self.tensors}

    def load_state_dict(self, state: dict) -> None:
        if set(state["tensors"]) != set(self.tensors):
            raise ValueError("the saved EMA tracks other tensors than this model's trainable ones")
        self.eta = state["eta"]
        for name, t in state["tensors"].items():
            self.tensors[name].copy_(t)
