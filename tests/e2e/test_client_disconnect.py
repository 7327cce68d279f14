"""Clients that leave early: the consumer aborts their requests and releases
their leases at once, so the producer frees the KV well before the lease
would run out, and no lease expires."""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
from collections.abc import Iterator
from urllib.parse import urlparse

import psutil
import requests

from benchmarks.load_with_aborts import completion_body
from tests.e2e.conftest import random_prompt
from tests.e2e.helpers import TIMEOUT, metric, wait_idle
from tests.eventually import eventually

# Leases run 30 s on the session producer: freeing within this shows they
# were released, not expired.
FREED_WITHIN_SECONDS = 10


def raw_request(url: str, body: dict) -> bytes:
    data = json.dumps(body).encode()
    host = urlparse(url).netloc
    head = (
        f"POST /v1/completions HTTP/1.1\r\nHost: {host}\r\n"
        "Content-Type: application/json\r\n"
        f"Content-Length: {len(data)}\r\nConnection: close\r\n\r\n"
    )
    return head.encode() + data


@contextlib.contextmanager
def request_sent(url: str, body: dict) -> Iterator[None]:
    """Send a whole request; the client leaves (closes the connection) when
    the block ends."""
    parsed = urlparse(url)
    with socket.create_connection((parsed.hostname, parsed.port), timeout=30) as conn:
        conn.sendall(raw_request(url, body))
        yield


def send_and_leave(url: str, body: dict, after: float) -> None:
    """Send a whole request, then leave ``after`` seconds later (a moment
    the test picks, not a wait for something)."""
    with request_sent(url, body):
        time.sleep(after)


def asking_producers(url: str) -> float:
    """Prefills the consumer at ``url`` is waiting for from its producers."""
    metadata = requests.get(url + "/pdserve/metadata", timeout=30).json()
    return sum(p["outstanding_requests"] for p in metadata["producers"])


def leave_after_first_token(url: str, body: dict) -> str:
    """Stream a completion and close the connection after its first chunk."""
    with requests.Session() as session:
        response = session.post(
            url + "/v1/completions",
            json=dict(body, stream=True),
            stream=True,
            timeout=TIMEOUT,
        )
        assert response.status_code == 200, response.text
        for line in response.iter_lines():
            if line.startswith(b"data:"):
                response.close()
                return line.decode()
    raise AssertionError("stream ended before its first token")


def stream_body(prompt: list[int], max_tokens: int = 200) -> dict:
    return completion_body(prompt, max_tokens)


def released_by_frontend(url: str) -> float:
    return metric(
        url, "pdserve:leases_released_by_frontend_total", reason="client_disconnected"
    )


def expired(cluster) -> float:
    return metric(cluster.producer.url, "pdserve:kv_leases_expired_total")


def assert_freed_without_expiry(cluster, expired_before: float) -> None:
    assert wait_idle(cluster.producer.url, FREED_WITHIN_SECONDS) == (0, 0, 0)
    assert wait_idle(cluster.consumer.url, FREED_WITHIN_SECONDS) == (0, 0, 0)
    assert expired(cluster) == expired_before


def test_leave_mid_stream(cluster):
    """Clients leave after the first token, which is the producer's: their
    requests end while (or after) their KV is pulled; every lease goes back."""
    before = expired(cluster)
    first = metric(cluster.consumer.url, "pdserve:first_tokens_from_producer_total")
    threads = [
        threading.Thread(
            target=leave_after_first_token,
            args=(cluster.consumer.url, stream_body(random_prompt(90, seed=7000 + i))),
        )
        for i in range(4)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(TIMEOUT)
    assert metric(cluster.consumer.url, "pdserve:first_tokens_from_producer_total") == (
        first + 4
    )
    assert_freed_without_expiry(cluster, before)


def test_leave_while_the_producer_prefills(cluster):
    """The producer's engine is paused, so the lease comes only after the
    client left: the consumer hands it to its engine to release on arrival
    and never starts the request."""
    before = expired(cluster)
    released = released_by_frontend(cluster.consumer.url)
    consumer_prompts = metric(cluster.consumer.url, "vllm:prompt_tokens_total")
    engine = psutil.Process(cluster.producer.process.pid).children(recursive=True)
    for process in engine:
        process.suspend()
    try:
        with request_sent(cluster.consumer.url, stream_body(random_prompt(64, 7100))):
            eventually(
                lambda: asking_producers(cluster.consumer.url),
                30,
                "the consumer to ask the producer",
                interval=0.05,
            )
    finally:
        for process in engine:
            process.resume()
    eventually(
        lambda: released_by_frontend(cluster.consumer.url) != released,
        FREED_WITHIN_SECONDS,
        "the consumer to release the lease",
        interval=0.25,
    )
    assert released_by_frontend(cluster.consumer.url) == released + 1
    # The request never reached the consumer's engine.
    assert metric(cluster.consumer.url, "vllm:prompt_tokens_total") == consumer_prompts
    assert_freed_without_expiry(cluster, before)


def test_leave_at_any_moment(cluster):
    """Whatever the request was doing when its client left (prefill on the
    producer, waiting in the consumer's queue, pulling KV, decoding)."""
    before = expired(cluster)
    delays = [0.0, 0.005, 0.01, 0.02, 0.04, 0.08, 0.15, 0.3]
    threads = [
        threading.Thread(
            target=send_and_leave,
            args=(
                cluster.consumer.url,
                stream_body(random_prompt(40 + 100 * (i % 3), seed=7200 + i)),
                delays[i % len(delays)],
            ),
        )
        for i in range(2 * len(delays))
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(TIMEOUT)
    assert_freed_without_expiry(cluster, before)
