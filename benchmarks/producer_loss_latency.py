"""What a client sees when the producer dies and comes back.

Starts a producer and a consumer on the tiny model (each node on its own
core), then times streamed requests with fresh prompts through four phases:
producer up; the first requests after the producer is SIGKILLed (connect
refused, local prefill); later requests while it is down (the consumer skips
it); and after it is restarted on the same port, how long until the consumer
prefills remotely again. Prints TTFT medians per phase and the recovery time.

    .venv/bin/python benchmarks/producer_loss_latency.py [--requests 5]
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

from pdserve.demo import timed_stream
from pdserve.local_cluster import ServerProcess, cpu_env, scrape_metrics, split_cores
from pdserve.tiny_model import ensure_tiny_model

ENGINE = ["--dtype", "float32", "--max-model-len", "2048", "--enforce-eager"]
PROMPT_TOKENS = 512
MAX_TOKENS = 8


def prompt(seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(10, 800) for _ in range(PROMPT_TOKENS)]


def remote_prefills(consumer: ServerProcess) -> float:
    return scrape_metrics(consumer.url).get("pdserve:remote_prefills_total", 0.0)


def ttfts(consumer: ServerProcess, count: int, seed: int) -> list[float]:
    """TTFT in ms of ``count`` requests; exits if one was not served by the
    consumer (every request must get an answer in every phase)."""
    times = []
    for i in range(count):
        text, ttft, _ = timed_stream(consumer.url, prompt(seed + i), MAX_TOKENS)
        if not text:
            sys.exit(f"empty answer in phase starting at seed {seed}")
        times.append(ttft * 1e3)
    return times


def start_producer(model: str, logs: Path, cores, port: int | None = None):
    args = ["--model", model, "--kv-role", "producer", *ENGINE]
    return ServerProcess.pdserve("producer", args, logs, cpu_env(cores=cores), port)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=5)
    args = parser.parse_args()
    model = ensure_tiny_model()
    logs = Path(tempfile.mkdtemp(prefix="pdserve-loss-"))
    producer_cores, consumer_cores = split_cores()
    producer = start_producer(model, logs, producer_cores)
    producer.wait_ready()
    consumer = ServerProcess.pdserve(
        "consumer",
        ["--model", model, "--kv-role", "consumer", "--producer-url", producer.url]
        + ENGINE,
        logs,
        cpu_env(cores=consumer_cores),
    )
    rows = []
    try:
        consumer.wait_ready()
        ttfts(consumer, 2, seed=1)  # warm-up
        rows.append(
            ("producer up (remote prefill)", ttfts(consumer, args.requests, 100))
        )
        producer.kill()
        rows.append(("first request after SIGKILL", ttfts(consumer, 1, 200)))
        rows.append(("producer down (skipped)", ttfts(consumer, args.requests, 300)))
        restarted = time.perf_counter()
        producer = start_producer(model, logs, producer_cores, port=producer.port)
        producer.wait_ready()
        ready = time.perf_counter() - restarted
        before = remote_prefills(consumer)
        seed = 400
        while remote_prefills(consumer) == before:
            ttfts(consumer, 1, seed)
            seed += 1
        back = time.perf_counter() - restarted - ready
        rows.append(
            ("producer back (remote prefill)", ttfts(consumer, args.requests, 500))
        )
    finally:
        consumer.stop()
        producer.stop()
    print(f"\n{PROMPT_TOKENS}-token prompts, {MAX_TOKENS} output tokens, TTFT in ms")
    print("| phase | requests | TTFT median | TTFT max |\n|---|---:|---:|---:|")
    for name, times in rows:
        print(f"| {name} | {len(times)} | {statistics.median(times):.1f} | "
              f"{max(times):.1f} |")  # fmt: skip
    print(f"\nrestarted producer ready after {ready:.1f} s; consumer used it again "
          f"{back:.1f} s later ({seed - 400} local request(s) in between)")  # fmt: skip


if __name__ == "__main__":
    main()
