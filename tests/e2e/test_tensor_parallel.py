"""Tensor parallel on both nodes, TP 2 on this machine's two cores: each
consumer rank pulls its KV heads from the same producer rank, the request runs
once both ranks have their KV, and greedy tokens equal the TP 1 baseline's.
Then TP sizes that differ: a TP 1 consumer of the TP 2 producer reads half
its heads from each producer rank (2 -> 1), and a TP 2 consumer of a TP 1
producer reads its half of the heads from the one producer rank (1 -> 2).

Runs last (its stage), with the session's producer and consumer stopped:
two TP 2 engines already put four spinning vLLM workers on two cores. Both
engines are warmed up first, because vLLM compiles kernels on first use (JIT
warm-up is off with --enforce-eager), which on two shared cores takes tens of
seconds."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest

from pdserve.local_cluster import ServerProcess, cpu_env
from tests.e2e.conftest import (
    ALWAYS_REMOTE,
    BLOCK_SIZE,
    CONSUMER_MAX_LEN,
    PRODUCER_MAX_LEN,
    Stage,
    engine_args,
    random_prompt,
)
from tests.e2e.helpers import (
    completion_tokens,
    greedy,
    metric,
    pd_counters,
    post,
    wait_idle,
)
from tests.e2e.test_token_exact import bytes_per_block

pytestmark = pytest.mark.stage(Stage.TENSOR_PARALLEL)

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


def warm_up(producer: ServerProcess, consumer: ServerProcess) -> None:
    """Make both engines compile what they compile on first use."""
    plain = greedy(random_prompt(40, seed=6900), max_tokens=3)
    assert post(producer.url, "/v1/completions", plain).status_code == 200
    # n=2 makes the consumer prefill locally: its own compile, no producer.
    local = dict(greedy(random_prompt(41, seed=6901), 3), n=2, temperature=1.0)
    assert post(consumer.url, "/v1/completions", local).status_code == 200
    # And one through the whole PD path (it may be slow; it must answer).
    remote = greedy(random_prompt(42, seed=6902), 3)
    assert post(consumer.url, "/v1/completions", remote).status_code == 200


def start(name: str, args: list[str], log_dir, env=TP_ENV) -> ServerProcess:
    server = ServerProcess.pdserve(name, args, log_dir, env=env)
    try:
        server.wait_ready()
    except BaseException:
        server.stop()
        raise
    return server


def consumer_args(model: str, producer: ServerProcess, tp: int) -> list[str]:
    return tp_args(model, "consumer", CONSUMER_MAX_LEN, tp) + [
        "--producer-url",
        producer.url,
        *ALWAYS_REMOTE,
    ]


@pytest.fixture(scope="module")
def producer_tp2(cluster, log_dir):
    # The rest of the suite is done with them (this module runs last).
    cluster.producer.stop()
    cluster.consumer.stop()
    producer = start(
        "producer-tp2", tp_args(cluster.model, "producer", PRODUCER_MAX_LEN), log_dir
    )
    yield producer
    producer.stop()


@pytest.fixture(scope="module")
def tp_pair(cluster, producer_tp2, log_dir):
    consumer = start(
        "consumer-tp2", consumer_args(cluster.model, producer_tp2, TP), log_dir
    )
    try:
        warm_up(producer_tp2, consumer)
        yield producer_tp2, consumer
    finally:
        consumer.stop()


@pytest.mark.parametrize("length", [1, BLOCK_SIZE + 1, 200, 700])
def test_tp2_tokens_equal_tp1_baseline(cluster, tp_pair, length):
    producer, consumer = tp_pair
    body = greedy(random_prompt(length, seed=7000 + length), max_tokens=8)
    before = pd_counters(consumer.url)
    loads_before = metric(consumer.url, "pdserve:kv_loads_total")
    bytes_before = metric(consumer.url, "pdserve:kv_bytes_received_total")
    sent_before = metric(producer.url, "pdserve:kv_bytes_sent_total")

    assert completion_tokens(consumer.url, body) == completion_tokens(
        cluster.baseline.url, body
    )
    # One pull per rank, each moving its half of the heads: together the
    # prompt's blocks x the whole model's bytes per block.
    assert metric(consumer.url, "pdserve:kv_loads_total") - loads_before == TP
    moved = {k: v - before[k] for k, v in pd_counters(consumer.url).items()}
    assert moved == {"remote": 1, "local": 0, "loads": TP, "failures": 0}
    expected = -(-length // BLOCK_SIZE) * bytes_per_block(cluster)
    received = metric(consumer.url, "pdserve:kv_bytes_received_total") - bytes_before
    assert received == expected
    assert wait_idle(producer.url, timeout=200) == (0, 0, 0)
    assert metric(producer.url, "pdserve:kv_bytes_sent_total") - sent_before == expected


def test_tp2_concurrent_requests(cluster, tp_pair):
    _, consumer = tp_pair
    bodies = [greedy(random_prompt(40 + 61 * i, seed=7100 + i), 6) for i in range(8)]
    before = pd_counters(consumer.url)
    with ThreadPoolExecutor(8) as pool:
        got = list(pool.map(lambda b: completion_tokens(consumer.url, b), bodies))
    assert got == [completion_tokens(cluster.baseline.url, b) for b in bodies]
    moved = {k: v - before[k] for k, v in pd_counters(consumer.url).items()}
    # Every request prefilled remotely and pulled on both ranks.
    assert moved == {"remote": 8, "local": 0, "loads": 8 * TP, "failures": 0}


def assert_pd_tokens_and_bytes(cluster, producer, consumer, consumer_tp: int) -> None:
    """Greedy tokens equal the baseline's; every request prefilled remotely,
    one pull per consumer rank, the whole model's KV bytes moved once."""
    # Counted from here: a warm-up pull may have stalled on the shared cores.
    expired = metric(producer.url, "pdserve:kv_leases_expired_total")
    for length in (1, BLOCK_SIZE + 1, 300):
        body = greedy(random_prompt(length, seed=7300 + length), max_tokens=8)
        before = pd_counters(consumer.url)
        bytes_before = metric(consumer.url, "pdserve:kv_bytes_received_total")
        sent_before = metric(producer.url, "pdserve:kv_bytes_sent_total")

        assert completion_tokens(consumer.url, body) == completion_tokens(
            cluster.baseline.url, body
        )
        moved = {k: v - before[k] for k, v in pd_counters(consumer.url).items()}
        assert moved == {"remote": 1, "local": 0, "loads": consumer_tp, "failures": 0}
        expected = -(-length // BLOCK_SIZE) * bytes_per_block(cluster)
        received = metric(consumer.url, "pdserve:kv_bytes_received_total")
        assert received - bytes_before == expected
        # Every producer rank let go of the lease once all its readers
        # released it: nothing held, nothing expired.
        assert wait_idle(producer.url, timeout=200) == (0, 0, 0)
        sent = metric(producer.url, "pdserve:kv_bytes_sent_total") - sent_before
        assert sent == expected
    assert metric(producer.url, "pdserve:kv_leases_expired_total") == expired


@pytest.fixture(scope="module")
def two_to_one(cluster, producer_tp2, tp_pair, log_dir):
    tp_pair[1].stop()  # done with it: fewer spinning workers on two cores
    consumer = start(
        "consumer-tp1-of-tp2",
        consumer_args(cluster.model, producer_tp2, 1),
        log_dir,
        env=cpu_env(cores="1"),
    )
    try:
        warm_up(producer_tp2, consumer)
        yield producer_tp2, consumer
    finally:
        consumer.stop()


def test_tp1_consumer_of_a_tp2_producer(cluster, two_to_one):
    """2 -> 1: the consumer's one rank reads half its heads from each
    producer rank."""
    producer, consumer = two_to_one
    assert_pd_tokens_and_bytes(cluster, producer, consumer, consumer_tp=1)


@pytest.fixture(scope="module")
def one_to_two(cluster, producer_tp2, two_to_one, log_dir):
    two_to_one[1].stop()
    producer_tp2.stop()
    producer = start(
        "producer-tp1",
        tp_args(cluster.model, "producer", PRODUCER_MAX_LEN, 1),
        log_dir,
        env=cpu_env(cores="0"),
    )
    consumer = None
    try:
        # Each node on its own core (both consumer ranks on core 1): a TP 1
        # producer sharing a core with a rank of a TP 2 consumer that spins
        # waiting for its KV was seen to stall for minutes on this machine.
        consumer = start(
            "consumer-tp2-of-tp1",
            consumer_args(cluster.model, producer, TP),
            log_dir,
            env=cpu_env(cores="1|1"),
        )
        warm_up(producer, consumer)
        yield producer, consumer
    finally:
        for server in (consumer, producer):
            if server is not None:
                server.stop()


def test_tp2_consumer_of_a_tp1_producer(cluster, one_to_two):
    """1 -> 2: both consumer ranks read their half of the heads from the one
    producer rank, which frees the blocks after the second release."""
    producer, consumer = one_to_two
    assert_pd_tokens_and_bytes(cluster, producer, consumer, consumer_tp=TP)
