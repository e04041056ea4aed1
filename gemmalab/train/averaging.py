"""Weight-space averaging as plain state-dict math (imports torch only).

    ema_(avg, new, eta)     avg <- (1 - eta) avg + eta new, in place: the moving anchor of J-BOND
                            (Sessa et al. 2024, eta) and WARP (Rame et al. 2024, mu)
    EMA                     an exponential moving average of a model's trainable tensors, with
                            state_dict / load_state_dict so the trainer checkpoints and resumes it

    average(sds, weights)   sum_i c_i theta_i per tensor (WARM's uniform average of reward models,
                            Rame et al. 2024), refusing members of other names, shapes or bases
    lora_delta(A, B, s)     s B A, the dense update of one LoRA matrix
    merge_lora_deltas(...)  the weighted average of LoRA updates as one adapter of concatenated
                            rank, exactly: [c1 B1, c2 B2] [A1; A2] = c1 B1 A1 + c2 B2 A2

eta = 1 copies the policy, eta = 0 keeps the anchor where it started.
"""
from __future__ import annotations

import torch

__all__ = ["ema_", "EMA", "MergeError", "check_mergeable", "average", "lora_delta", "merge_lora_deltas"]


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


# ---------------------------------------------------------------------------------------------------
# Merges: WARM (Rame et al. 2024, "WARM: On the Benefits of Weight Averaged Reward Models")

class MergeError(ValueError):
    """Members that cannot be averaged: other tensor names or shapes, or another frozen base."""


def _weights(n: int, weights) -> list[float]:
    """The merge coefficients c_i: uniform 1 / n, or `weights` normalised to sum to 1."""
    if n < 1:
        raise MergeError("nothing to merge: no members given")
    if weights is None:
        return [1.0 / n] * n
    weights = [float(w) for w in weights]
    if len(weights) != n:
        raise MergeError(f"{len(weights)} weights for {n} members; give one weight per member")
    if any(not w >= 0 for w in weights) or not sum(weights) > 0:
        raise MergeError(f"merge weights must be >= 0 with a positive sum, got {weights}")
    total = sum(weights)
    return [w / total for w in weights]


def check_mergeable(state_dicts, bases=None, names=None) -> None:
    """Refuse members that are not the same model: the same tensor names, shapes and (when given)
    the same recorded base hash (`bases[i]`, e.g. sha256 of the frozen base's config and path), so
    that two adapters of different bases, or of another rank or target set, are never averaged.
    One MergeError names the first member that differs and how."""
    names = list(names) if names is not None else [f"member {i}" for i in range(len(state_dicts))]
    if not state_dicts:
        raise MergeError("nothing to merge: no members given")
    if bases is not None:
        bases = list(bases)
        for name, base in zip(names[1:], bases[1:]):
            if base != bases[0]:
                raise MergeError(f"{name} was trained on another base than {names[0]} (base hash "
                                 f"{str(base)[:12]} vs {str(bases[0])[:12]}): weight averaging needs "
                                 "members fine-tuned from the same pre-trained model")
    ref = state_dicts[0]
    for name, sd in zip(names[1:], state_dicts[1:]):
        missing, extra = sorted(set(ref) - set(sd)), sorted(set(sd) - set(ref))
        if missing or extra:
            raise MergeError(f"{name} holds other tensors than {names[0]}: missing {missing[:3]}, "
                             f"extra {extra[:3]} (another trainable setting: LoRA targets, top blocks?)")
        for k, t in ref.items():
            if sd[k].shape != t.shape:
                raise MergeError(f"{name}: {k} is {tuple(sd[k].shape)}, in {names[0]} {tuple(t.shape)} "
                                 "(another model size or LoRA rank)")


@torch.no_grad()
def average(state_dicts, weights=None, *, bases=None, names=None) -> dict[str, torch.Tensor]:
    """sum_i c_i theta_i for every tensor: the uniform average (WARM's phi = 1/M sum_i phi_i) or a
    weighted one (weights are normalised to sum to 1). Accumulated in fp64, returned in each
    tensor's dtype; the members are checked first (`check_mergeable`).

    This is the right merge for tensors the members train directly (a scalar head, the top blocks,
    full fine-tuning); LoRA factors are merged on their products (`merge_lora_deltas`)."""
    state_dicts = list(state_dicts)
    c = _weights(len(state_dicts), weights)
    check_mergeable(state_dicts, bases, names)
    out = {}
    for k, t in state_dicts[0].items():
        acc = torch.zeros(t.shape, dtype=torch.float64, device=t.device)
        for ci, sd in zip(c, state_dicts):
            acc += ci * sd[k].to(device=t.device, dtype=torch.float64)
        out[k] = acc.to(t.dtype)
    return out


def lora_delta(a: torch.Tensor, b: torch.Tensor, scale: float) -> torch.Tensor:
    """The dense update a LoRA adds to its base matrix: scale * B A, (out, in) from A (r, in), B (out, r)."""
    return (b @ a) * scale


@torch.no_grad()
def merge_lora_deltas(members, weights=None, *, scales=None, bases=None, names=None
                      ) -> tuple[dict[str, torch.Tensor], float]:
    """The weighted average of M LoRA adapters' updates as ONE adapter of rank sum_i r_i, exactly.

    members: adapter state dicts ("<module>.lora_a" (r, in), "<module>.lora_b" (out, r)), scales:
    their alpha / r (default 1 each). Returns (tensors, scale) with, for every module,

        scale * B' A' = sum_i c_i scale_i B_i A_i,   A' = [A_1; ...; A_M],  B' = [k_1 B_1, ..., k_M B_M]

    where k_i = c_i scale_i / scale and scale = scales[0] (k_i = c_i when the scales agree), so a
    merged reward model or policy is still "base + adapter", evaluated at the cost of one rank-M r
    adapter.

    Why not average A and B separately: (sum_i c_i B_i)(sum_j c_j A_j) = sum_i c_i^2 B_i A_i +
    sum_{i != j} c_i c_j B_i A_j. The diagonal is shrunk (c_i^2, not c_i) and the cross terms
    B_i A_j pair factors that were never trained together; they vanish only when the members
    share their factors, which fine-tuned members do not (tests/test_merge.py shows the gap).
    """
    members = list(members)
    c = _weights(len(members), weights)
    scales = [1.0] * len(members) if scales is None else [float(s) for s in scales]
    if len(scales) != len(members):
        raise MergeError(f"{len(scales)} scales for {len(members)} adapters")
    check_mergeable(members, bases, names)
    extra = sorted(k for k in members[0] if not k.endswith((".lora_a", ".lora_b")))
    if extra:
        raise MergeError(f"not LoRA factors: {extra[:3]} (average other tensors with `average`)")
    modules = sorted({k.rsplit(".", 1)[0] for k in members[0]})
    for m in modules:
        for part in ("lora_a", "lora_b"):
            if f"{m}.{part}" not in members[0]:
                raise MergeError(f"{m}: the adapter lacks {part}; merge_lora_deltas takes "
                                 "'<module>.lora_a' / '<module>.lora_b' pairs")
    scale = scales[0]
    out = {}
    for m in modules:
        out[f"{m}.lora_a"] = torch.cat([sd[f"{m}.lora_a"] for sd in members], 0)
        out[f"{m}.lora_b"] = torch.cat([sd[f"{m}.lora_b"] * (ci * si / scale if si != scale else ci)
                                        for sd, ci, si in zip(members, c, scales)], 1)
    return out, scale
