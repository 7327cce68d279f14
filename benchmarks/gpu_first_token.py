"""The first token from the producer on a GPU (vLLM's V2 model runner), in
one device call per part:

``exact``: a pdserve producer and consumer and a plain vLLM baseline on the
tiny float32 model (all on the box's first GPU, one request at a time):
token ids of greedy, seeded, penalised, bad-words, logprobs and stop-string
requests must equal the baseline's, and every leased request must take the
first-token path (on the V2 runner nothing falls back).

``light``: Qwen2-7B shape (dummy weights, bf16), one request at a time:
plain vLLM alone first, then pdserve 1P1D over ipc, the same prompts; TTFT,
token 1 to 2, end to end, every hop and the consumer's engine steps. The two
pdserve engines share the one GPU (the lent kind): the consumer only steps
empty while the producer prefills, but this is a light-load reading, not a
GPU comparison at the same GPU count (that is the GPU-run issue's).

    python benchmarks/gpu_first_token.py exact|light --model DIR --out DIR
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import urllib.request
from pathlib import Path

from cpu_pd_vs_baseline import PATH_HOPS, STEPS, pd_request, stream
from gpu_e2e import gpu_env

from pdserve.local_cluster import ServerProcess, scrape_metrics

CASES = [
    {"temperature": 0},
    {"temperature": 0, "logprobs": 3},
    {"temperature": 1.0, "seed": 11},
    {"temperature": 1.0, "seed": 12, "top_p": 0.9},
    {"temperature": 0, "frequency_penalty": 0.7, "presence_penalty": 0.3},
    {"temperature": 0, "repetition_penalty": 1.3},
    {"temperature": 0, "min_tokens": 4},
    {"temperature": 0, "max_tokens": 1},
]


def post(url: str, body: dict) -> dict:
    request = urllib.request.Request(
        url + "/v1/completions",
        json.dumps(body).encode(),
        {"content-type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=300) as response:
        return json.loads(response.read())


def start(servers: list[ServerProcess], server: ServerProcess) -> ServerProcess:
    servers.append(server)
    server.wait_ready(420)
    return server


def counters(url: str) -> dict[str, float]:
    metrics = scrape_metrics(url)
    return {
        "from_producer": metrics.get("pdserve:first_tokens_from_producer_total", 0.0),
        "fallbacks": metrics.get("pdserve:first_token_fallbacks_total", 0.0),
        "loads": metrics.get("pdserve:kv_loads_total", 0.0),
    }


def exact(model: str, out: Path) -> bool:
    engine = [
        "--dtype",
        "float32",
        "--max-model-len",
        "2048",
        "--block-size",
        "16",
        "--seed",
        "0",
        "--enforce-eager",
        "--gpu-memory-utilization",
        "0.15",
    ]
    servers: list[ServerProcess] = []
    try:
        producer = start(
            servers,
            ServerProcess.pdserve(
                "producer",
                ["--model", model, "--kv-role", "producer", *engine],
                out,
                gpu_env("0"),
            ),
        )
        consumer = start(
            servers,
            ServerProcess.pdserve(
                "consumer",
                [
                    "--model",
                    model,
                    "--kv-role",
                    "consumer",
                    "--producer-url",
                    producer.url,
                    "--local-prefill-max-tokens",
                    "0",
                    *engine,
                ],
                out,
                gpu_env("0"),
            ),
        )
        baseline = start(
            servers,
            ServerProcess.plain_vllm("baseline", [model, *engine], out, gpu_env("0")),
        )
        runner = [
            line
            for line in consumer.log_path.read_text().splitlines()
            if "Model Runner" in line or "first token from the producer" in line
        ]
        rows, rng = [], random.Random(7)
        before = counters(consumer.url)
        for case in CASES * 3:
            prompt = [
                rng.randrange(10, 800) for _ in range(rng.choice([5, 16, 17, 300]))
            ]
            body = {"prompt": prompt, "max_tokens": 12, "return_token_ids": True} | case
            got, want = post(consumer.url, body), post(baseline.url, body)
            same = got["choices"][0]["token_ids"] == want["choices"][0]["token_ids"]
            same_lp = got["choices"][0].get("logprobs") == want["choices"][0].get(
                "logprobs"
            )
            rows.append(
                {
                    "case": case,
                    "length": len(prompt),
                    "tokens_equal": same,
                    "logprobs_equal": same_lp,
                }
            )
            print(json.dumps(rows[-1]), flush=True)
        after = counters(consumer.url)
        moved = {k: after[k] - before[k] for k in after}
        ok = all(r["tokens_equal"] and r["logprobs_equal"] for r in rows)
        ok = ok and moved["fallbacks"] == 0 and moved["from_producer"] == len(rows)
        result = {"ok": ok, "rows": rows, "counters": moved, "runner": runner}
        (out / "exact.json").write_text(json.dumps(result, indent=1))
        print(json.dumps({"ok": ok, "counters": moved, "runner": runner}), flush=True)
        return ok
    finally:
        for server in servers:
            server.stop()


def light(model: str, out: Path, runs: int, eager: bool) -> None:
    engine = ["--enforce-eager"] if eager else []
    engine += [
        "--dtype",
        "bfloat16",
        "--max-model-len",
        "4096",
        "--load-format",
        "dummy",
        "--seed",
        "0",
        "--gpu-memory-utilization",
        "0.4",
    ]
    rng = random.Random(2026)
    work = {
        n: [[rng.randrange(10, 30000) for _ in range(n)] for _ in range(3 + runs)]
        for n in (128, 2048)
    }
    results: dict = {"baseline": {}, "pd": {}}
    servers: list[ServerProcess] = []
    try:
        baseline = start(
            servers,
            ServerProcess.plain_vllm("baseline", [model, *engine], out, gpu_env("0")),
        )
        for n, prompts in work.items():
            for p in prompts[:3]:
                stream(baseline.url, p, 16)
            results["baseline"][n] = [stream(baseline.url, p, 16) for p in prompts[3:]]
        baseline.stop()
        servers.clear()
        # What a call cut short by its time limit still brings back.
        (out / "light.json").write_text(json.dumps(results, indent=1))
        producer = start(
            servers,
            ServerProcess.pdserve(
                "producer",
                ["--model", model, "--kv-role", "producer", *engine],
                out,
                gpu_env("0"),
            ),
        )
        consumer = start(
            servers,
            ServerProcess.pdserve(
                "consumer",
                [
                    "--model",
                    model,
                    "--kv-role",
                    "consumer",
                    "--producer-url",
                    producer.url,
                    "--local-prefill-max-tokens",
                    "0",
                    *engine,
                ],
                out,
                gpu_env("0"),
            ),
        )
        for n, prompts in work.items():
            for p in prompts[:3]:
                stream(consumer.url, p, 16)
            results["pd"][n] = [
                pd_request(consumer.url, producer.url, p, 16) for p in prompts[3:]
            ]
    finally:
        for server in servers:
            server.stop()
    (out / "light.json").write_text(json.dumps(results, indent=1))
    for n in work:
        for node in ("baseline", "pd"):
            rows = results[node][n]
            med = {
                k: statistics.median(r[k] for r in rows) * 1e3
                for k in ("ttft", "gap12", "e2e")
            }
            print(
                f"{n:>5} {node:<9} TTFT {med['ttft']:.1f} ms, token 1->2 "
                f"{med['gap12']:.1f} ms, end to end {med['e2e']:.1f} ms"
            )
        rows = results["pd"][n]
        hops = {
            h: statistics.median(r.get(h, 0.0) for r in rows) * 1e3
            for h in (*PATH_HOPS, "http", "first_token", "transfer_copy")
        }
        steps = {s: statistics.median(r[s] for r in rows) for s in STEPS}
        first = sum(r["first_token_from_producer"] for r in rows)
        print(
            f"      hops p50 ms {json.dumps({k: round(v, 2) for k, v in hops.items()})}"
            f"\n      steps {steps}; first token from the producer {first}/{len(rows)}"
        )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("part", choices=("exact", "light"))
    parser.add_argument("--model", required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--runs", type=int, default=12)
    parser.add_argument(
        "--eager", action="store_true", help="both sides without CUDA graphs"
    )
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.part == "exact":
        sys.exit(0 if exact(args.model, args.out) else 1)
    light(args.model, args.out, args.runs, args.eager)


if __name__ == "__main__":
    main()
