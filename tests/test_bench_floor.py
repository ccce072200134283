"""bench.floor measures a real send() on loopback (no timing is asserted, only that it ran)."""

from __future__ import annotations

from bench.floor import measure


def test_the_floor_is_measured_on_a_real_socket() -> None:
    user, system, wall = measure(frames=2_000, size=250)
    assert user >= 0
    assert system >= 0
    assert wall > 0
