"""LoRA (Hu et al. 2021) as a module swap: W x + (alpha / r) * B A x, base weights frozen.

The base is an `nn.Linear` (fp32 training) or a `QuantLinear` (sampling on a GGUF's own blocks:
the frozen base keeps its integer kernels, the adapter is an fp32 side path). Both hold their
adapter as `lora_a` (r, in) and `lora_b` (out, r) under the same module names, so an adapter
trained on the fp32 model loads into the quantized one (`load_lora_state_dict`), or is shared with
it tensor for tensor (`tie_lora`: an optimizer step is seen by the sampler at once).

`merge_lora` folds B A back into the base weights and restores plain nn.Linear modules, so an
exported model has the parameter names and shapes of the original.

Roles (train.roles) switch what a wrapper adds for the duration of a call through its `delta`
attribute: None (its own adapter), OFF (the base alone: the reference), or another adapter's
factors or dense matrix (an EMA anchor). The state lives on the model's modules, not in a global
flag; see train.roles for the single-threaded contract.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from ..quant.linear import QuantLinear

__all__ = ["LoRALinear", "apply_lora", "merge_lora", "lora_state_dict", "load_lora_state_dict",
           "lora_modules", "tie_lora", "OFF"]

OFF = ("off",)  # LoRALinear.delta: the base alone


class LoRALinear(nn.Module):
    def __init__(self, base: nn.Linear | QuantLinear, rank: int, alpha: float):
        super().__init__()
        if not isinstance(base, (nn.Linear, QuantLinear)):
            raise TypeError(f"LoRA wraps nn.Linear or QuantLinear, not {type(base).__name__}")
        self.base = base.requires_grad_(False)
        self.rank, self.alpha = rank, alpha
        self.scale = alpha / rank
        if isinstance(base, QuantLinear):  # fp32 side path over the integer kernels
            dtype, device = torch.float32, base.blocks.device
        else:
            dtype, device = base.weight.dtype, base.weight.device
        self.lora_a = nn.Parameter(torch.empty(rank, base.in_features, dtype=dtype, device=device))
        self.lora_b = nn.Parameter(torch.zeros(base.out_features, rank, dtype=dtype, device=device))
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))  # B = 0: training starts at the base
        # What forward adds to the base (set by train.roles for one call, then restored):
        # None = this adapter; OFF; ("factors", A, B): scale B A x; ("dense", D): D x.
        self.delta: tuple | None = None

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        terms = self.delta_terms()
        if terms is None:
            return y
        if terms[0] == "dense":
            return y + x @ terms[1].t()
        _, a, b, scale = terms
        return y + (x @ a.t() @ b.t()) * scale

    def delta_terms(self) -> tuple | None:
        """What this call adds to the base: None, ("factors", A, B, scale) or ("dense", D)."""
        delta = self.delta
        if delta is None:
            return "factors", self.lora_a, self.lora_b, self.scale
        if delta is OFF or delta[0] == "off":
            return None
        if delta[0] == "factors":
            return "factors", delta[1], delta[2], self.scale
        if delta[0] == "dense":
            return delta
        raise ValueError(f"unknown LoRA delta {delta[0]!r}")

    def merged_weight(self) -> torch.Tensor:
        weight = self.base.dequantized() if isinstance(self.base, QuantLinear) else self.base.weight
        return weight + (self.lora_b @ self.lora_a) * self.scale

    def base_device(self) -> torch.device:
        return self.base.blocks.device if isinstance(self.base, QuantLinear) else self.base.weight.device

    def extra_repr(self) -> str:
        return f"rank={self.rank}, alpha={self.alpha}"


def apply_lora(model: nn.Module, rank: int, alpha: float, targets: list[str]) -> list[str]:
    """Freeze the model and wrap every nn.Linear or QuantLinear whose name ends with a target;
    return the names."""
    model.requires_grad_(False)
    wrapped = []
    for name, module in list(model.named_modules()):
        if isinstance(module, LoRALinear):
            continue
        for child_name, child in list(module.named_children()):
            if isinstance(child, (nn.Linear, QuantLinear)) and child_name in targets:
                setattr(module, child_name, LoRALinear(child, rank, alpha))
                wrapped.append(f"{name}.{child_name}" if name else child_name)
    if not wrapped:
        raise ValueError(f"no linear layer matches the LoRA targets {targets}")
    return wrapped


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def tie_lora(dst: nn.Module, src: nn.Module) -> list[str]:
    """Give `dst` (e.g. a native-quantized copy of the base) the adapters of `src`: the same
    nn.Parameter objects, so every optimizer step on `src` is seen by `dst` without a copy. The
    projections of `dst` are wrapped first where they are not yet. Returns the names."""
    adapters = lora_modules(src)
    if not adapters:
        raise ValueError("the source model holds no LoRA adapter")
    first = next(iter(adapters.values()))
    targets = sorted({name.rsplit(".", 1)[-1] for name in adapters})
    if not lora_modules(dst):
        apply_lora(dst, first.rank, first.alpha, targets)
    mine = lora_modules(dst)
    if set(mine) != set(adapters):
        diff = sorted(set(mine) ^ set(adapters))
        raise ValueError(f"the two models wrap different projections, e.g. {diff[:3]}")
    for name, s in adapters.items():
        d = mine[name]
        if (d.in_features, d.out_features, d.rank) != (s.in_features, s.out_features, s.rank):
            raise ValueError(f"{name}: shapes differ between the two models")
        if s.lora_a.device != d.base_device():
            raise ValueError(f"{name}: the adapter is on {s.lora_a.device}, the base on "
                             f"{d.base_device()}")
        d.lora_a, d.lora_b, d.scale, d.alpha = s.lora_a, s.lora_b, s.scale, s.alpha
    return sorted(adapters)


@torch.no_grad()
def merge_lora(model: nn.Module) -> nn.Module:
    """Replace every LoRALinear by an nn.Linear holding W + (alpha / r) B A."""
    for module in list(model.modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, LoRALinear):
                if isinstance(child.base, QuantLinear):
                    raise ValueError("merge_lora folds adapters into float weights; a quantized base "
                                     "keeps its blocks: merge into the fp32 model and requantize")
                child.base.weight.copy_(child.merged_weight())
                setattr(module, child_name, child.base)
    return model


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v for k, v in model.state_dict().items() if ".lora_" in k}


@torch.no_grad()
def load_lora_state_dict(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy adapter tensors (`lora_state_dict` of a model with the same targets, fp32 or quantized
    base) into `model`'s adapters; every adapter tensor must be given, and nothing else."""
    own = lora_state_dict(model)
    if not own:
        raise ValueError("the model holds no LoRA adapter: apply_lora(model, ...) first")
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    if missing or unexpected:
        raise ValueError(f"the adapter does not fit this model: missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]}")
    for k, t in own.items():
        if t.shape != state[k].shape:
            raise ValueError(f"{k}: the model holds {tuple(t.shape)}, the adapter {tuple(state[k].shape)}")
        t.copy_(state[k])
