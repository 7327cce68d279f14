"""Two producers, one consumer (2P1D) on GPUs: routing, failover, return.

Two pdserve producers, a consumer listing both (``--producer-url A,B``) and a
plain vLLM baseline serve the tiny float32 model. Prompts are chosen by the
consumer's own ranking so that half go to each producer: greedy tokens must
equal the baseline's, every one prefilled remotely by the producer chosen.
Then producer B is killed with SIGKILL under load (answers still equal, the
consumer fails over to A), restarted on the same ports, and must be used
again within 10 s, paired over the same transport. Exits non-zero otherwise.
On a one-GPU box all four engines share GPU 0 (correctness only: nothing
here is timed).

    python benchmarks/gpu_xpyd.py --model DIR --out DIR [--transport ipc]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from gpu_e2e import gpu_env, own_first
from gpu_token_exact import engine_args, pairings_by_transport, random_prompt, tokens

from pdserve.frontend.prefill_demand import demand_of
from pdserve.frontend.producer_pool import rendezvous
from pdserve.local_cluster import (
    ServerProcess,
    free_port,
    scrape_by_label,
    scrape_metrics,
)


def key(server: ServerProcess) -> str:
    return server.url.removeprefix("http://")


def prompts_for(first: str, other: str, count: int, seed: int) -> list[list[int]]:
    """Prompts whose prefix ranks producer ``first`` before ``other``."""
    found = []
    while len(found) < count:
        seed += 1
        prompt = random_prompt(50 + seed % 400, seed)
        affinity = demand_of({"prompt": prompt}).affinity_key
        if rendezvous(affinity, first) < rendezvous(affinity, other):
            found.append(prompt)
    return found


def served(consumer: ServerProcess) -> dict[str, float]:
    """Remote prefills by producer (ADDRESS:PORT), as the consumer counts them."""
    return scrape_by_label(consumer.url, "pdserve:remote_prefills_total", "producer")


def counter(url: str, name: str) -> float:
    return scrape_metrics(url).get(name, 0)


def producer(model, logs, name, port, kv_port) -> ServerProcess:
    args = ["--model", model, "--kv-role", "producer", "--kv-port", str(kv_port)]
    return ServerProcess.pdserve(
        name, args + engine_args(0.15, 1, 16), logs, gpu_env(own_first(0)), port=port
    )


def answer_all(consumer, baseline, prompts) -> int:
    with ThreadPoolExecutor(16) as pool:
        got = list(pool.map(lambda p: tokens(consumer.url, p), prompts))
    want = [tokens(baseline.url, p) for p in prompts]
    return sum(g == w for g, w in zip(got, want, strict=True))


def run(model: str, transport: str, out: Path) -> dict:
    logs = out / "logs-xpyd"
    logs.mkdir(parents=True, exist_ok=True)
    ports = {n: (free_port(), free_port()) for n in "AB"}
    servers: dict[str, ServerProcess] = {}
    phases: list[dict] = []
    ok = True

    def phase(label: str, **row) -> None:
        nonlocal ok
        phases.append({"phase": label, **row})
        print(json.dumps(phases[-1]), flush=True)

    try:
        # One after another: engines starting at once on one GPU can
        # mis-size their KV caches.
        for n in "AB":
            servers[n] = producer(model, logs, f"producer-{n}", *ports[n])
            servers[n].wait_ready(300)
        servers["consumer"] = ServerProcess.pdserve(
            "consumer",
            ["--model", model, "--kv-role", "consumer", "--kv-transport", transport,
             "--producer-url", f"{servers['A'].url},{servers['B'].url}",
             *engine_args(0.15, 1, 16)],
            logs, gpu_env(own_first(1)),
        )  # fmt: skip
        servers["consumer"].wait_ready(300)
        servers["baseline"] = ServerProcess.plain_vllm(
            "baseline", [model, *engine_args(0.15, 1, 16)], logs, gpu_env("0")
        )
        servers["baseline"].wait_ready(300)
        consumer, baseline = servers["consumer"], servers["baseline"]
        a, b = key(servers["A"]), key(servers["B"])

        prompts = prompts_for(a, b, 8, 1000) + prompts_for(b, a, 8, 2000)
        before = served(consumer)
        equal = answer_all(consumer, baseline, prompts)
        after = served(consumer)
        routed = {k: after.get(k, 0) - before.get(k, 0) for k in (a, b)}
        phase("routed", tokens_equal=equal, requests=16, served=routed)
        ok &= equal == 16 and routed == {a: 8, b: 8}

        load = prompts_for(a, b, 8, 3000) + prompts_for(b, a, 8, 4000)
        with ThreadPoolExecutor(16) as pool:
            futures = [pool.submit(tokens, consumer.url, p) for p in load]
            time.sleep(0.15)
            os.killpg(servers["B"].process.pid, signal.SIGKILL)
            got = [f.result() for f in futures]
        servers["B"].process.wait()
        want = [tokens(baseline.url, p) for p in load]
        equal = sum(g == w for g, w in zip(got, want, strict=True))
        failovers = counter(consumer.url, "pdserve:producer_failovers_total")
        phase("B killed under load", tokens_equal=equal, failovers=failovers)
        ok &= equal == 16

        later = prompts_for(b, a, 8, 5000)
        before = served(consumer)
        equal = answer_all(consumer, baseline, later)
        after = served(consumer)
        routed = {k: after.get(k, 0) - before.get(k, 0) for k in (a, b)}
        failovers = counter(consumer.url, "pdserve:producer_failovers_total")
        phase("B down", tokens_equal=equal, served=routed, failovers=failovers)
        ok &= equal == 8 and routed == {a: 8, b: 0} and failovers >= 1

        servers["B"] = producer(model, logs, "producer-B-restarted", *ports["B"])
        servers["B"].wait_ready(300)
        up_at = time.monotonic()
        back = prompts_for(b, a, 1, 6000)[0]
        while served(consumer).get(b, 0) == after.get(b, 0):
            if time.monotonic() - up_at > 10:
                raise RuntimeError("the consumer did not use B again within 10 s")
            tokens(consumer.url, back)
            time.sleep(0.2)
        phase("B back", seconds=round(time.monotonic() - up_at, 1))
        again = prompts_for(b, a, 8, 7000)
        before = served(consumer)
        equal = answer_all(consumer, baseline, again)
        after = served(consumer)
        routed = {k: after.get(k, 0) - before.get(k, 0) for k in (a, b)}
        phase("B restarted", tokens_equal=equal, served=routed)
        ok &= equal == 8 and routed == {a: 0, b: 8}

        # A, B and B's new instance, each over the transport asked for.
        pairings = pairings_by_transport(consumer.url)
        phase("pairings", by_transport=pairings)
        ok &= pairings == {transport: 3}
        ok &= consumer.process.poll() is None
        return {"ok": bool(ok), "phases": phases, "pairings": pairings}
    except Exception as exc:
        tails = "\n".join(f"--- {n}\n{s.tail(60)}" for n, s in servers.items())
        print(f"xpyd failed: {exc!r}\n{tails}", flush=True)
        return {"ok": False, "phases": phases, "error": repr(exc)}
    finally:
        for server in servers.values():
            server.stop()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--transport", default="ipc")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    result = run(args.model, args.transport, args.out)
    (args.out / "xpyd.json").write_text(json.dumps(result, indent=1))
    print("xpyd:", "OK" if result["ok"] else "FAILED")
    sys.exit(0 if result["ok"] else 1)


if __name__ == "__main__":
    main()
