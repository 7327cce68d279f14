"""PD (producer + consumer) against plain vLLM on this machine's CPU, one
request at a time, hop by hop.

Starts a producer and a consumer (each on its own cores), then, once they
are stopped, a plain-vLLM baseline on the consumer's cores (vLLM's CPU
workers spin: engines sharing a core would time each other). Each setup
warms every prompt length up, then gets the same fresh random prompts, one
request at a time. Per request:
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

# The TTFT hops of a remote prefill in path order, as pdserve's metrics
# name them (``pdserve:ttft_<hop>_seconds``); a run lacking one leaves it
# out. ``http`` is the TTFT the consumer's HTTP layer saw: what it does not
# cover is the client's side; what the hops do not cover of it is the
# consumer's frontend sending the first token out.
PATH_HOPS = (
    "http_in",
    "producer_call",
    "producer_queue",
    "producer_prefill",
    "answer_back",
    "lease_delivery",
    "consumer_admission",
)
# Hops that overlap the path (the request admitted while the producer
# prefills) or follow the first token (the KV pull, the step on it).
OTHER_HOPS = (
    "consumer_frontend_in",
    "consumer_queue",
    "transfer_wait",
    "transfer_copy",
    "first_token",
)
HOPS = (*PATH_HOPS, *OTHER_HOPS, "http")
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


def engine_args(args: argparse.Namespace) -> list[str]:
    engine = ["--dtype", args.dtype, "--max-model-len", "2048", "--enforce-eager"]
    return engine + ["--block-size", str(args.block_size), "--seed", "0"]


def start_pd(args: argparse.Namespace, logs: Path) -> list[ServerProcess]:
    model = ensure_tiny_model()
    producer_cores, consumer_cores = split_cores()
    producer = ServerProcess.pdserve(
        "producer",
        ["--model", model, "--kv-role", "producer", *engine_args(args)],
        logs,
        cpu_env(cores=producer_cores),
    )
    producer.wait_ready()
    consumer = ServerProcess.pdserve(
        "consumer",
        ["--model", model, "--kv-role", "consumer", "--producer-url", producer.url]
        + ALWAYS_REMOTE
        + engine_args(args),
        logs,
        cpu_env(cores=consumer_cores),
    )
    consumer.wait_ready()
    return [producer, consumer]


def start_baseline(args: argparse.Namespace, logs: Path) -> ServerProcess:
    """Plain vLLM on the consumer's cores, alone on the machine (vLLM's CPU
    workers spin: two engines on one core would time each other)."""
    _, consumer_cores = split_cores()
    baseline = ServerProcess.plain_vllm(
        "baseline",
        [ensure_tiny_model(), *engine_args(args)],
        logs,
        cpu_env(cores=consumer_cores),
    )
    baseline.wait_ready()
    return baseline


def prompts(args: argparse.Namespace) -> dict[int, list[list[int]]]:
    """The same fresh prompts for both setups: per length, warm-ups first."""
    rng = random.Random(args.seed)
    return {
        length: [
            [rng.randrange(10, 800) for _ in range(length)]
            for _ in range(WARMUPS + args.runs)
        ]
        for length in (int(x) for x in args.lengths.split(","))
    }


def measure_pd(args, nodes: list[ServerProcess], work: dict) -> dict:
    producer, consumer = nodes
    results = {}
    for length, batch in work.items():
        for tokens in batch[:WARMUPS]:  # every shape warmed up
            stream(consumer.url, tokens, args.max_tokens)
        rows = []
        for tokens in batch[WARMUPS:]:
            row = pd_request(consumer.url, producer.url, tokens, args.max_tokens)
            check_remote(row, length)
            rows.append(row)
        results[length] = rows
    return results


def measure_baseline(args, baseline: ServerProcess, work: dict) -> dict:
    results = {}
    for length, batch in work.items():
        for tokens in batch[:WARMUPS]:
            stream(baseline.url, tokens, args.max_tokens)
        results[length] = [
            stream(baseline.url, tokens, args.max_tokens) for tokens in batch[WARMUPS:]
        ]
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
    out.write("\nPD TTFT hop by hop, p50 ms (the path's hops, then the rest)\n")
    for length, rows in results["pd"].items():
        cells = [f"{h}={p50(rows, h):.2f}" for h in PATH_HOPS if has(rows, h)]
        frontend_out = [
            r.get("http", 0.0) - sum(r.get(h, 0.0) for h in PATH_HOPS) for r in rows
        ]
        client = [r["ttft"] - r.get("http", r["ttft"]) for r in rows]
        cells.append(f"frontend_out={statistics.median(frontend_out) * 1e3:.2f}")
        cells.append(f"client={statistics.median(client) * 1e3:.2f}")
        other = [f"{h}={p50(rows, h):.2f}" for h in OTHER_HOPS if has(rows, h)]
        steps = [statistics.median([r[s] for r in rows]) for s in STEPS]
        first = sum(r["first_token_from_producer"] for r in rows)
        out.write(
            f"{length:>6}: "
            + ", ".join(cells)
            + "\n        off the path: "
            + ", ".join(other)
            + f"\n        engine steps to tokens 1/2: {steps[0]:.0f}/{steps[1]:.0f};"
            f" first token from the producer in {first:.0f} of {len(rows)}\n"
        )
    out.flush()


def has(rows: list[dict], hop: str) -> bool:
    return any(hop in r for r in rows)


def p50(rows: list[dict], hop: str) -> float:
    return statistics.median([r.get(hop, 0.0) for r in rows]) * 1e3


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
    work = prompts(args)
    results = {}
    nodes = start_pd(args, logs)
    try:
        results["pd"] = measure_pd(args, nodes, work)
    finally:
        for node in reversed(nodes):
            node.stop()
    baseline = start_baseline(args, logs)
    try:
        results["baseline"] = measure_baseline(args, baseline, work)
    finally:
        baseline.stop()
    report(results, args)
    if args.out:
        out = Path(args.out)
        out.with_suffix(".json").write_text(json.dumps(results, indent=1))
        plot(results, out.with_suffix(".png"))


if __name__ == "__main__":
    main()
