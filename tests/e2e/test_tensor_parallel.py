"""Tensor parallel on both nodes, TP 2 on this machine's two cores: each
consumer rank pulls its KV heads from the same producer rank, the request runs
once both ranks have their KV, and greedy tokens equal the TP 1 baseline's.
A consumer started with another TP size refuses to start."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest

from pdserve.local_cluster import ServerProcess, cpu_env
from tests.e2e.conftest import (
    BLOCK_SIZE,
    CONSUMER_MAX_LEN,
    PRODUCER_MAX_LEN,
    engine_args,
    random_prompt,
)
from tests.e2e.helpers import completion_tokens, greedy, metric, wait_idle
from tests.e2e.test_token_exact import bytes_per_block

TP = 2
# vLLM's CPU backend: one OpenMP thread per rank, rank 0 on core 0, rank 1
# on core 1 (both nodes share the two cores, as on a single test machine).
TP_ENV = cpu_env(cores="0|1")
# Two TP 2 engines on two cores: a rank can stall for tens of seconds while
# its peer ranks spin on the same core (vLLM's CPU all-reduce and step
# broadcast wait by spinning); long enough leases keep such a stall from
# turning into a local recompute.
SLOW_MACHINE = ["--kv-lease-seconds", "180", "--kv-transfer-timeout", "180"]


def tp_args(model: str, role: str, max_len: int, tp: int = TP) -> list[str]:
    return [
        "--model", model, "--kv-role", role, "--tensor-parallel-size", str(tp),
        *engine_args(model, max_len), *SLOW_MACHINE,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def tp_pair(cluster, log_dir):
    producer = ServerProcess.pdserve(
        "producer-tp2",
        tp_args(cluster.model, "producer", PRODUCER_MAX_LEN),
        log_dir,
        env=TP_ENV,
    )
    consumer = None
    try:
        producer.wait_ready()
        consumer = ServerProcess.pdserve(
            "consumer-tp2",
            tp_args(cluster.model, "consumer", CONSUMER_MAX_LEN)
            + ["--producer-url", producer.url],
            log_dir,
            env=TP_ENV,
        )
        consumer.wait_ready()
        yield producer, consumer
    finally:
        for server in (consumer, producer):
            if server is not None:
                server.stop()


@pytest.mark.parametrize("length", [1, BLOCK_SIZE + 1, 200, 700])
def test_tp2_tokens_equal_tp1_baseline(cluster, tp_pair, length):
    producer, consumer = tp_pair
    body = greedy(random_prompt(length, seed=7000 + length), max_tokens=8)
    loads_before = metric(consumer.url, "pdserve:kv_loads_total")
    bytes_before = metric(consumer.url, "pdserve:kv_bytes_received_total")
    sent_before = metric(producer.url, "pdserve:kv_bytes_sent_total")

    assert completion_tokens(consumer.url, body) == completion_tokens(
        cluster.baseline.url, body
    )
    # One pull per rank, each moving its half of the heads: together the
    # prompt's blocks x the whole model's bytes per block.
    assert metric(consumer.url, "pdserve:kv_loads_total") - loads_before == TP
    expected = -(-length // BLOCK_SIZE) * bytes_per_block(cluster)
    received = metric(consumer.url, "pdserve:kv_bytes_received_total") - bytes_before
    assert received == expected
    assert wait_idle(producer.url, timeout=200) == (0, 0, 0)
    assert metric(producer.url, "pdserve:kv_bytes_sent_total") - sent_before == expected


def test_tp2_concurrent_requests(cluster, tp_pair):
    _, consumer = tp_pair
    bodies = [greedy(random_prompt(40 + 61 * i, seed=7100 + i), 6) for i in range(8)]
    with ThreadPoolExecutor(8) as pool:
        got = list(pool.map(lambda b: completion_tokens(consumer.url, b), bodies))
    assert got == [completion_tokens(cluster.baseline.url, b) for b in bodies]
    assert metric(consumer.url, "pdserve:kv_load_failures_total") == 0


def test_consumer_with_other_tp_refused(cluster, tp_pair, log_dir):
    producer, _ = tp_pair
    consumer = ServerProcess.pdserve(
        "consumer-tp1-vs-tp2",
        tp_args(cluster.model, "consumer", CONSUMER_MAX_LEN, tp=1)
        + ["--producer-url", producer.url],
        log_dir,
    )
    code = consumer.process.wait(timeout=120)
    consumer.stop()
    assert code != 0
    log = consumer.log_path.read_text()
    assert "tensor_parallel_size: consumer=1 producer=2" in log
    assert "same --tensor-parallel-size" in log
