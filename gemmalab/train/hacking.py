"""Teacher-hacking diagnostics (Tiapkin et al. 2025, "On Teacher Hacking in Language Model Distillation",
arXiv 2502.02671; spec post_training.md A.5).

Setting: an oracle (the ground truth), a teacher distilled from it (an imperfect proxy), a student
distilled from the teacher. On held-out prompts,

    proxy metric   D(teacher || student)   what distillation optimises
    golden metric  D(oracle  || student)   what we care about

Teacher hacking is the proxy still falling while the golden metric rises: a U-shaped golden curve
against the proxy. It appears with a fixed offline data set trained over many epochs, not with fresh
(online) generations, and it can be detected without an oracle: the proxy curve leaves the
polynomial (power-law) convergence it followed early on. `PowerLawMonitor` does that check;
`golden_u_shape` reads the golden curve when an oracle is available.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

__all__ = ["fit_power_law", "PowerLawMonitor", "golden_u_shape"]


def fit_power_law(steps, values) -> tuple[float, float]:
    """(a, b) of value = a * step^-b, least squares in log-log space (steps and values > 0)."""
    xs = [math.log(s) for s in steps]
    ys = [math.log(v) for v in values]
    n = len(xs)
    if n < 2:
        raise ValueError("a power-law fit needs at least 2 points")
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    if sxx == 0:
        raise ValueError("a power-law fit needs at least 2 distinct steps")
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx
    return math.exp(my - slope * mx), -slope


@dataclass
class PowerLawMonitor:
    """Fits value = a * step^-b to the first `fit_points` points of a curve (e.g. the proxy metric on
    held-out prompts, logged every few steps), then flags the first point from which the curve stays
    above the fit's extrapolation by more than `tolerance` (relative, in log space) for `patience`
    consecutive points: the slowdown that announces teacher hacking. Points below the fit (faster
    convergence) are not flagged.

        monitor = PowerLawMonitor(fit_points=5)
        for step, proxy in evaluations:
            if (msg := monitor.update(step, proxy)):
                warnings.warn(msg)
    """
    fit_points: int = 5
    tolerance: float = 0.05
    patience: int = 2
    steps: list = field(default_factory=list)
    values: list = field(default_factory=list)
    fit: tuple[float, float] | None = None
    departed_at: int | None = None  # the step of the first point of the departure
    _run: int = 0

    def predict(self, step: float) -> float:
        a, b = self.fit
        return a * step ** -b

    def deviation(self, step: float, value: float) -> float:
        """log(value / fit(step)): > 0 above the power law."""
        return math.log(value / self.predict(step))

    def update(self, step: int, value: float) -> str | None:
        """Record a point; return a warning message the first time the departure is confirmed."""
        if step <= 0 or value <= 0:
            raise ValueError(f"the power-law monitor needs positive steps and values, got ({step}, {value})")
        self.steps.append(step)
        self.values.append(value)
        if self.fit is None:
            if len(self.steps) >= self.fit_points:
                self.fit = fit_power_law(self.steps, self.values)
            return None
        if self.departed_at is not None:
            return None
        if self.deviation(step, value) > self.tolerance:
            self._run += 1
            if self._run >= self.patience:
                self.departed_at = self.steps[-self.patience]
                a, b = self.fit
                return (f"the proxy metric left its power law {a:.3g} * step^-{b:.3g} at step "
                        f"{self.departed_at} (now {value:.4g}, the law predicts {self.predict(step):.4g}): "
                        "the student may be hacking the teacher (Tiapkin et al. 2025). Fresh, more diverse "
                        "data (online generations, more prompts) prevents it.")
        else:
            self._run = 0
        return None


def golden_u_shape(values, margin: float = 0.02) -> dict:
    """Whether a golden-metric curve falls then rises: {"u_shape", "min_index", "rise"}, where rise is
    (last - min) / min and a U shape needs a minimum strictly inside the curve and rise > margin."""
    if not values:
        raise ValueError("an empty curve")
    i = min(range(len(values)), key=lambda k: values[k])
    rise = (values[-1] - values[i]) / abs(values[i]) if values[i] else float("inf")
    return {"u_shape": 0 < i < len(values) - 1 and rise > margin, "min_index": i, "rise": rise}
