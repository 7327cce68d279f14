"""Load with aborts: N streaming completions at concurrency C through a pdserve
consumer, a fraction F of whose clients leave early (while the producer
prefills, before the first token, or mid-stream). Afterwards both nodes must
be idle (no KV block held, no request running or waiting), no response may be
5xx, and every lease must have ended by release, none by expiry.

    .venv/bin/python benchmarks/load_with_aborts.py -n 1000 -c 32 --abort-fraction 0.3
    python benchmarks/load_with_aborts.py --consumer-url URL --producer-url URL

Without URLs it starts a local producer and consumer on the tiny model. Exits
non-zero if a check fails. The functions are importable (the e2e suite runs
``run_load`` with a small N against its own cluster).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

from pdserve.local_cluster import scrape_metrics
from pdserve.settings import default

IDLE_TIMEOUT_SECONDS = 20.0
# Where an aborting client leaves: seconds after sending (the producer may
# still be prefilling), or after this many streamed chunks (0: right after
# the response headers, before the first token).
EARLY_LEAVE_SECONDS = (0.0, 0.2)


@dataclass
class NodeState:
    kv_usage: float
    running: float
    waiting: float

    @property
    def idle(self) -> bool:
        return self.kv_usage == 0 and self.running == 0 and self.waiting == 0


@dataclass
class Outcome:
    status: int | None = None  # None: no response headers (left, or failed)
    chunks: int = 0
    done: bool = False  # the stream ended with [DONE]
    aborted: bool = False
    error: str = ""


@dataclass
class LoadResult:
    requests: int
    concurrency: int
    seconds: float
    outcomes: list[Outcome]
    before: dict[str, NodeState]
    after: dict[str, NodeState]
    counters: dict[str, float] = field(default_factory=dict)

    @property
    def aborts(self) -> int:
        return sum(o.aborted for o in self.outcomes)

    @property
    def server_errors(self) -> int:
        return sum(o.status is not None and o.status >= 500 for o in self.outcomes)

    @property
    def errors(self) -> int:
        """Requests that were not aborted and did not finish normally."""
        return sum(
            not o.aborted and (o.status != 200 or not o.done) for o in self.outcomes
        )

    def problems(self) -> list[str]:
        found = []
        if self.server_errors:
            found.append(f"{self.server_errors} responses were 5xx")
        if self.errors:
            first = next(o for o in self.outcomes if not o.aborted and not o.done)
            found.append(f"{self.errors} requests failed, e.g. {first}")
        for node, state in self.after.items():
            if not state.idle:
                found.append(f"{node} not idle after the load: {state}")
        if self.counters.get("leases_expired"):
            found.append(f"{self.counters['leases_expired']:.0f} leases expired")
        return found


# ---- metrics ----


def node_state(url: str) -> NodeState:
    values = scrape_metrics(url)
    return NodeState(
        kv_usage=values.get("vllm:kv_cache_usage_perc", 0.0),
        running=values.get("vllm:num_requests_running", 0.0),
        waiting=values.get("vllm:num_requests_waiting", 0.0),
    )


def wait_idle(url: str, timeout: float = IDLE_TIMEOUT_SECONDS) -> NodeState:
    deadline = time.monotonic() + timeout
    state = node_state(url)
    while not state.idle and time.monotonic() < deadline:
        time.sleep(0.25)
        state = node_state(url)
    return state


LEASE_COUNTERS = {
    "leases_expired": ("producer", "pdserve:kv_leases_expired_total"),
    "leases_released": ("producer", "pdserve:kv_leases_released_total"),
    "released_by_consumer_http": (
        "consumer",
        "pdserve:leases_released_by_frontend_total",
    ),
    "remote_prefills": ("consumer", "pdserve:remote_prefills_total"),
}


def lease_counters(urls: dict[str, str]) -> dict[str, float]:
    values = {node: scrape_metrics(url) for node, url in urls.items()}
    return {
        name: values[node].get(metric, 0.0)
        for name, (node, metric) in LEASE_COUNTERS.items()
    }


# ---- clients ----


def completion_body(prompt: list[int], max_tokens: int) -> dict:
    return {
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
    }


async def read_stream(
    response: aiohttp.ClientResponse, outcome: Outcome, leave_after: int | None
) -> None:
    async for raw in response.content:
        line = raw.strip()
        if not line.startswith(b"data:"):
            continue
        if line == b"data: [DONE]":
            outcome.done = True
            return
        outcome.chunks += 1
        if leave_after is not None and outcome.chunks >= leave_after:
            return


async def one_request(
    session: aiohttp.ClientSession,
    url: str,
    body: dict,
    leave: float | int | None,
) -> Outcome:
    """One streamed completion. ``leave``: None to read it all, a float to
    leave that many seconds after sending, an int to leave after that many
    chunks."""
    outcome = Outcome(aborted=leave is not None)
    leave_after = leave if isinstance(leave, int) else None

    async def talk() -> None:
        async with session.post(url + "/v1/completions", json=body) as response:
            outcome.status = response.status
            if response.status != 200:
                outcome.error = (await response.text())[:200]
                return
            if leave_after == 0:
                response.close()
                return
            await read_stream(response, outcome, leave_after)
            if leave_after is not None:
                response.close()  # leave mid-stream: drop the connection

    try:
        if isinstance(leave, float):
            await asyncio.wait_for(talk(), timeout=leave)
        else:
            await talk()
    except asyncio.TimeoutError:
        if not isinstance(leave, float):
            outcome.error = "timed out"
    except (aiohttp.ClientError, OSError) as exc:
        outcome.error = f"{type(exc).__name__}: {exc}"
    return outcome


def plan_leaves(
    n: int, abort_fraction: float, max_tokens: int, rng: random.Random
) -> list[float | int | None]:
    """Where each client leaves: None for the clients that stay."""
    leaves: list[float | int | None] = [None] * n
    for index in rng.sample(range(n), round(n * abort_fraction)):
        if rng.random() < 0.3:
            leaves[index] = rng.uniform(*EARLY_LEAVE_SECONDS)
        else:
            leaves[index] = rng.randrange(0, max(1, max_tokens // 2))
    return leaves


def random_prompt(rng: random.Random, max_len: int) -> list[int]:
    # Token ids clear of the tiny tokenizer's special tokens.
    return [rng.randrange(10, 800) for _ in range(rng.randrange(16, max_len))]


async def send_all(
    url: str,
    n: int,
    concurrency: int,
    abort_fraction: float,
    max_tokens: int,
    max_prompt_len: int,
    seed: int,
) -> list[Outcome]:
    rng = random.Random(seed)
    leaves = plan_leaves(n, abort_fraction, max_tokens, rng)
    bodies = [
        completion_body(random_prompt(rng, max_prompt_len), max_tokens)
        for _ in range(n)
    ]
    gate = asyncio.Semaphore(concurrency)
    timeout = aiohttp.ClientTimeout(total=600)
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:

        async def gated(body: dict, leave: float | int | None) -> Outcome:
            async with gate:
                return await one_request(session, url, body, leave)

        pairs = zip(bodies, leaves, strict=True)
        return list(await asyncio.gather(*(gated(b, x) for b, x in pairs)))


def run_load(
    consumer_url: str,
    producer_url: str,
    n: int,
    concurrency: int,
    abort_fraction: float,
    max_tokens: int = 32,
    max_prompt_len: int = 512,
    seed: int = 0,
) -> LoadResult:
    urls = {"producer": producer_url, "consumer": consumer_url}
    before = {node: wait_idle(url) for node, url in urls.items()}
    counters_before = lease_counters(urls)
    start = time.perf_counter()
    outcomes = asyncio.run(
        send_all(
            consumer_url,
            n,
            concurrency,
            abort_fraction,
            max_tokens,
            max_prompt_len,
            seed,
        )
    )
    seconds = time.perf_counter() - start
    after = {node: wait_idle(url) for node, url in urls.items()}
    counters_after = lease_counters(urls)
    counters = {k: counters_after[k] - counters_before[k] for k in counters_after}
    return LoadResult(n, concurrency, seconds, outcomes, before, after, counters)


def table(result: LoadResult) -> str:
    c = result.counters
    rows = [
        ("requests", f"{result.requests}"),
        ("concurrency", f"{result.concurrency}"),
        ("aborted by the client", f"{result.aborts}"),
        ("5xx responses", f"{result.server_errors}"),
        ("errors (not aborted, not finished)", f"{result.errors}"),
        ("completed streams", f"{sum(o.done for o in result.outcomes)}"),
        ("wall time", f"{result.seconds:.1f} s"),
        ("leases granted (consumer: remote prefills)", f"{c['remote_prefills']:.0f}"),
        ("leases released (producer)", f"{c['leases_released']:.0f}"),
        ("leases expired (producer)", f"{c['leases_expired']:.0f}"),
        (
            "release calls by the consumer's HTTP layer",
            f"{c['released_by_consumer_http']:.0f}",
        ),
    ]
    for node in ("producer", "consumer"):
        b, a = result.before[node], result.after[node]
        rows.append((f"{node} KV usage before / after", f"{b.kv_usage} / {a.kv_usage}"))
        rows.append(
            (
                f"{node} running+waiting before / after",
                f"{b.running + b.waiting:.0f} / {a.running + a.waiting:.0f}",
            )
        )
    width = max(len(name) for name, _ in rows)
    lines = [f"| {'':<{width}} | value |", f"|{'-' * (width + 2)}|------:|"]
    lines += [f"| {name:<{width}} | {value} |" for name, value in rows]
    return "\n".join(lines)


# ---- a local cluster when no URLs are given ----


def start_local_cluster(log_dir: Path, lease_seconds: float):
    from pdserve.local_cluster import ServerProcess, cpu_env, split_cores
    from pdserve.tiny_model import ensure_tiny_model

    model = ensure_tiny_model()
    engine = ["--dtype", "float32", "--max-model-len", "2048", "--enforce-eager"]
    producer_cores, consumer_cores = split_cores()
    producer = ServerProcess.pdserve(
        "producer",
        ["--model", model, "--kv-role", "producer", *engine]
        + ["--kv-lease-seconds", str(lease_seconds)],
        log_dir,
        env=cpu_env(cores=producer_cores),
    )
    producer.wait_ready()
    consumer = ServerProcess.pdserve(
        "consumer",
        ["--model", model, "--kv-role", "consumer", "--producer-url", producer.url]
        + engine,
        log_dir,
        env=cpu_env(cores=consumer_cores),
    )
    try:
        consumer.wait_ready()
    except BaseException:
        producer.stop()
        raise
    return producer, consumer


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--consumer-url")
    parser.add_argument("--producer-url")
    parser.add_argument("-n", type=int, default=1000, help="requests")
    parser.add_argument("-c", type=int, default=32, help="concurrency")
    parser.add_argument("--abort-fraction", type=float, default=0.3)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--max-prompt-len", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--lease-seconds",
        type=float,
        default=default("lease_seconds"),
        help="local cluster only: the producer's --kv-lease-seconds",
    )
    args = parser.parse_args()
    if bool(args.consumer_url) != bool(args.producer_url):
        parser.error("give both --consumer-url and --producer-url, or neither")
    return args


def main() -> None:
    args = parse_args()
    servers = []
    if args.consumer_url:
        consumer_url, producer_url = args.consumer_url, args.producer_url
    else:
        log_dir = Path(tempfile.mkdtemp(prefix="pdserve-aborts-"))
        print(f"starting a local producer and consumer (logs in {log_dir})")
        servers = list(start_local_cluster(log_dir, args.lease_seconds))
        producer_url, consumer_url = servers[0].url, servers[1].url
    try:
        result = run_load(
            consumer_url,
            producer_url,
            args.n,
            args.c,
            args.abort_fraction,
            args.max_tokens,
            args.max_prompt_len,
            args.seed,
        )
    finally:
        for server in reversed(servers):
            server.stop()
    print(table(result))
    print(json.dumps({"problems": result.problems()}))
    sys.exit(1 if result.problems() else 0)


if __name__ == "__main__":
    main()
