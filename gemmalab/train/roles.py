"""Several roles on one base model: policy, reference, EMA anchor, teachers.

The anchor is the moving reference of J-BOND (Sessa et al. 2024) and WARP (Rame et al. 2024); the
prefix teacher is context distillation (Snell et al. 2022): the model with a few-shot prompt
teaching the model without it.

    model = build_model_and_tokenizer(cfg, device)[0]       # fp32 base + LoRA (or full fine-tuning)
    roles = Roles(model)
    roles.add_anchor("exact", eta=0.02)                      # J-BOND / WARP anchor of the adapter
    roles.attach_sampler(gemmalab.load(path, mode="native").model)   # shares the adapter tensors
    with roles.use("reference"):                             # the base, adapter off: no extra memory
        ref_logits = model(ids)
    anchor_logits = roles.forward("anchor", ids)
    teacher = roles.prefix_teacher(few_shot_ids)             # context distillation, prefix KV once
    t_logits = teacher.logits(continuations)                 # = base(prefix + continuation), adapter off
    train_loop(..., hooks=(roles,), extra_state={"roles": roles})   # EMA after each step, resumed

| role      | held as                                               | extra memory              |
|-----------|-------------------------------------------------------|---------------------------|
| policy    | base + LoRA (trainable), or the fully trained model   | the adapter               |
| reference | the base with every adapter off                       | 0 (full FT: one snapshot) |
| anchor    | "exact": EMA of the dense delta (alpha/r) B A per     | one fp32 matrix per target|
|           | target; "factors": EMA of A and B (approximate)       | the size of the adapter   |
| teacher   | the base (adapter off) after a fixed prefix, its KV   | the prefix's KV cache     |
|           | computed once; or another model (`add_model`)         | that model                |
| sampler   | a native-quantized copy of the base whose adapters    | its blocks (~0.27 GB for  |
|           | ARE the policy's tensors (`tie_lora`): no sync step   | the 270M)                 |

The factor EMA is an approximation: EMA(B) EMA(A) != EMA(B A) (the cross terms of the factors'
trajectories), the error grows with how far the factors move between anchor and policy; the dense
EMA is exact and costs one fp32 matrix per wrapped projection (~0.4 GB for the 270M with the seven
projections wrapped: 1.37x the fp32 model, where the factor anchor adds 1%).

Switching is explicit and scoped: `roles.use(role)` sets what every adapter of the base (and of the
sampler) adds for the duration of the `with` block and restores the previous state on exit, nested
blocks included. The state lives on the modules of these models, not in a global flag, and is not
thread-local: one thread at a time may use a Roles object (a second thread entering while a role is
active gets an error). This is the thread-safety concern of PEFT's `disable_adapter()` (PEFT issue
#176): a scorer running concurrently would see the other thread's adapter state. Give each thread its
own model instead.
"""
from __future__ import annotations

import contextlib
import threading
from typing import Iterable, Iterator

import torch
from torch import nn

from .lora import OFF, lora_modules, lora_state_dict, load_lora_state_dict, tie_lora

__all__ = ["Roles", "PrefixTeacher", "held_bytes", "module_tensors", "ANCHOR_KINDS", "BASE_ROLES"]

BASE_ROLES = ("policy", "reference", "anchor")
ANCHOR_KINDS = ("exact", "factors")


def module_tensors(module: nn.Module) -> Iterator[torch.Tensor]:
    """The parameters and buffers of a module (persistent or not)."""
    yield from module.parameters()
    yield from module.buffers()


