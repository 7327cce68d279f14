"""One producer, one consumer and one plain-vLLM baseline for the whole
session: engine starts dominate the suite's time on a 2-core machine."""

from __future__ import annotations

import random
from dataclasses import dataclass
from enum import IntEnum
from pathlib import Path

import pytest

from pdserve.local_cluster import ServerProcess, cpu_env, split_cores
from pdserve.settings import KV_SECRET_ENV_VAR
from pdserve.tiny_model import ensure_tiny_model

BLOCK_SIZE = 32
CONSUMER_MAX_LEN = 1024
PRODUCER_MAX_LEN = 2048
# The session's nodes authenticate their KV side channel: the producer gets
# the secret from the environment, consumers from --kv-secret.
KV_SECRET = "e2e-kv-secret-4f1c"
# Each node on its own cores, as on separate machines: vLLM's CPU workers
# spin between steps, and a producer spinning (it steps while it holds
# leases) on the cores of a consumer's OpenMP team stalls that consumer's
# steps for as long as the leases last. Baselines run on the consumer's
# cores (never timed, and only while the consumer is idle).
PRODUCER_CORES, CONSUMER_CORES = split_cores()


# Consumers of the suite prefill every prompt remotely (placement would keep
# short or locally cached prompts here, or take a busy producer's work): the
# tests prove the remote path. Placement itself is tested with its own
# consumer (test_xpyd).
ALWAYS_REMOTE = [
    "--local-prefill-max-tokens", "0",
    "--producer-saturation-requests", "1000000",
]  # fmt: skip


def producer_env(**extra: str) -> dict[str, str]:
    return cpu_env(cores=PRODUCER_CORES) | extra


def consumer_env(**extra: str) -> dict[str, str]:
    return cpu_env(cores=CONSUMER_CORES) | extra


def engine_args(model: str, max_len: int) -> list[str]:
    # float32: random tiny models are chaotic, bf16 noise flips argmax.
    return [
        "--dtype", "float32",
        "--max-model-len", str(max_len),
        "--block-size", str(BLOCK_SIZE),
        "--enforce-eager",
        "--seed", "0",
        "--max-num-seqs", "32",
    ]  # fmt: skip


class Stage(IntEnum):
    """When a module runs (``pytestmark = pytest.mark.stage(Stage.X)``; an
    unmarked one is SHARED): after every module of an earlier stage, in
    pytest's order within its own. Later stages stop the session's servers
    that earlier ones use."""

    SHARED = 0  # the session's producer, consumer and baseline serve
    IDLE_CHECK = 1  # all of SHARED done: nothing may be held on either node
    XPYD = 2  # stops the session's consumer (two producers and more engines)
    TENSOR_PARALLEL = 3  # stops the session's producer too (TP 2 engines)


def stage_of(item: pytest.Item) -> int:
    marker = item.get_closest_marker("stage")
    return Stage.SHARED if marker is None else int(marker.args[0])


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """This directory's tests in stage order (a stable sort), in the places
    they were collected at among others' (``pytest tests`` runs the unit
    tests after them, as before)."""
    here = Path(__file__).parent
    slots = [i for i, item in enumerate(items) if here in item.path.parents]
    ordered = sorted((items[i] for i in slots), key=stage_of)
    for slot, item in zip(slots, ordered, strict=True):
        items[slot] = item


@dataclass
class Cluster:
    model: str
    producer: ServerProcess
    consumer: ServerProcess
    baseline: ServerProcess
    log_dir: Path


@pytest.fixture(scope="session")
def tiny_model() -> str:
    return ensure_tiny_model()


@pytest.fixture(scope="session")
def log_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("server-logs")


@pytest.fixture(scope="session")
def cluster(tiny_model, log_dir):
    producer = ServerProcess.pdserve(
        "producer",
        ["--model", tiny_model, "--kv-role", "producer"]
        + engine_args(tiny_model, PRODUCER_MAX_LEN),
        log_dir,
        env=producer_env(**{KV_SECRET_ENV_VAR: KV_SECRET}),
    )
    consumer = ServerProcess.pdserve(
        "consumer",
        ["--model", tiny_model, "--kv-role", "consumer", "--kv-secret", KV_SECRET]
        + ALWAYS_REMOTE
        + ["--producer-url", producer.url]
        + engine_args(tiny_model, CONSUMER_MAX_LEN),
        log_dir,
        env=consumer_env(),
    )
    baseline = ServerProcess.plain_vllm(
        "baseline",
        [tiny_model, *engine_args(tiny_model, CONSUMER_MAX_LEN)],
        log_dir,
        env=consumer_env(),
    )
    servers = [producer, consumer, baseline]
    try:
        for server in servers:
            server.wait_ready()
        yield Cluster(tiny_model, producer, consumer, baseline, log_dir)
    finally:
        for server in servers:
            server.stop()


def random_prompt(length: int, seed: int) -> list[int]:
    """Token ids of an exact length, avoiding the tokenizer's special tokens."""
    rng = random.Random(seed)
    return [rng.randrange(10, 800) for _ in range(length)]
