"""PD (producer + consumer) against plain vLLM on this machine's CPU, one
request at a time, hop by hop.

Starts a producer, a consumer and a plain-vLLM baseline (producer on its own
cores, consumer and baseline on the others; the baseline is only used while
the consumer is idle), warms every prompt length up on both, then sends
fresh random prompts to the consumer and the baseline in turn. Per request:
time to first token, the gap between tokens 1 and 2, end to end, and, for
PD, every TTFT hop and the consumer engine steps before tokens 1 and 2 from
the nodes' metrics (scraped before and after each request: requests never
overlap). Every PD request must have been prefilled remotely and have moved
its KV (or been served the producer's first token): otherwise the run stops,
a PD row that is really a local prefill is not a PD row.

Prints p50 and the spread (p10 and p90) per length, writes the raw numbers as
JSON and a PNG plot against plain vLLM.

    .venv/bin/python benchmarks/cpu_pd_vs_baseline.py [--runs 20] \
        [--lengths 128,512,1536] [--out benchmarks/results/cpu_pd_vs_baseline]
"""

from __future__ import annotations

import argparse
import http.client
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import urlparse

from pdserve.local_cluster import ServerProcess, cpu_env, scrape_metrics, split_cores
from pdserve.tiny_model import ensure_tiny_model

# The TTFT hops in path order, as pdserve's metrics name them (each
# ``pdserve:ttft_<hop>_seconds``); those a run lacks are left out.
HOPS = (
    "http_in",
    "producer_call",
    "producer_queue",
    "producer_prefill",
    "answer_back",
    "consumer_frontend_in",
    "consumer_admission",
    "consumer_queue",
    "transfer_wait",
    "transfer_copy",
    "first_token",
    "consumer_frontend_out",
)
STEPS = ("engine_steps_to_first_token", "engine_steps_to_second_token")
# The consumer's flags that pin the remote path (no placement, no saturation).
ALWAYS_REMOTE = [
    "--local-prefill-max-tokens", "0",
    "--producer-saturation-requests", "1000000",
]  # fmt: skip
WARMUPS = 3


def stream(url: str, prompt: list[int], max_tokens: int) -> dict[str, float]:
    """One streamed completion: seconds to tokens 1 and 2 and to the end."""
    parts = urlparse(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=300)
    body = json.dumps(
        {
            "prompt": prompt,
            "max_tokens": max_tokens,
            "temperature": 0,
            "ignore_eos": True,
            "stream": True,
            "return_token_ids": True,
        }
    )
    start = time.perf_counter()
    conn.request("POST", "/v1/completions", body, {"content-type": "application/json"})
    response = conn.getresponse()
    assert response.status == 200, response.read()
    # When each token reached us: a chunk may carry several (vLLM merges a
    # stream's pending tokens when its reader is behind).
    tokens: list[float] = []
    for raw in response:
        line = raw.strip()
        if line.startswith(b"data:") and not line.endswith(b"[DONE]"):
            now = time.perf_counter() - start
            (choice,) = json.loads(line.removeprefix(b"data:"))["choices"]
            tokens += [now] * len(choice.get("token_ids") or ())
    end = time.perf_counter() - start
    conn.close()
    assert len(tokens) == max_tokens, f"{len(tokens)} tokens of {max_tokens}"
    return {"ttft": tokens[0], "gap12": tokens[1] - tokens[0], "e2e": end}


def metrics_of(*urls: str) -> dict[str, float]:
    merged: dict[str, float] = {}
    for url in urls:
        for name, value in scrape_metrics(url).items():
            merged[name] = merged.get(name, 0.0) + value
    return merged


def delta(after: dict[str, float], before: dict[str, float], name: str) -> float:
    return after.get(name, 0.0) - before.get(name, 0.0)


def pd_request(
    consumer: str, producer: str, prompt: list[int], max_tokens: int
) -> dict[str, float]:
    before = metrics_of(consumer, producer)
    timing = stream(consumer, prompt, max_tokens)
    time.sleep(0.05)  # the engine's stats reach /metrics after the request
    after = metrics_of(consumer, producer)
    row = dict(timing)
    for hop in HOPS:
        name = f"pdserve:ttft_{hop}_seconds"
        if delta(after, before, name + "_count"):
            row[hop] = delta(after, before, name + "_sum")
    for steps in STEPS:
        row[steps] = delta(after, before, f"pdserve:{steps}_sum")
    for key, name in (
        ("remote", "pdserve:remote_prefills_total"),
        ("kv_bytes", "pdserve:kv_bytes_received_total"),
        ("first_token_from_producer", "pdserve:first_tokens_from_producer_total"),
    ):
        row[key] = delta(after, before, name)
    return row


def check_remote(row: dict[str, float], length: int) -> None:
    """A PD row must be a remote prefill whose KV moved."""
    if row["remote"] != 1 or row["kv_bytes"] <= 0:
        sys.exit(
            f"PD request of {length} tokens was not served remotely with its KV "
            f"moved: {row}"
        )


def spread(values: list[float]) -> tuple[float, float, float]:
    ordered = sorted(values)
    q = statistics.quantiles(ordered, n=10) if len(ordered) > 1 else ordered * 9
    return q[0], statistics.median(ordered), q[-1]