def held_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes of the storages behind `tensors`, each storage counted once (tied weights, shared
    adapters and views cost nothing extra)."""
    seen: dict[tuple, int] = {}
    for t in tensors:
        if t is None:
            continue
        s = t.untyped_storage()
        seen[(t.device, s.data_ptr())] = s.nbytes()
    return sum(seen.values())


class Roles:
    """Named roles over one trainable base `model` (LoRA adapters from train.lora.apply_lora, or
    none: full fine-tuning, whose reference is a snapshot of the weights at construction)."""

    def __init__(self, model: nn.Module, *, reference: bool = True):
        self.model = model
        self.adapters = lora_modules(model)
        self.sampler: nn.Module | None = None
        self.sampler_adapters: dict = {}
        self.models: dict[str, nn.Module] = {}  # roles held by other models (add_model)
        self.teachers: list[PrefixTeacher] = []
        self.anchor_kind: str | None = None
        self.eta: float | None = None
        self.anchor: dict[str, torch.Tensor | tuple[torch.Tensor, torch.Tensor]] = {}
        self.snapshot: dict[str, torch.Tensor] = {}
        if not self.adapters:
            # full fine-tuning: the trainable tensors are the weights themselves
            self.trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
            if not self.trainable:
                raise ValueError("the model has neither LoRA adapters nor trainable weights")
            if reference:
                self.snapshot = {n: p.detach().clone() for n, p in self.trainable.items()}
        self._owner: int | None = None
        self._depth = 0

    @property
    def lora(self) -> bool:
        return bool(self.adapters)

    # ---- the anchor -----------------------------------------------------------------------------

    @torch.no_grad()
    def add_anchor(self, kind: str = "exact", eta: float = 0.01) -> None:
        """Start an EMA anchor at the current policy. kind "exact": the dense delta (alpha/r) B A
        per target matrix; "factors": A and B themselves (LoRA only; approximate, see the module
        docstring). Full fine-tuning: the EMA of the weights (exact)."""
        if kind not in ANCHOR_KINDS:
            raise ValueError(f"unknown anchor kind {kind!r}; use one of {', '.join(ANCHOR_KINDS)}")
        _check_eta(eta)
        if not self.lora:
            if kind != "exact":
                raise ValueError("full fine-tuning has no factors: its anchor is the EMA of the weights")
            self.anchor = {n: p.detach().clone() for n, p in self.trainable.items()}
        elif kind == "exact":
            self.anchor = {n: _dense_delta(m) for n, m in self.adapters.items()}
        else:
            self.anchor = {n: (m.lora_a.detach().clone(), m.lora_b.detach().clone())
                           for n, m in self.adapters.items()}
        self.anchor_kind, self.eta = kind, eta

    @torch.no_grad()
    def update_anchor(self, eta: float | None = None) -> None:
        """anchor <- (1 - eta) anchor + eta policy (eta = 1 copies the policy, 0 keeps the anchor;
        torch.lerp is exact at both ends)."""
        if self.anchor_kind is None:
            raise ValueError("no anchor: call roles.add_anchor(...) first")
        eta = self.eta if eta is None else eta
        _check_eta(eta)
        if not self.lora:
            for n, a in self.anchor.items():
                a.lerp_(self.trainable[n].detach(), eta)
        elif self.anchor_kind == "exact":
            for n, d in self.anchor.items():
                d.lerp_(_dense_delta(self.adapters[n]), eta)
        else:
            for n, (a, b) in self.anchor.items():
                m = self.adapters[n]
                a.lerp_(m.lora_a.detach(), eta)
                b.lerp_(m.lora_b.detach(), eta)

    def __call__(self, model: nn.Module, step: int) -> None:
        """The trainer's hook signature: update the anchor after each optimizer step."""
        if self.anchor_kind is not None:
            self.update_anchor()

    def anchor_delta(self, name: str) -> torch.Tensor:
        """The anchor's dense delta of one wrapped projection (the factor anchor multiplied out)."""
        if self.anchor_kind == "exact":
            return self.anchor[name]
        a, b = self.anchor[name]
        return (b @ a) * self.adapters[name].scale

    # ---- other models ---------------------------------------------------------------------------

    def attach_sampler(self, sampler: nn.Module) -> nn.Module:
        """A second copy of the base for sampling (a native-quantized QuantGemma3), given the
        policy's adapters as the same tensors (no copy, nothing to sync after an optimizer step);
        `use(role)` switches its adapters too. Returns the sampler."""
        if not self.lora:
            raise ValueError("a separate sampler follows LoRA adapters only; full fine-tuning "
                             "changes every weight (sample from the trained model itself)")
        tie_lora(sampler, self.model)
        self.sampler, self.sampler_adapters = sampler, lora_modules(sampler)
        return sampler

    def add_model(self, name: str, model: nn.Module) -> None:
        """Another model in a role (a teacher, a separate reference, a reward model)."""
        if name in BASE_ROLES and name != "reference":
            raise ValueError(f"{name!r} is a role of the base; pick another name")
        self.models[name] = model

    def prefix_teacher(self, prefix_ids, role: str = "reference", sampler: bool = False
                       ) -> "PrefixTeacher":
        """The base in `role` (default: adapters off) conditioned on a fixed prefix whose KV cache
        is computed once (context distillation: a few-shot prefix)."""
        teacher = PrefixTeacher(self, prefix_ids, role, sampler)
        self.teachers.append(teacher)
        return teacher

    # ---- switching ------------------------------------------------------------------------------

    @contextlib.contextmanager
    def use(self, role: str):
        """Within the block, the base (and the sampler) compute `role`: "policy", "reference"
        (adapters off) or "anchor". Restores the previous role on exit; single-threaded."""
        if role in self.models:
            raise ValueError(f"{role!r} is another model: call it directly or roles.forward({role!r}, ...)")
        if role not in BASE_ROLES:
            raise ValueError(f"unknown role {role!r}; the base has {', '.join(BASE_ROLES)}, "
                             f"other models: {', '.join(self.models) or 'none'}")
        if role == "anchor" and self.anchor_kind is None:
            raise ValueError("no anchor: call roles.add_anchor(...) first")
        if role == "reference" and not self.lora and not self.snapshot:
            raise ValueError("this full fine-tuning run keeps no reference (Roles(..., reference=True))")
        me = threading.get_ident()
        if self._owner is not None and self._owner != me:
            raise RuntimeError("roles.use is entered from two threads: a role is the state of the "
                               "model's modules; give each thread its own model")
        self._owner, self._depth = me, self._depth + 1
        restore = self._switch(role)
        try:
            yield self
        finally:
            restore()
            self._depth -= 1
            if self._depth == 0:
                self._owner = None

    def forward(self, role: str, *args, sampler: bool = False, **kwargs):
        """model(*args, **kwargs) in `role`; `sampler=True` runs the sampler copy. A role held by
        another model (`add_model`) calls that model."""
        if role in self.models:
            return self.models[role](*args, **kwargs)
        model = self._pick(sampler)
        with self.use(role):
            return model(*args, **kwargs)

    def _pick(self, sampler: bool) -> nn.Module:
        if sampler and self.sampler is None:
            raise ValueError("no sampler: call roles.attach_sampler(model) first")
        return self.sampler if sampler else self.model

    def _switch(self, role: str):
        if self.lora:
            saved = [(m, m.delta) for group in (self.adapters, self.sampler_adapters)
                     for m in group.values()]
            for group in (self.adapters, self.sampler_adapters):
                for name, m in group.items():
                    m.delta = self._delta(role, name)

            def restore():
                for m, d in saved:
                    m.delta = d
            return restore
        tensors = {"policy": None, "reference": self.snapshot, "anchor": self.anchor}[role]
        return _swap_parameters(self.model, tensors or {})

    def _delta(self, role: str, name: str):
        if role == "policy":
            return None
        if role == "reference":
            return OFF
        if self.anchor_kind == "exact":
            return ("dense", self.anchor[name])
        return ("factors",) + tuple(self.anchor[name])

    # ---- state and memory -----------------------------------------------------------------------

    def state_dict(self) -> dict:
        """The adapter (LoRA), the anchor and the reference snapshot (full fine-tuning): what a
        resumed run needs besides the trainer's own checkpoint. Tensors are not copied."""
        return {"lora": self.lora,
                "adapter": lora_state_dict(self.model) if self.lora else {},
                "anchor_kind": self.anchor_kind, "eta": self.eta,
                "anchor": {n: (list(t) if isinstance(t, tuple) else t) for n, t in self.anchor.items()},
                "reference": self.snapshot}

    @torch.no_grad()
    def load_state_dict(self, state: dict) -> None:
        """Restore bitwise (in place, so shared tensors such as the sampler's adapter follow)."""
        if state["lora"] != self.lora:
            raise ValueError("the saved roles are of a " + ("LoRA" if state["lora"] else "full "
                             "fine-tuning") + " run, this one is not")
        if self.lora:
            load_lora_state_dict(self.model, state["adapter"])
        if state["anchor_kind"] is None:
            self.anchor_kind, self.eta, self.anchor = None, None, {}
        else:
            if self.anchor_kind != state["anchor_kind"]:
                self.add_anchor(state["anchor_kind"], state["eta"])
            self.eta = state["eta"]
            if set(state["anchor"]) != set(self.anchor):
                raise ValueError("the saved anchor tracks other tensors than this model's")
            for n, saved in state["anchor"].items():
                own = self.anchor[n]
                for dst, src in (zip(own, saved) if isinstance(own, tuple) else [(own, saved)]):
                    dst.copy_(src)
        if set(state["reference"]) != set(self.snapshot):
            raise ValueError("the saved reference snapshot does not match this run's")
        for n, t in state["reference"].items():
            self.snapshot[n].copy_(t)

    def tensors(self) -> Iterator[torch.Tensor]:
        """Every tensor the roles hold: the base (and sampler, other models), anchor, snapshot,
        prefix caches. `held_bytes(roles.tensors())` is their memory."""
        yield from module_tensors(self.model)
        if self.sampler is not None:
            yield from module_tensors(self.sampler)
        for m in self.models.values():
            yield from module_tensors(m)
        for t in self.anchor.values():
            yield from (t if isinstance(t, tuple) else (t,))
        yield from self.snapshot.values()
        for teacher in self.teachers:
            yield from teacher.tensors()


