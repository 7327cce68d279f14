"""PD (producer + consumer) against plain vLLM on this machine's CPU.

Starts a producer, a consumer and a plain-vLLM baseline one after another on
the tiny model (timing each cold start), then sends fresh random prompts of
several lengths to the consumer and the baseline, one at a time, and prints
TTFT and end-to-end medians, plus KV bytes moved per request against the
expected blocks x bytes per block.

    .venv/bin/python benchmarks/cpu_pd_vs_baseline.py [--runs 5] [--dtype float32]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

from pdserve.demo import timed_stream
from pdserve.local_cluster import ServerProcess, cpu_env, scrape_metrics, split_cores
from pdserve.tiny_model import ensure_tiny_model

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def stream_tokens(url: str, prompt: list[int], max_tokens: int) -> tuple[float, float]:
    _, ttft, total = timed_stream(url, prompt, max_tokens, ignore_eos=True)
    return ttft, total


def received_bytes(url: str) -> float:
    return scrape_metrics(url).get("pdserve:kv_bytes_received_total", 0.0)


def bytes_per_block(model: str, block_size: int, dtype: str) -> int:
    config = json.loads((Path(model) / "config.json").read_text())
    head_dim = config.get("head_dim") or (
        config["hidden_size"] // config["num_attention_heads"]
    )
    per_token = 2 * config["num_key_value_heads"] * head_dim * DTYPE_BYTES[dtype]
    return config["num_hidden_layers"] * block_size * per_token


def start(server: ServerProcess) -> float:
    begin = time.perf_counter()
    server.wait_ready()
    return time.perf_counter() - begin


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPE_BYTES))
    parser.add_argument("--block-size", type=int, default=128)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--lengths", default="128,512,1536")
    args = parser.parse_args()

    model = ensure_tiny_model()
    engine = ["--dtype", args.dtype, "--max-model-len", "2048", "--enforce-eager"]
    engine += ["--block-size", str(args.block_size)]
    logs = Path(tempfile.mkdtemp(prefix="pdserve-bench-"))
    servers: list[ServerProcess] = []
    cold: dict[str, float] = {}
    try:
        # Each node on its own cores, as on separate machines; the baseline
        # gets the consumer's cores (measured while the producer is idle).
        producer_cores, consumer_cores = split_cores()
        producer = ServerProcess.pdserve(
            "producer",
            ["--model", model, "--kv-role", "producer", *engine],
            logs,
            cpu_env(cores=producer_cores),
        )
        servers.append(producer)
        cold["producer"] = start(producer)
        consumer = ServerProcess.pdserve(
            "consumer",
            ["--model", model, "--kv-role", "consumer", "--producer-url", producer.url]
            + engine,
            logs,
            cpu_env(cores=consumer_cores),
        )
        servers.append(consumer)
        cold["consumer"] = start(consumer)
        baseline = ServerProcess.plain_vllm(
            "baseline", [model, *engine], logs, cpu_env(cores=consumer_cores)
        )
        servers.append(baseline)
        cold["baseline (plain vLLM)"] = start(baseline)

        out = sys.stdout
        out.write("\ncold start (spawn to /health 200, one node at a time)\n")
        for name, seconds in cold.items():
            out.write(f"  {name:<24} {seconds:6.1f} s\n")
        per_block = bytes_per_block(model, args.block_size, args.dtype)
        rng = random.Random(0)
        for url in (consumer.url, baseline.url):  # warm both paths once
            stream_tokens(url, [rng.randrange(10, 800) for _ in range(64)], 4)
        header = (
            f"\n{'prompt':>7} {'node':<9} {'TTFT p50':>9} {'E2E p50':>9} "
            f"{'KV B/req':>10} {'expected':>10}\n"
        )
        out.write(
            f"{args.runs} runs each, {args.max_tokens} output tokens, "
            f"{args.dtype}, block {args.block_size}\n" + header
        )
        for length in (int(x) for x in args.lengths.split(",")):
            for name, url in (("pd", consumer.url), ("baseline", baseline.url)):
                ttfts, e2es, moved = [], [], []
                for _ in range(args.runs):
                    prompt = [rng.randrange(10, 800) for _ in range(length)]
                    before = received_bytes(consumer.url)
                    ttft, e2e = stream_tokens(url, prompt, args.max_tokens)
                    after = received_bytes(consumer.url)
                    ttfts.append(ttft)
                    e2es.append(e2e)
                    moved.append(after - before)
                expected = (
                    -(-length // args.block_size) * per_block if name == "pd" else 0
                )
                out.write(
                    f"{length:>7} {name:<9} {statistics.median(ttfts) * 1e3:7.1f}ms "
                    f"{statistics.median(e2es) * 1e3:7.1f}ms "
                    f"{statistics.median(moved):>10.0f} {expected:>10}\n"
                )
        out.flush()
    finally:
        for server in reversed(servers):
            server.stop()


if __name__ == "__main__":
    main()
