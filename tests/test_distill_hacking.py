"""Teacher-hacking diagnostics: the power-law fit, the departure warning and the U-shape test."""
import math
import random

import pytest

from gemmalab.train.hacking import PowerLawMonitor, fit_power_law, golden_u_shape


def test_fit_recovers_a_power_law():
    steps = [10, 20, 40, 80, 160]
    a, b = fit_power_law(steps, [3.0 * s ** -0.4 for s in steps])
    assert a == pytest.approx(3.0) and b == pytest.approx(0.4)
    with pytest.raises(ValueError, match="2 distinct"):
        fit_power_law([5, 5], [1.0, 2.0])


def test_monitor_is_quiet_on_a_noisy_power_law_and_flags_a_departure():
    rng = random.Random(0)
    steps = list(range(8, 400, 8))
    law = [2.0 * s ** -0.3 for s in steps]
    quiet = PowerLawMonitor(fit_points=6)
    for s, v in zip(steps, law):
        assert quiet.update(s, v * math.exp(rng.gauss(0, 0.01))) is None  # 1% noise: no alarm
    assert quiet.departed_at is None and quiet.fit[1] == pytest.approx(0.3, abs=0.05)

    # The same law until step 200, then the curve flattens (it stops improving): flagged at 208,
    # confirmed by the next point, reported once.
    flat = [v if s <= 200 else law[steps.index(200)] for s, v in zip(steps, law)]
    monitor = PowerLawMonitor(fit_points=6, tolerance=0.05, patience=2)
    messages = [monitor.update(s, v) for s, v in zip(steps, flat)]
    hits = [(s, m) for s, m in zip(steps, messages) if m]
    first_above = next(s for s, v in zip(steps, flat) if math.log(v / monitor.predict(s)) > 0.05)
    assert len(hits) == 1 and monitor.departed_at == first_above
    assert hits[0][0] == steps[steps.index(first_above) + 1]
    assert "teacher" in hits[0][1] and f"step {first_above}" in hits[0][1]

    # Faster than the law is not hacking.
    fast = PowerLawMonitor(fit_points=6)
    assert all(fast.update(s, v * (0.5 if s > 200 else 1.0)) is None for s, v in zip(steps, law))
    with pytest.raises(ValueError, match="positive"):
        fast.update(500, 0.0)


def test_golden_u_shape():
    assert golden_u_shape([5, 4, 3, 3.5, 4])["u_shape"]
    assert golden_u_shape([5, 4, 3, 3.5, 4])["min_index"] == 2
    assert not golden_u_shape([5, 4, 3, 2.9, 2.8])["u_shape"]  # still falling
    assert not golden_u_shape([5, 4, 3, 3.01])["u_shape"]  # a rise within the margin
    assert not golden_u_shape([2, 3, 4])["u_shape"]  # minimum at the start: no fall first