class PrefixTeacher:
    """A model in a fixed role after a fixed prefix: its logits / hidden states for continuation
    tokens equal those of running prefix + continuation through the model (up to float summation
    order), without recomputing the prefix. The prefix's KV cache is computed once; each call
    copies it into a fresh cache of the call's batch and length."""

    def __init__(self, roles: Roles, prefix_ids, role: str = "reference", sampler: bool = False):
        self.roles, self.role, self.sampler = roles, role, sampler
        model = roles._pick(sampler)
        prefix = torch.as_tensor(prefix_ids, dtype=torch.long, device=model.device).reshape(1, -1)
        if prefix.shape[1] == 0:
            raise ValueError("the prefix is empty")
        self.length = prefix.shape[1]
        with torch.no_grad(), roles.use(role):
            self.cache = model.make_cache(1, self.length)
            model(prefix, torch.arange(self.length, device=model.device)[None], self.cache)

    def _cache(self, batch: int, length: int):
        """A cache of `batch` rows and prefix + `length` columns holding the prefix in every row."""
        model = self.roles._pick(self.sampler)
        P = self.length
        cache = model.make_cache(batch, P + length)
        if cache.ring_slots != self.cache.ring_slots:
            raise ValueError("the prefix cache and the call's cache have different ring sizes")
        for src, dst in zip(self.cache.layers, cache.layers):
            if dst.ring:  # the ring geometry does not depend on the length: copy all slots
                dst.k.copy_(src.k.expand_as(dst.k))
                dst.v.copy_(src.v.expand_as(dst.v))
            else:
                dst.k[:, :, :P].copy_(src.k.expand(batch, -1, -1, -1))
                dst.v[:, :, :P].copy_(src.v.expand(batch, -1, -1, -1))
        cache.full_pos[:, :P].copy_(self.cache.full_pos.expand(batch, -1))
        cache.ring_pos.copy_(self.cache.ring_pos.expand_as(cache.ring_pos))
        cache.lengths.fill_(P)
        return cache

    @torch.no_grad()
    def hidden_states(self, ids: torch.Tensor) -> torch.Tensor:
        """Final-norm hidden states (B, T, d) of continuations ids (B, T) (right padding is
        harmless: a position sees only earlier ones)."""
        model = self.roles._pick(self.sampler)
        ids = torch.as_tensor(ids, dtype=torch.long, device=model.device)
        ids = ids[None] if ids.dim() == 1 else ids
        B, T = ids.shape
        positions = torch.arange(self.length, self.length + T, device=model.device).expand(B, T)
        with self.roles.use(self.role):
            return model.hidden_states(ids, positions, self._cache(B, T))

    @torch.no_grad()
    def logits(self, ids: torch.Tensor) -> torch.Tensor:
        """Next-token logits (B, T, V) after each continuation token (the first row: after the
        prefix and the first continuation token)."""
        model = self.roles._pick(self.sampler)
        return model.lm_head(self.hidden_states(ids))

    def tensors(self) -> Iterator[torch.Tensor]:
        for layer in self.cache.layers:
            yield layer.k
            yield layer.v
        yield from (self.cache.full_pos, self.cache.ring_pos, self.cache.lengths)


def _check_eta(eta: float) -> None:
    if not 0.0 <= eta <= 1.0:
        raise ValueError(f"the EMA rate must be in [0, 1], got {eta}")


def _dense_delta(m) -> torch.Tensor:
    return (m.lora_b.detach() @ m.lora_a.detach()) * m.scale


def _swap_parameters(model: nn.Module, tensors: dict[str, torch.Tensor]):
    """Put `tensors` in place of the named parameters (as new frozen Parameters over the same
    storage, the model's own Parameter objects untouched, so autograd and the optimizer never see
    the swap); returns the function that puts the originals back."""
    saved = []
    for name, t in tensors.items():
        owner, _, pname = name.rpartition(".")
        module = model.get_submodule(owner) if owner else model
        saved.append((module, pname, module._parameters[pname]))
        module._parameters[pname] = nn.Parameter(t, requires_grad=False)

    def restore():
        for module, pname, p in saved:
            module._parameters[pname] = p
    return restore