def start_nodes(args: argparse.Namespace, logs: Path) -> list[ServerProcess]:
    model = ensure_tiny_model()
    engine = ["--dtype", args.dtype, "--max-model-len", "2048", "--enforce-eager"]
    engine += ["--block-size", str(args.block_size), "--seed", "0"]
    producer_cores, consumer_cores = split_cores()
    producer = ServerProcess.pdserve(
        "producer",
        ["--model", model, "--kv-role", "producer", *engine],
        logs,
        cpu_env(cores=producer_cores),
    )
    producer.wait_ready()
    consumer = ServerProcess.pdserve(
        "consumer",
        ["--model", model, "--kv-role", "consumer", "--producer-url", producer.url]
        + ALWAYS_REMOTE
        + engine,
        logs,
        cpu_env(cores=consumer_cores),
    )
    baseline = ServerProcess.plain_vllm(
        "baseline", [model, *engine], logs, cpu_env(cores=consumer_cores)
    )
    consumer.wait_ready()
    baseline.wait_ready()
    return [producer, consumer, baseline]


def measure(args: argparse.Namespace, nodes: list[ServerProcess]) -> dict:
    producer, consumer, baseline = nodes
    rng = random.Random(args.seed)
    lengths = [int(x) for x in args.lengths.split(",")]

    def prompt(length: int) -> list[int]:
        return [rng.randrange(10, 800) for _ in range(length)]

    for length in lengths:  # every shape warmed up on both nodes
        for _ in range(WARMUPS):
            stream(consumer.url, prompt(length), args.max_tokens)
            stream(baseline.url, prompt(length), args.max_tokens)
    results: dict = {"pd": {}, "baseline": {}}
    for length in lengths:
        pd_rows, base_rows = [], []
        for run in range(args.runs):
            tokens = prompt(length)
            order = ("pd", "baseline") if run % 2 == 0 else ("baseline", "pd")
            for node in order:
                if node == "pd":
                    row = pd_request(
                        consumer.url, producer.url, tokens, args.max_tokens
                    )
                    check_remote(row, length)
                    pd_rows.append(row)
                else:
                    base_rows.append(stream(baseline.url, tokens, args.max_tokens))
        results["pd"][length] = pd_rows
        results["baseline"][length] = base_rows
    return results


def ms(value: float) -> str:
    return f"{value * 1e3:7.1f}"


def report(results: dict, args: argparse.Namespace, out=sys.stdout) -> None:
    out.write(
        f"\n{args.runs} runs per length, {args.max_tokens} output tokens, "
        f"{args.dtype}, block {args.block_size}; ms as p10 / p50 / p90\n\n"
        f"{'prompt':>6} {'node':<9} {'TTFT':>23} {'token 1->2':>23} "
        f"{'end to end':>23}\n"
    )
    for length in results["pd"]:
        for node in ("pd", "baseline"):
            rows = results[node][length]
            cells = [
                " / ".join(ms(v) for v in spread([r[k] for r in rows]))
                for k in ("ttft", "gap12", "e2e")
            ]
            out.write(f"{length:>6} {node:<9} " + " ".join(cells) + "\n")
    out.write("\nPD TTFT hop by hop (p50 ms) and consumer engine steps (p50)\n")
    for length, rows in results["pd"].items():
        hops = [h for h in HOPS if any(h in r for r in rows)]
        named = [statistics.median([r.get(h, 0.0) for r in rows]) for h in hops]
        rest = statistics.median(
            [r["ttft"] - sum(r.get(h, 0.0) for h in hops) for r in rows]
        )
        cells = [f"{h}={v * 1e3:.2f}" for h, v in zip(hops, named, strict=True)]
        cells.append(f"unattributed={rest * 1e3:.2f}")
        steps = [statistics.median([r[s] for r in rows]) for s in STEPS]
        first = sum(r["first_token_from_producer"] for r in rows)
        out.write(
            f"{length:>6}: " + ", ".join(cells) + f"\n        steps to tokens 1/2: "
            f"{steps[0]:.0f}/{steps[1]:.0f}; first token from the producer in "
            f"{first:.0f} of {len(rows)}\n"
        )
    out.flush()


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lengths = list(results["pd"])
    fig, axes = plt.subplots(1, 3, figsize=(13, 4))
    for ax, key, title in zip(
        axes,
        ("ttft", "gap12", "e2e"),
        ("time to first token", "token 1 to token 2", "end to end"),
        strict=True,
    ):
        for node, label in (("pd", "pdserve 1P1D"), ("baseline", "plain vLLM")):
            lows, mids, highs = zip(
                *(spread([r[key] for r in results[node][n]]) for n in lengths),
                strict=True,
            )
            mids_ms = [m * 1e3 for m in mids]
            ax.errorbar(
                lengths,
                mids_ms,
                yerr=[
                    [m - lo * 1e3 for m, lo in zip(mids_ms, lows, strict=True)],
                    [hi * 1e3 - m for m, hi in zip(mids_ms, highs, strict=True)],
                ],
                marker="o",
                capsize=3,
                label=label,
            )
        ax.set_title(title + " (p50, p10-p90)")
        ax.set_xlabel("prompt tokens")
        ax.set_ylabel("ms")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--block-size", type=int, default=128)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--lengths", default="128,512,1536")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--out", default="", help="write OUT.json (raw) and OUT.png (plot)"
    )
    args = parser.parse_args()
    logs = Path(tempfile.mkdtemp(prefix="pdserve-bench-"))
    nodes = start_nodes(args, logs)
    try:
        results = measure(args, nodes)
    finally:
        for node in reversed(nodes):
            node.stop()
    report(results, args)
    if args.out:
        out = Path(args.out)
        out.with_suffix(".json").write_text(json.dumps(results, indent=1))
        plot(results, out.with_suffix(".png"))


if __name__ == "__main__":
    main()
