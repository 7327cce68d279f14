"""Nodes killed with SIGKILL. A consumer keeps answering correctly when its
producer dies, prefilling locally, and uses the producer again soon after it
returns. A producer frees the KV leased to a consumer that dies, when the
leases run out."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import psutil
import pytest
import requests

from pdserve.local_cluster import ServerProcess, free_port
from tests.e2e.conftest import (
    ALWAYS_REMOTE,
    consumer_env,
    engine_args,
    producer_env,
    random_prompt,
)
from tests.e2e.helpers import (
    TIMEOUT,
    completion_tokens,
    greedy,
    metric,
    pd_counters,
    wait_idle,
)
from tests.eventually import eventually

BACK_WITHIN_SECONDS = 10
# Short leases: the consumer-crash test waits for them to run out.
LEASE_SECONDS = 8
# A restarted producer comes back on the same KV port too.
KV_PORT = free_port()


def start_producer(model: str, log_dir, port: int | None = None) -> ServerProcess:
    args = ["--model", model, "--kv-role", "producer", *engine_args(model, 1024)]
    args += ["--kv-lease-seconds", str(LEASE_SECONDS), "--kv-port", str(KV_PORT)]
    return ServerProcess.pdserve(
        "producer-loss", args, log_dir, env=producer_env(), port=port
    )


@pytest.fixture(scope="module")
def pair(cluster, tiny_model, log_dir):
    producer = start_producer(tiny_model, log_dir)
    producer.wait_ready()
    consumer = ServerProcess.pdserve(
        "consumer-loss",
        ["--model", tiny_model, "--kv-role", "consumer", *ALWAYS_REMOTE]
        + ["--producer-url", producer.url, *engine_args(tiny_model, 1024)],
        log_dir,
        env=consumer_env(),
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


def local_for_producer(url: str) -> dict[str, float]:
    return {r: local(url, r) for r in ("producer_down", "all_producers_failed")}


def test_producer_killed_mid_load_then_back_on_same_ports(
    cluster, pair, tiny_model, log_dir
):
    """kill -9 of the producer while requests are being prefilled and pulled,
    then a new producer on the same HTTP and KV ports: every answer equals
    plain vLLM's; the new instance is used again within seconds, the
    consumer pairs with it anew, and no pull after that fails."""
    consumer = pair["consumer"].url
    body = greedy(random_prompt(70, seed=4000))
    expected = completion_tokens(cluster.baseline.url, body)
    assert completion_tokens(consumer, body) == expected
    remote = metric(consumer, "pdserve:remote_prefills_total")
    assert remote >= 1

    in_flight = [greedy(random_prompt(300 + i, seed=4010 + i), 8) for i in range(8)]
    with ThreadPoolExecutor(8) as pool:
        answers = [pool.submit(completion_tokens, consumer, b) for b in in_flight]
        # Killed once its first lease is out: the others are being prefilled
        # or pulled.
        eventually(
            lambda: metric(consumer, "pdserve:remote_prefills_total") > remote,
            60,
            "the load's first lease",
            interval=0.05,
        )
        pair["producer"].kill()
        got = [answer.result() for answer in answers]
    assert got == [completion_tokens(cluster.baseline.url, b) for b in in_flight]
    # The next requests do not wait for the dead producer: the first one to
    # call it finds it unreachable (an in-flight request may have been that
    # one, if the kill caught it calling), from then on it is known down.
    before = local_for_producer(consumer)
    started = time.monotonic()
    for _ in range(2):
        assert completion_tokens(consumer, body) == expected
    assert time.monotonic() - started < 10
    fell_back = local_for_producer(consumer)
    assert fell_back["producer_down"] + fell_back["all_producers_failed"] == (
        before["producer_down"] + before["all_producers_failed"] + 2
    )
    assert fell_back["producer_down"] >= before["producer_down"] + 1

    pair["producer"] = start_producer(tiny_model, log_dir, port=pair["producer"].port)
    pair["producer"].wait_ready()
    # Pulls, not remote prefills: the pool drops the dead instance's
    # remote_prefills series when it learns of the restart (a sum that falls
    # is no sign of use; CI once read it as one).
    loads = metric(consumer, "pdserve:kv_loads_total")

    def ask_fresh() -> None:
        fresh = greedy(random_prompt(33, seed=int(time.monotonic() * 1000) % 10**6))
        assert completion_tokens(consumer, fresh) == completion_tokens(
            cluster.baseline.url, fresh
        )

    eventually(
        lambda: metric(consumer, "pdserve:kv_loads_total") > loads,
        BACK_WITHIN_SECONDS,
        "the consumer to use the producer again",
        step=ask_fresh,
        interval=0.5,
    )
    before = pd_counters(consumer)
    after_restart = [greedy(random_prompt(90 + i, seed=4050 + i)) for i in range(4)]
    for request in after_restart:
        assert completion_tokens(consumer, request) == completion_tokens(
            cluster.baseline.url, request
        )
    moved = {k: v - before[k] for k, v in pd_counters(consumer).items()}
    assert moved == {"remote": 4, "local": 0, "loads": 4, "failures": 0}
    # The consumer rank let go of the dead instance and paired with the new
    # one before reading from it.
    log = pair["consumer"].log_path.read_text()
    assert "is gone" in log or "replaces" in log
    paired = [line for line in log.splitlines() if "paired with producer" in line]
    assert len({line.split("(instance ")[1].split(")")[0] for line in paired}) == 2
    assert wait_idle(pair["producer"].url) == (0, 0, 0)
    assert wait_idle(consumer) == (0, 0, 0)


def post_until_killed(url: str, body: dict) -> None:
    try:
        requests.post(url + "/v1/completions", json=body, timeout=TIMEOUT)
    except requests.RequestException:
        pass  # the consumer was killed under it


def freeze_engine(server: ServerProcess) -> None:
    """Stop the consumer's engine and workers, not its HTTP server: leases
    are still taken from the producer, but nothing pulls them."""
    for child in psutil.Process(server.process.pid).children(recursive=True):
        child.suspend()


def test_consumer_killed_while_holding_leases(pair):
    """Runs after the producer test: its consumer is gone afterwards."""
    producer, consumer = pair["producer"].url, pair["consumer"].url
    assert wait_idle(producer) == (0, 0, 0)
    expired = metric(producer, "pdserve:kv_leases_expired_total")
    released = metric(producer, "pdserve:kv_leases_released_total")
    leased = metric(consumer, "pdserve:remote_prefills_total")
    freeze_engine(pair["consumer"])
    requests_sent = 4
    for i in range(requests_sent):
        body = greedy(random_prompt(64, seed=4100 + i))
        threading.Thread(
            target=post_until_killed, args=(consumer, body), daemon=True
        ).start()
    eventually(
        lambda: (
            metric(consumer, "pdserve:remote_prefills_total") >= leased + requests_sent
        ),
        60,
        "the consumer to get its leases",
        interval=0.2,
    )

    pair["consumer"].kill()
    assert metric(producer, "vllm:num_requests_running") == 0
    assert metric(producer, "vllm:kv_cache_usage_perc") > 0  # still leased
    assert wait_idle(producer, timeout=LEASE_SECONDS + 15) == (0, 0, 0)
    assert metric(producer, "pdserve:kv_leases_expired_total") == (
        expired + requests_sent
    )
    assert metric(producer, "pdserve:kv_leases_released_total") == released
    # The producer serves on.
    assert completion_tokens(producer, greedy(random_prompt(20, seed=4200)))
