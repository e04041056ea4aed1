"""What every reward term is: a batched callable from (problems, completions) to scored results.

    Problem        one task instance: the prompt the policy sees, what the verifier needs
                   (reference answer, unit-test inputs and expected outputs: kept in the parent,
                   never handed to sandboxed code), its family, template and split
    RewardResult   value (None when unscorable), per-term components, and a status
    Reward         reward(problems, completions) -> list[RewardResult]; never raises for a bad
                   completion: a verifier that fails or times out answers with a status
    RewardCache    results keyed by sha256(reward name, problem id, completion), checkpointed with
                   the run, so a resumed run or a re-evaluation re-scores nothing (sandbox
                   timeouts depend on the machine's load; a cached verdict does not)

Statuses: "ok"; "unparseable" (no answer could be read: scored as the term's floor, usually 0, and
counted); "timeout", "sandbox_error", "error" (the verifier itself failed: value None, and the
sample is left out of the advantage, TRL's None convention, never silently scored 0).
This package never imports the trainer (docs/post_training.md, "Rewards").
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, Protocol, Sequence, runtime_checkable

__all__ = ["STATUSES", "SCORED", "Problem", "RewardResult", "Reward", "RewardCache", "failed"]

STATUSES = ("ok", "unparseable", "timeout", "sandbox_error", "error")
SCORED = ("ok", "unparseable")  # statuses whose value is a score; the others carry value None


@dataclass
class Problem:
    """One task instance. `id` is stable across runs (family/template/seed), so cached rewards and
    held-out splits can refer to it."""
    id: str
    prompt: str
    family: str
    reference: Any = None  # the answer (math, sorting, sequences) or a canonical solution (code)
    tests: list = field(default_factory=list)  # code: [(args, expected), ...]; the parent compares
    entry_point: str = ""  # code: the function the tests call
    template: str = ""  # the generator template (held-out splits are by template)
    split: str = "train"  # "train" | "heldout"
    meta: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return {"id": self.id, "prompt": self.prompt, "family": self.family, "reference": self.reference,
                "tests": self.tests, "entry_point": self.entry_point, "template": self.template,
                "split": self.split, "meta": self.meta}

    @classmethod
    def from_json(cls, d: dict) -> "Problem":
        return cls(**{k: d[k] for k in ("id", "prompt", "family")}, reference=d.get("reference"),
                   tests=[tuple(t) if isinstance(t, list) and len(t) == 2 else t for t in d.get("tests", [])],
                   entry_point=d.get("entry_point", ""), template=d.get("template", ""),
                   split=d.get("split", "train"), meta=d.get("meta", {}))


@dataclass
class RewardResult:
    value: float | None
    status: str = "ok"
    components: dict[str, float] = field(default_factory=dict)
    detail: str = ""  # why, for statuses other than "ok" (shown by `gemmalab reward check`)

    def __post_init__(self):
        if self.status not in STATUSES:
            raise ValueError(f"unknown reward status {self.status!r}; valid: {', '.join(STATUSES)}")
        if self.status in SCORED and self.value is None:
            raise ValueError(f"a reward with status {self.status!r} needs a value")
        if self.status not in SCORED and self.value is not None:
            raise ValueError(f"a reward with status {self.status!r} has no value (the sample is left "
                             "out of the advantage)")

    @property
    def scored(self) -> bool:
        return self.status in SCORED

    def to_json(self) -> dict:
        return {"value": self.value, "status": self.status, "components": self.components,
                "detail": self.detail}

    @classmethod
    def from_json(cls, d: dict) -> "RewardResult":
        return cls(d["value"], d["status"], dict(d.get("components", {})), d.get("detail", ""))


def failed(status: str, detail: str = "") -> RewardResult:
    """The result of a verifier that could not score (timeout, sandbox error, ...)."""
    return RewardResult(None, status, {}, detail)


@runtime_checkable
class Reward(Protocol):
    """A reward term. `name` identifies it in metrics, caches and configs."""
    name: str

    def __call__(self, problems: Sequence[Problem], completions: Sequence[str]) -> list[RewardResult]: ...


class RewardCache:
    """sha256(term name, problem id, completion) -> RewardResult, with state_dict / load_state_dict
    so the trainer checkpoints it with the step it belongs to (train.trainer's extra_state)."""

    def __init__(self):
        self.entries: dict[str, dict] = {}
        self.hits = 0
        self.misses = 0

    @staticmethod
    def key(name: str, problem: Problem, completion: str) -> str:
        blob = json.dumps([name, problem.id, problem.prompt, completion], ensure_ascii=False)
        return hashlib.sha256(blob.encode()).hexdigest()

    def score(self, reward: Reward, problems: Sequence[Problem], completions: Sequence[str]
              ) -> list[RewardResult]:
        """reward(problems, completions), calling it only for pairs not cached yet."""
        if len(problems) != len(completions):
            raise ValueError(f"{len(problems)} problems but {len(completions)} completions")
        keys = [self.key(reward.name, p, c) for p, c in zip(problems, completions)]
        todo = [i for i, k in enumerate(keys) if k not in self.entries]
        todo_unique = list(dict.fromkeys(keys[i] for i in todo))
        first = {}
        for i in todo:
            first.setdefault(keys[i], i)
        if todo_unique:
            idx = [first[k] for k in todo_unique]
            fresh = reward([problems[i] for i in idx], [completions[i] for i in idx])
            if len(fresh) != len(idx):
                raise RuntimeError(f"reward {reward.name!r} returned {len(fresh)} results for {len(idx)} "
                                   "completions")
            for k, r in zip(todo_unique, fresh):
                self.entries[k] = r.to_json()
        self.hits += len(keys) - len(todo_unique)  # misses: the pairs the reward was called on
        self.misses += len(todo_unique)
        return [RewardResult.from_json(self.entries[k]) for k in keys]

    def state_dict(self) -> dict:
        return {"entries": dict(self.entries), "hits": self.hits, "misses": self.misses}

    def load_state_dict(self, state: dict) -> None:
        self.entries = dict(state["entries"])
        self.hits, self.misses = int(state["hits"]), int(state["misses"])
