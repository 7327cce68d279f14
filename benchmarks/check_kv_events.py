"""Check pdserve's prefix index against a real vLLM engine's KV events.

Starts plain vLLM on the tiny model (CPU) with the --kv-events-config pdserve
builds for consumers, subscribes like the consumer's HTTP layer will, sends a
prompt twice and compares what the index says is cached with what vLLM
reports it took from its prefix cache (vllm:prompt_tokens_by_source_total
{source="local_cache_hit"}); then resets the prefix cache and checks the
index is rebuilt from empty.

    PYTHONPATH=. .venv/bin/python benchmarks/check_kv_events.py \
        [--block-size 32] [--tokens 200]

Exit status 0 when everything matches.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from pdserve.frontend.kv_events import KVEventSubscriber
from pdserve.frontend.kv_events_config import consumer_kv_events
from pdserve.frontend.prefix_index import PrefixIndex
from pdserve.local_cluster import ServerProcess, cpu_env
from pdserve.tiny_model import ensure_tiny_model


def post(url: str, path: str, body: dict | None = None) -> dict:
    data = json.dumps(body or {}).encode()
    request = urllib.request.Request(
        url + path, data=data, headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=300) as response:
        text = response.read().decode()
    return json.loads(text) if text.strip().startswith("{") else {}


def cache_hits(url: str) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(url + "/metrics", timeout=30) as response:
        text = response.read().decode()
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if (
                s.name == "vllm:prompt_tokens_by_source_total"
                and s.labels.get("source") == "local_cache_hit"
            ):
                return s.value
    return 0.0


def wait_for(predicate, timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.1)
    return False


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--block-size", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=200)
    args = parser.parse_args()
    model = ensure_tiny_model()
    log_dir = Path(tempfile.mkdtemp(prefix="check-kv-events-"))
    events_args, source = consumer_kv_events([], runtime_dir=str(log_dir))
    assert source is not None
    print("kv-events-config:", events_args[1])
    env = cpu_env() | {"VLLM_SERVER_DEV_MODE": "1"}  # for /reset_prefix_cache
    server = ServerProcess.plain_vllm(
        "engine",
        [model, "--dtype", "float32", "--max-model-len", "1024", "--enforce-eager"]
        + ["--block-size", str(args.block_size), *events_args],
        log_dir,
        env=env,
    )
    index = PrefixIndex(args.block_size)
    subscriber = KVEventSubscriber(
        index, source.endpoint, source.replay_endpoint, source.topic
    )
    failures = []
    try:
        server.wait_ready()
        subscriber.start()
        prompt = [10 + (i * 7919) % 700 for i in range(args.tokens)]
        request = {"model": model, "prompt": prompt, "max_tokens": 4}
        post(server.url, "/v1/completions", request)
        expect = (args.tokens - 1) // args.block_size * args.block_size
        if not wait_for(lambda: index.cached_tokens(prompt) == expect):
            failures.append(
                f"index says {index.cached_tokens(prompt)} cached, expected {expect}"
            )
        before = cache_hits(server.url)
        post(server.url, "/v1/completions", request)
        hit = cache_hits(server.url) - before
        print(f"index: {index.cached_tokens(prompt)} tokens; vLLM hit: {hit:.0f}")
        if hit != index.cached_tokens(prompt):
            failures.append(f"vLLM hit {hit} != index {index.cached_tokens(prompt)}")
        other = [p + 1 for p in prompt]
        if index.cached_tokens(other) != 0:
            failures.append("an unseen prompt is reported cached")
        post(server.url, "/reset_prefix_cache")
        # vLLM publishes events after an engine step: the reset's
        # AllBlocksCleared comes with the next request's.
        post(server.url, "/v1/completions", dict(request, prompt=other))
        if not wait_for(lambda: index.cached_tokens(other) == expect):
            failures.append("the request after the reset is not indexed")
        if index.cached_tokens(prompt) != 0:
            failures.append("the index still holds blocks from before the reset")
        print(
            f"batches {subscriber.batches}, gaps {subscriber.gaps}, "
            f"replayed {subscriber.replayed}, errors {subscriber.errors}, "
            f"ignored events {index.ignored_events}"
        )
    finally:
        subscriber.close()
        server.stop()
    for failure in failures:
        print("FAIL:", failure)
    if failures:
        print(f"engine log: {server.log_path}")
        return 1
    print("OK: the prefix index matches the engine")
    return 0


if __name__ == "__main__":
    sys.exit(main())
