"""TP 2 on both nodes: each consumer rank reads its KV heads from the same
producer rank; tokens equal the TP 1 baseline. Mismatched TP is refused."""

from __future__ import annotations

import pytest

from pdserve.local_cluster import ServerProcess, cpu_env
from tests.e2e.conftest import BLOCK_SIZE, engine_args, random_prompt
from tests.e2e.helpers import completion_tokens, greedy, metric, wait_idle
from tests.e2e.test_token_exact import bytes_per_block

TP = ["--tensor-parallel-size", "2"]


def tp2_env() -> dict[str, str]:
    # One core per rank, as vLLM's CPU backend wants for TP on 2 cores.
    env = cpu_env()
    env["VLLM_CPU_OMP_THREADS_BIND"] = "0|1"
    return env


@pytest.fixture(scope="module")
def tp2_pair(cluster, tiny_model, log_dir):
    producer = ServerProcess.pdserve(
        "producer-tp2",
        ["--model", tiny_model, "--kv-role", "producer", *TP]
        + engine_args(tiny_model, 1024),
        log_dir,
        tp2_env(),
    )
    consumer = ServerProcess.pdserve(
        "consumer-tp2",
        ["--model", tiny_model, "--kv-role", "consumer", *TP]
        + ["--producer-url", producer.url, *engine_args(tiny_model, 1024)],
        log_dir,
        tp2_env(),
    )
    try:
        producer.wait_ready()
        consumer.wait_ready()
        yield producer, consumer
    finally:
        consumer.stop()
        producer.stop()


@pytest.mark.parametrize("length", [BLOCK_SIZE - 1, BLOCK_SIZE + 1, 7 * BLOCK_SIZE + 5])
def test_tp2_tokens_equal_tp1_baseline(cluster, tp2_pair, length):
    _, consumer = tp2_pair
    body = greedy(random_prompt(length, seed=3000 + length))
    bytes_before = metric(consumer.url, "pdserve:kv_bytes_received_total")
    loads_before = metric(consumer.url, "pdserve:kv_loads_total")

    assert completion_tokens(consumer.url, body) == completion_tokens(
        cluster.baseline.url, body
    )
    # Both ranks pulled their half of the heads: together, the whole prompt.
    blocks = -(-length // BLOCK_SIZE)
    received = metric(consumer.url, "pdserve:kv_bytes_received_total") - bytes_before
    assert received == blocks * bytes_per_block(cluster)
    assert metric(consumer.url, "pdserve:kv_loads_total") - loads_before == 2


def test_tp2_pair_idle_afterwards(tp2_pair):
    producer, consumer = tp2_pair
    assert wait_idle(producer.url) == (0, 0, 0)
    assert wait_idle(consumer.url) == (0, 0, 0)
    assert metric(producer.url, "pdserve:kv_leases_expired_total") == 0


def test_consumer_with_other_tp_is_refused(tp2_pair, tiny_model, log_dir):
    producer, _ = tp2_pair
    args = ["--model", tiny_model, "--kv-role", "consumer"]
    args += ["--producer-url", producer.url, *engine_args(tiny_model, 1024)]
    server = ServerProcess.pdserve("consumer-tp1-vs-tp2", args, log_dir)
    code = server.process.wait(timeout=120)
    server.stop()
    assert code != 0
    assert "tensor_parallel_size: consumer=1 producer=2" in server.log_path.read_text()
