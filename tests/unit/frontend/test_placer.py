"""The consumer's per-request placement as the HTTP layer runs it: prompt
token ids, its own prefix cache, the producers' load, its own load."""

from __future__ import annotations

import asyncio

import pytest

from pdserve.frontend import placer as placer_module
from pdserve.frontend.placer import Placer
from pdserve.settings import Settings


class Index:
    def __init__(self, cached: int) -> None:
        self.cached = cached

    def cached_tokens(self, ids, salt=None) -> int:
        return self.cached


def placer(monkeypatch, prompt: int, cached: int, limit: int = 40) -> Placer:
    settings = Settings(role="consumer", model="m", local_prefill_max_tokens=limit)
    placed = Placer(settings)
    placed._started = True
    placed.index = Index(cached)
    placed.max_inflight = 4

    async def ids(scope, route, payload):
        return list(range(prompt))

    monkeypatch.setattr(placer_module, "prompt_token_ids", ids)
    return placed


def place(placed: Placer, saturated: bool = False, payload: dict | None = None):
    return asyncio.run(placed.place({}, "/v1/completions", payload or {}, saturated))


@pytest.mark.parametrize(
    ("prompt", "cached", "local", "reason"),
    [
        (30, 0, True, "short_prompt"),
        (200, 0, False, "remote"),
        (200, 192, True, "prefix_cached"),
        (200, 96, False, "remote"),
    ],
)
def test_new_tokens_decide(monkeypatch, prompt, cached, local, reason):
    decision, ids = place(placer(monkeypatch, prompt, cached))
    assert (decision.local, decision.reason) == (local, reason)
    assert len(ids) == prompt


def test_saturated_producers_send_work_here_while_it_has_room(monkeypatch):
    placed = placer(monkeypatch, 500, 0)
    decision, _ = place(placed, saturated=True)
    assert (decision.local, decision.reason) == (True, "producers_saturated")
    placed.inflight = placed.max_inflight  # no room here: queue at a producer
    assert not place(placed, saturated=True)[0].local


@pytest.mark.parametrize(
    "part",
    [{"type": "image_url", "image_url": {"url": "data:"}}, ["not", "a", "part"]],
    ids=["image", "not-a-dict"],
)
def test_cache_of_multimodal_requests_is_not_trusted(monkeypatch, part):
    placed = placer(monkeypatch, 200, 192)
    chat = {"messages": [{"role": "user", "content": [part]}]}
    # Not rendered again for placement (images fetched): it goes remote.
    assert place(placed, payload=chat) == (None, None)


def test_unknown_prompt_goes_remote(monkeypatch):
    placed = placer(monkeypatch, 0, 0)

    async def none(scope, route, payload):
        return None

    monkeypatch.setattr(placer_module, "prompt_token_ids", none)
    assert place(placed) == (None, None)


def test_local_time_to_first_token_is_measured_on_streams_only(monkeypatch):
    placed = placer(monkeypatch, 10, 0, limit=-1)
    seen = []

    async def send(message):
        seen.append(message)

    async def run(streamed: bool) -> None:
        timed = placed.timed_local(send, 100, streamed)
        await timed({"type": "http.response.start", "status": 200})
        await timed({"type": "http.response.body", "body": b"data: 1"})
        await timed({"type": "http.response.body", "body": b"data: 2"})

    asyncio.run(run(streamed=False))
    assert placed.estimator._local.samples == 0
    asyncio.run(run(streamed=True))
    assert placed.estimator._local.samples == 1  # the first chunk only
    assert len(seen) == 6


def test_nothing_rendered_when_no_rule_can_keep_the_prompt_here(monkeypatch):
    placed = placer(monkeypatch, 30, 0, limit=0)

    async def never(scope, route, payload):
        raise AssertionError("rendered")

    monkeypatch.setattr(placer_module, "prompt_token_ids", never)
    assert place(placed) == (None, None)


def test_transfer_rate_comes_from_the_engines_own_metrics():
    """observe_transfer is fed in production: from the connector's transfer
    histogram and block counter in this process's registry."""
    from prometheus_client import REGISTRY, Counter, Histogram

    from pdserve.frontend.placement import CostEstimator
    from pdserve.frontend.placer import TransferMeter

    seconds = Histogram("pdserve:kv_transfer_seconds", "test")
    blocks = Counter("pdserve:kv_blocks_received", "test")
    try:
        meter = TransferMeter(block_size=16, every=1)
        est = CostEstimator(block_size=16)
        meter.sample(est)  # the starting point
        seconds.observe(0.032)
        blocks.inc(4)  # 64 tokens in 32 ms
        meter.sample(est)
        assert est.rates()["transfer_seconds_per_token"] == pytest.approx(0.0005)
    finally:
        REGISTRY.unregister(seconds)
        REGISTRY.unregister(blocks)
