"""Greedy tokens through producer + consumer equal plain vLLM's, and the
consumer really used the producer's KV instead of recomputing the prompt."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest

from pdserve.local_cluster import scrape_by_label
from tests.e2e.conftest import BLOCK_SIZE, CONSUMER_MAX_LEN, random_prompt
from tests.e2e.helpers import (
    RemotePath,
    completion_tokens,
    greedy,
    metric,
    post,
    stream,
)

MAX_TOKENS = 8
LENGTHS = [
    1,
    BLOCK_SIZE - 1,
    BLOCK_SIZE,
    BLOCK_SIZE + 1,
    5 * BLOCK_SIZE + 3,
    CONSUMER_MAX_LEN - MAX_TOKENS,
]


def test_pairing_is_counted_by_its_transport(cluster):
    """CPU nodes pair over tcp; ``pdserve:kv_pairings_total{transport}`` says
    so (the GPU scripts read it), reported with an engine step."""
    body = greedy(random_prompt(40, seed=9100), 2)
    with RemotePath(cluster.consumer.url, 1):
        completion_tokens(cluster.consumer.url, body)
    pairings = scrape_by_label(
        cluster.consumer.url, "pdserve:kv_pairings_total", "transport"
    )
    assert set(pairings) == {"tcp"} and pairings["tcp"] >= 1


def prompt_tokens(url: str, source: str) -> float:
    return metric(url, "vllm:prompt_tokens_by_source_total", source=source)


@pytest.mark.parametrize("length", LENGTHS)
def test_greedy_tokens_equal_baseline(cluster, length):
    body = greedy(random_prompt(length, seed=length), MAX_TOKENS)
    consumer = cluster.consumer.url
    external_before = prompt_tokens(consumer, "external_kv_transfer")
    local_before = prompt_tokens(consumer, "local_compute")
    loads_before = metric(consumer, "pdserve:kv_loads_total")
    bytes_before = metric(consumer, "pdserve:kv_bytes_received_total")

    expected = completion_tokens(cluster.baseline.url, body)
    with RemotePath(consumer, 1):
        got = completion_tokens(consumer, body)

    assert got == expected
    assert len(got) == MAX_TOKENS
    # The whole prompt's KV came from the producer; at most the last prompt
    # token is recomputed to sample the first output token.
    assert prompt_tokens(consumer, "external_kv_transfer") - external_before >= (
        length - 1
    )
    assert prompt_tokens(consumer, "local_compute") - local_before <= 1
    assert metric(consumer, "pdserve:kv_loads_total") - loads_before == 1
    # Bytes moved are exactly the prompt's blocks (no local prefix hits here:
    # every prompt is new to the consumer).
    num_blocks = -(-length // BLOCK_SIZE)
    received = metric(consumer, "pdserve:kv_bytes_received_total") - bytes_before
    assert received == num_blocks * bytes_per_block(cluster)


def bytes_per_block(cluster) -> int:
    import json
    from pathlib import Path

    config = json.loads((Path(cluster.model) / "config.json").read_text())
    head_dim = (
        config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    )
    per_token = 2 * config["num_key_value_heads"] * head_dim * 4  # K+V, float32
    return config["num_hidden_layers"] * BLOCK_SIZE * per_token


def test_shared_prefix_moves_only_new_blocks(cluster):
    """Blocks already in the consumer's prefix cache are not transferred."""
    prefix = random_prompt(4 * BLOCK_SIZE, seed=1001)
    first = greedy(prefix + random_prompt(5, seed=1002), MAX_TOKENS)
    second = greedy(prefix + random_prompt(BLOCK_SIZE + 7, seed=1003), MAX_TOKENS)
    consumer = cluster.consumer.url
    expected = [completion_tokens(cluster.baseline.url, b) for b in (first, second)]
    with RemotePath(consumer, 1):
        assert completion_tokens(consumer, first) == expected[0]
    blocks_before = metric(consumer, "pdserve:kv_blocks_received_total")
    with RemotePath(consumer, 1):
        assert completion_tokens(consumer, second) == expected[1]
    moved = metric(consumer, "pdserve:kv_blocks_received_total") - blocks_before
    total_blocks = -(-len(second["prompt"]) // BLOCK_SIZE)
    assert moved == total_blocks - 4


def mixed_request(i: int) -> tuple[str, dict, bool]:
    """Request i of the concurrent mix: completion or chat, streamed or not."""
    stream_it = i % 2 == 1
    if i % 4 < 2:
        length = [3, 17, 40, 100, 250, 16, 15, 64][i % 8]
        body = greedy(random_prompt(length, seed=2000 + i), max_tokens=4 + i % 5)
        return "/v1/completions", body, stream_it
    words = " ".join(["rain", "cache", "bread", "route", "wind", "salt"][: 2 + i % 4])
    body = {
        "messages": [{"role": "user", "content": f"Tell me about {words} #{i}"}],
        "max_tokens": 4 + i % 5,
        "temperature": 0,
    }
    return "/v1/chat/completions", body, stream_it


def answer_text(url: str, path: str, body: dict, stream_it: bool) -> str:
    if stream_it:
        return stream(url, path, body)
    choice = post(url, path, body).json()["choices"][0]
    return choice["text"] if "text" in choice else choice["message"]["content"]


def test_sixteen_concurrent_mixed_requests(cluster):
    requests_ = [mixed_request(i) for i in range(16)]
    with RemotePath(cluster.consumer.url, 16), ThreadPoolExecutor(16) as pool:
        got = list(pool.map(lambda r: answer_text(cluster.consumer.url, *r), requests_))
    expected = [
        answer_text(cluster.baseline.url, path, body, False)
        for path, body, _ in requests_
    ]
    assert got == expected
    assert all(got)
