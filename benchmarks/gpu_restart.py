"""A restarted producer is a new producer, on GPUs, per transport.

For each transport (ipc, nccl): a pdserve producer (GPU 0) and consumer
(GPU 1) and a plain vLLM baseline serve the tiny float32 model. Greedy tokens
must equal the baseline's and be prefilled remotely; then the producer is
killed with SIGKILL while 16 requests are in flight (their pulls mid-way),
restarted on the same HTTP and KV ports, and every answer before, during and
after must still equal the baseline's; after the restart the consumer must
prefill remotely again (within 10 s), pair with the new instance over the
same transport, and no pull may fail once it did. Exits non-zero otherwise.

    python benchmarks/gpu_restart.py --model DIR --out DIR [--transports ipc,nccl]
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

from pdserve.local_cluster import ServerProcess, free_port, scrape_metrics

# Each node sees its own GPU first; ipc also needs to see the other one.
# (NCCL needs two GPUs: a pair on one GPU is refused by NCCL itself.)
VISIBLE = {
    "ipc": (own_first(0), own_first(1)),
    "tcp": (own_first(0), own_first(1)),
    "nccl": ("0", "1"),
}


def counters(url: str) -> dict[str, float]:
    metrics = scrape_metrics(url)
    names = {
        "remote": "pdserve:remote_prefills_total",
        "local": "pdserve:local_prefills_total",
        "loads": "pdserve:kv_loads_total",
        "failures": "pdserve:kv_load_failures_total",
    }
    return {short: metrics.get(name, 0) for short, name in names.items()}


def delta(after: dict, before: dict) -> dict:
    return {k: after[k] - before[k] for k in after}


def producer_server(model, logs, transport, port, kv_port, name) -> ServerProcess:
    args = ["--model", model, "--kv-role", "producer", "--kv-port", str(kv_port)]
    return ServerProcess.pdserve(
        name, args + engine_args(0.3, 1, 16), logs, gpu_env(VISIBLE[transport][0]),
        port=port,
    )  # fmt: skip


def check(label: str, prompts, consumer, baseline, results: list) -> bool:
    before = counters(consumer.url)
    with ThreadPoolExecutor(16) as pool:
        got = list(pool.map(lambda p: tokens(consumer.url, p), prompts))
    want = [tokens(baseline.url, p) for p in prompts]
    row = {
        "phase": label,
        "requests": len(prompts),
        "tokens_equal": sum(g == w for g, w in zip(got, want, strict=True)),
        **delta(counters(consumer.url), before),
    }
    results.append(row)
    print(json.dumps(row), flush=True)
    return row["tokens_equal"] == len(prompts)


def run(model: str, transport: str, out: Path) -> dict:
    logs = out / f"logs-{transport}"
    logs.mkdir(parents=True, exist_ok=True)
    port, kv_port = free_port(), free_port()
    servers: dict[str, ServerProcess] = {}
    results: list[dict] = []
    try:
        servers["producer"] = producer_server(
            model, logs, transport, port, kv_port, "producer"
        )
        servers["producer"].wait_ready(300)
        servers["consumer"] = ServerProcess.pdserve(
            "consumer",
            ["--model", model, "--kv-role", "consumer", "--kv-transport", transport,
             "--producer-url", servers["producer"].url, *engine_args(0.3, 1, 16)],
            logs, gpu_env(VISIBLE[transport][1]),
        )  # fmt: skip
        servers["consumer"].wait_ready(300)
        servers["baseline"] = ServerProcess.plain_vllm(
            "baseline", [model, *engine_args(0.2, 1, 16)], logs, gpu_env("0")
        )
        servers["baseline"].wait_ready(300)
        consumer, baseline = servers["consumer"], servers["baseline"]
        ok = check(
            "before", [random_prompt(50 + 97 * i, 100 + i) for i in range(16)],
            consumer, baseline, results,
        )  # fmt: skip
        ok &= results[-1]["remote"] == 16 and results[-1]["loads"] == 16

        # Kill the producer while 16 requests are being prefilled and pulled.
        mid = [random_prompt(1500 + i, 300 + i) for i in range(16)]
        with ThreadPoolExecutor(16) as pool:
            futures = [pool.submit(tokens, consumer.url, p) for p in mid]
            time.sleep(0.15)
            os.killpg(servers["producer"].process.pid, signal.SIGKILL)
            got = [f.result() for f in futures]
        want = [tokens(baseline.url, p) for p in mid]
        equal = sum(g == w for g, w in zip(got, want, strict=True))
        killed = {"phase": "producer killed mid-load", "tokens_equal": equal}
        results.append(killed)
        print(json.dumps(killed), flush=True)
        ok &= equal == len(mid)
        servers["producer"].process.wait()

        servers["producer"] = producer_server(
            model, logs, transport, port, kv_port, "producer-restarted"
        )
        servers["producer"].wait_ready(300)
        deadline = time.monotonic() + 10
        before = counters(consumer.url)
        while counters(consumer.url)["remote"] == before["remote"]:
            if time.monotonic() > deadline:
                raise RuntimeError("consumer did not use the restarted producer")
            tokens(consumer.url, random_prompt(40, int(time.time() * 1e3) % 10**6))
            time.sleep(0.2)
        ok &= check(
            "after restart", [random_prompt(60 + 89 * i, 700 + i) for i in range(16)],
            consumer, baseline, results,
        )  # fmt: skip
        after = results[-1]
        ok &= after["remote"] == 16 and after["loads"] == 16
        ok &= after["failures"] == 0
        log = consumer.log_path.read_text()
        changed = [
            line
            for line in log.splitlines()
            if "instance changed" in line or "is gone" in line
        ]
        # The first instance and the new one, both over the transport asked for.
        pairings = pairings_by_transport(consumer.url)
        print("\n".join(changed), json.dumps({"pairings": pairings}), flush=True)
        ok &= len(changed) >= 1 and pairings == {transport: 2}
        ok &= consumer.process.poll() is None
        return {"transport": transport, "ok": bool(ok), "phases": results,
                "pairings": pairings, "changed": changed}  # fmt: skip
    except Exception as exc:
        tails = "\n".join(f"--- {n}\n{s.tail(60)}" for n, s in servers.items())
        print(f"{transport} failed: {exc!r}\n{tails}", flush=True)
        return {"transport": transport, "ok": False, "error": repr(exc)}
    finally:
        for server in servers.values():
            server.stop()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--transports", default="ipc,nccl")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    results = [run(args.model, t, args.out) for t in args.transports.split(",")]
    (args.out / "restart.json").write_text(json.dumps(results, indent=1))
    for result in results:
        print(f"{result['transport']}: {'OK' if result['ok'] else 'FAILED'}")
    sys.exit(0 if all(r["ok"] for r in results) else 1)


if __name__ == "__main__":
    main()
