"""Several reward terms into one scalar per sample: weighted sum, per-term normalisation, and the
Inada-inspired utility transform of Maura-Rivero, Nagpal, Patel & Visin (2025, "Utility-inspired
reward transformations improve reinforcement learning training of language models").

    R = sum_i w_i u_i(n_i(r_i))

n_i   "none", or "batch": (r - mean) / std over the batch's scored samples of that term (so terms of
      different scales weigh as their w_i say; a constant term becomes 0)
u_i   "none", "inada" or "inada_low" (the paper's "partial IRT": only the low side is bent).

The Inada transform. The paper bends each reward with CRRA utilities around a threshold tau, so that
rewards below tau are penalised steeply (u' -> infinity at the floor: one critically bad term cannot
be hidden by the others) and rewards above tau have diminishing returns (u' -> 0). We parametrise it
on z = (r - floor) / (tau - floor), the reward measured in units of its distance from the floor to
the threshold:

    low  side (z < 1):  c_theta(z) = (z^(1 - theta) - 1) / (1 - theta)     theta >= 1 (log z at theta = 1)
    high side (z >= 1): c_phi(z)   = (z^(1 - phi) - 1) / (1 - phi)         0 <= phi < 1 ("inada_low": z - 1)
    u(r) = tau + (tau - floor) * c(z)

Both pieces are 0 with slope 1 at z = 1, so u is continuous with a continuous derivative at tau,
increasing and concave everywhere, and equal to r at tau; at theta >= 1 the low side goes to -infinity
at the floor (the Inada condition u' -> infinity), so z is clipped at `eps` = 0.01 (a reward at its
floor gets u = tau + (tau - floor) log 0.01 with the default theta = 1). theta = phi = 0 is the
identity. The paper fixes the form (CRRA around a threshold), not one parametrisation: ours is
the one above, documented in docs/post_training.md.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

from .base import RewardResult

__all__ = ["TRANSFORMS", "NORMALIZATIONS", "Term", "inada", "combine"]

TRANSFORMS = ("none", "inada", "inada_low")
NORMALIZATIONS = ("none", "batch")


def inada(r: float, *, tau: float, floor: float = 0.0, theta: float = 1.0, phi: float = 0.5,
          low_only: bool = False, eps: float = 1e-2) -> float:
    """The Inada-inspired utility of one reward (see the module docstring)."""
    if not tau > floor:
        raise ValueError(f"the Inada threshold tau ({tau}) must be above the floor ({floor})")
    if theta < 0 or not 0 <= phi < 1:
        raise ValueError(f"Inada needs theta >= 0 and 0 <= phi < 1, got theta={theta}, phi={phi}")
    z = max((r - floor) / (tau - floor), eps)
    if z < 1:
        c = math.log(z) if theta == 1 else (z ** (1 - theta) - 1) / (1 - theta)
    elif low_only:
        c = z - 1
    else:
        c = (z ** (1 - phi) - 1) / (1 - phi)
    return tau + (tau - floor) * c


@dataclass
class Term:
    """One reward term in a combination: the term itself (a Reward), its weight, its normalisation
    and its utility transform (with the Inada parameters)."""
    reward: object
    weight: float = 1.0
    normalize: str = "none"
    transform: str = "none"
    tau: float = 0.5
    floor: float = 0.0
    theta: float = 1.0
    phi: float = 0.5

    def __post_init__(self):
        if self.normalize not in NORMALIZATIONS:
            raise ValueError(f"unknown normalisation {self.normalize!r}; valid: {', '.join(NORMALIZATIONS)}")
        if self.transform not in TRANSFORMS:
            raise ValueError(f"unknown reward transform {self.transform!r}; valid: {', '.join(TRANSFORMS)}")
        if not math.isfinite(self.weight):
            raise ValueError(f"a reward weight must be a finite number, got {self.weight}")
        if self.transform != "none":  # the parameters are checked once, not at the first sample
            inada(self.tau, tau=self.tau, floor=self.floor, theta=self.theta, phi=self.phi)

    @property
    def name(self) -> str:
        return self.reward.name

    def utility(self, r: float) -> float:
        if self.transform == "none":
            return r
        return inada(r, tau=self.tau, floor=self.floor, theta=self.theta, phi=self.phi,
                     low_only=self.transform == "inada_low")


def _normalized(values: list[float | None]) -> list[float | None]:
    got = [v for v in values if v is not None]
    if not got:
        return values
    mean = sum(got) / len(got)
    std = math.sqrt(sum((v - mean) ** 2 for v in got) / len(got))
    return [None if v is None else (0.0 if std < 1e-12 else (v - mean) / std) for v in values]


def combine(terms: Sequence[Term], results: Sequence[Sequence[RewardResult]]
            ) -> tuple[list[float | None], dict[str, list[float | None]]]:
    """results[i][b]: term i's result for sample b. Returns the combined value of every sample (None
    when any term could not score it: the sample is left out of the advantage) and each term's raw
    values by name (for metrics)."""
    if len(terms) != len(results):
        raise ValueError(f"{len(terms)} reward terms but results for {len(results)}")
    if not terms:
        raise ValueError("no reward terms to combine")
    n = len(results[0])
    if any(len(r) != n for r in results):
        raise ValueError("every reward term must score every sample")
    raw = {t.name: [r.value if r.scored else None for r in res] for t, res in zip(terms, results)}
    total: list[float | None] = [0.0] * n
    for term, res in zip(terms, results):
        vals = [r.value if r.scored else None for r in res]
        if term.normalize == "batch":
            vals = _normalized(vals)
        for b, v in enumerate(vals):
            if total[b] is None or v is None:
                total[b] = None
            else:
                total[b] += term.weight * term.utility(v)
    return total, raw
