"""Placement: the decision rule and the measured cost model."""

from __future__ import annotations

import pytest

from pdserve.frontend.placement import (
    PREFIX_CACHED,
    PRODUCERS_SATURATED,
    REMOTE,
    SHORT_PROMPT,
    CostEstimator,
    decide,
)


def test_short_prompt_is_local():
    d = decide(20, 0, threshold=32)
    assert d.local and d.reason == SHORT_PROMPT and d.new_tokens == 20


def test_long_prompt_is_remote():
    d = decide(1000, 0, threshold=32)
    assert not d.local and d.reason == REMOTE and d.new_tokens == 1000


def test_prefix_cached_prompt_is_local_for_that_reason():
    d = decide(1000, 992, threshold=32)
    assert d.local and d.reason == PREFIX_CACHED and d.new_tokens == 8
    assert not decide(1000, 900, threshold=32).local


def test_saturated_producers_need_headroom():
    d = decide(1000, 0, 32, producers_saturated=True, inflight=3, max_inflight=8)
    assert d.local and d.reason == PRODUCERS_SATURATED
    full = decide(1000, 0, 32, producers_saturated=True, inflight=8, max_inflight=8)
    assert not full.local
    assert not decide(1000, 0, 32, producers_saturated=True).local


def test_threshold_zero_disables_short_prompts():
    assert not decide(5, 0, threshold=0).local


def test_startup_default_is_one_block():
    est = CostEstimator(block_size=16)
    assert est.threshold() == 16
    est.observe_local(100, 0.1)
    assert est.threshold() == 16  # the remote side is not measured yet


def test_threshold_from_measurements():
    """local = a n (1 + R), remote = c + (p + t) n: the threshold c / (a (1 +
    R) - p - t) falls as this node gets busier."""
    est = CostEstimator(block_size=16, min_samples=2)
    for _ in range(3):
        est.observe_local(1000, 1.0)  # a = 1 ms/token
        # c = 50 ms (queue 10 ms included), p = 0.5 ms/token
        est.observe_remote(0.30, queue_seconds=0.01, prefill_seconds=0.25, tokens=500)
    assert est.rates()["producer_seconds_per_token"] == pytest.approx(5e-4)
    assert est.threshold(running=0) == 100  # 50 ms / (1 - 0.5) ms
    assert est.threshold(running=1) == 33  # 50 / (2 - 0.5)
    assert est.threshold(running=9) == 16  # 50 / 9.5 = 5: clamped to a block
    for _ in range(50):
        est.observe_transfer(1000, 0.25)  # t = 0.25 ms/token
    assert est.threshold(running=0) == 200  # 50 / (1 - 0.5 - 0.25)
    assert est.rates()["local_seconds_per_token"] == pytest.approx(1e-3)


def test_idle_node_with_a_producer_no_faster_prefills_locally():
    """p >= a and nobody else running here: the hop only adds."""
    est = CostEstimator(block_size=16, min_samples=1)
    est.observe_local(1000, 1.0)
    est.observe_remote(0.3, 0.0, prefill_seconds=0.25, tokens=250)  # p = a
    assert est.threshold(running=0) == est.ceiling
    assert est.threshold(running=3) == 17  # c=50ms / (4 - 1) ms


def test_threshold_is_clamped():
    est = CostEstimator(block_size=16, min_samples=1, ceiling=256)
    est.observe_local(1000, 1.0)
    est.observe_remote(10.0, 0.0, 0.0)
    assert est.threshold() == 256
    est = CostEstimator(block_size=16, min_samples=1)
    est.observe_local(1000, 1.0)
    est.observe_remote(0.001, 0.0, 0.0)
    assert est.threshold() == 16
    # Transfer slower than compute: local always (up to the ceiling).
    est.observe_transfer(10, 1.0)
    assert est.threshold() == est.ceiling


def test_fixed_threshold_overrides():
    est = CostEstimator(block_size=16, fixed_threshold=0)
    assert est.threshold() == 0
    assert CostEstimator(block_size=16, fixed_threshold=500).threshold() == 500
    with pytest.raises(ValueError):
        CostEstimator(block_size=16, fixed_threshold=-2)


def test_ratio_of_ewmas_weighs_long_prompts():
    est = CostEstimator(block_size=16, alpha=0.5)
    est.observe_local(10, 0.1)  # short: 10 ms/token, dominated by step costs
    est.observe_local(1000, 1.0)
    rate = est.rates()["local_seconds_per_token"]
    assert rate is not None and rate < 0.0015
