"""A consumer keeps answering correctly when its producer dies (SIGKILL),
prefilling locally, and uses the producer again soon after it returns."""

from __future__ import annotations

import time

import pytest

from pdserve.local_cluster import ServerProcess
from tests.e2e.conftest import engine_args, random_prompt
from tests.e2e.helpers import completion_tokens, greedy, metric, wait_idle

BACK_WITHIN_SECONDS = 10


def start_producer(model: str, log_dir, port: int | None = None) -> ServerProcess:
    args = ["--model", model, "--kv-role", "producer", *engine_args(model, 1024)]
    return ServerProcess.pdserve("producer-loss", args, log_dir, port=port)


@pytest.fixture(scope="module")
def pair(cluster, tiny_model, log_dir):
    producer = start_producer(tiny_model, log_dir)
    producer.wait_ready()
    consumer = ServerProcess.pdserve(
        "consumer-loss",
        ["--model", tiny_model, "--kv-role", "consumer"]
        + ["--producer-url", producer.url, *engine_args(tiny_model, 1024)],
        log_dir,
    )
    servers = {"producer": producer, "consumer": consumer}
    try:
        consumer.wait_ready()
        yield servers
    finally:
        for server in servers.values():
            server.stop()


def local(url: str, reason: str) -> float:
    return metric(url, "pdserve:local_prefills_total", reason=reason)


def test_producer_killed_then_back(cluster, pair, tiny_model, log_dir):
    consumer = pair["consumer"].url
    body = greedy(random_prompt(70, seed=4000))
    expected = completion_tokens(cluster.baseline.url, body)
    assert completion_tokens(consumer, body) == expected
    remote = metric(consumer, "pdserve:remote_prefills_total")
    assert remote >= 1

    pair["producer"].kill()
    unreachable = local(consumer, "producer_unreachable")
    other = greedy(random_prompt(45, seed=4001))
    assert completion_tokens(consumer, other) == completion_tokens(
        cluster.baseline.url, other
    )
    assert local(consumer, "producer_unreachable") == unreachable + 1
    # Known down: the next request does not wait for the dead producer.
    down = local(consumer, "producer_down")
    started = time.monotonic()
    assert completion_tokens(consumer, body) == expected
    assert time.monotonic() - started < 5
    assert local(consumer, "producer_down") == down + 1

    port = pair["producer"].port
    pair["producer"] = start_producer(tiny_model, log_dir, port=port)
    pair["producer"].wait_ready()
    deadline = time.monotonic() + BACK_WITHIN_SECONDS
    while metric(consumer, "pdserve:remote_prefills_total") == remote:
        assert time.monotonic() < deadline, "consumer did not use the producer again"
        fresh = greedy(random_prompt(33, seed=int(time.monotonic() * 1000) % 10**6))
        assert completion_tokens(consumer, fresh) == completion_tokens(
            cluster.baseline.url, fresh
        )
        time.sleep(0.5)
    assert wait_idle(pair["producer"].url) == (0, 0, 0)
    assert wait_idle(consumer) == (0, 0, 0)
