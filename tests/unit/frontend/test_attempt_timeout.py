"""How long an attempt at one producer may take before the next is tried."""

from __future__ import annotations

import pytest

from pdserve.frontend.attempt_timeout import (
    FLOOR_FRACTION,
    MIN_SAMPLES,
    SLACK,
    WINDOW,
    CallTimes,
    attempt_timeout,
)

BUDGET = 60.0


def test_last_attempt_gets_everything_left():
    assert attempt_timeout(42.0, 1, BUDGET, None) == 42.0
    assert attempt_timeout(42.0, 1, BUDGET, 0.01) == 42.0


def test_unmeasured_attempts_get_half_of_what_is_left():
    assert attempt_timeout(60.0, 2, BUDGET, None) == 30.0
    # With more producers left too: the ones after keep at least as long.
    assert attempt_timeout(60.0, 5, BUDGET, None) == 30.0
    assert attempt_timeout(10.0, 3, BUDGET, None) == 5.0


def test_measured_calls_shorten_an_attempt_down_to_the_floor():
    floor = BUDGET * FLOOR_FRACTION
    assert attempt_timeout(60.0, 2, BUDGET, 0.2) == floor
    assert attempt_timeout(60.0, 2, BUDGET, floor + 3) == floor + 3
    # Never past the share, however slow calls were.
    assert attempt_timeout(60.0, 2, BUDGET, 1000.0) == 30.0
    assert attempt_timeout(8.0, 2, BUDGET, 0.2) == 4.0


def test_no_bound_until_enough_calls():
    calls = CallTimes()
    for _ in range(MIN_SAMPLES - 1):
        calls.add(0.1, 100)
        assert calls.bound(100) is None
    calls.add(0.1, 100)
    assert calls.bound(100) == pytest.approx(SLACK * 0.1)


def test_bound_scales_the_slowest_call_to_the_work():
    calls = CallTimes()
    calls.add(0.5, 1000)  # slow for its size
    calls.add(0.2, 1000)
    calls.add(0.6, 4000)
    # A request of the same size: the slowest call, with slack.
    assert calls.bound(1000) == pytest.approx(SLACK * 0.6)
    # A longer prompt (or one queued behind more work) scales linearly,
    # from the call slowest for its size.
    assert calls.bound(8000) == pytest.approx(SLACK * 0.5 * 8)
    # A shorter one is never predicted faster than a measured call.
    assert calls.bound(10) == pytest.approx(SLACK * 0.6)


def test_only_recent_calls_count():
    calls = CallTimes()
    calls.add(50.0, 100)  # one slow call, long ago
    for _ in range(WINDOW):
        calls.add(0.1, 100)
    assert calls.bound(100) == pytest.approx(SLACK * 0.1)
