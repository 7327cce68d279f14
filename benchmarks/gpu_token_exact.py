"""Token-exact check of pdserve on GPUs at TP 1 and TP 2 (lent 2-GPU box).

For each TP size: a pdserve producer and consumer and a plain vLLM baseline,
all on the same two GPUs (lower --gpu-memory-utilization each), serve the
tiny float32 model; greedy tokens of fresh random prompts must equal the
baseline's, every request must load its KV from the producer (one load per
rank), and the bytes moved must be the prompt's blocks x bytes per block,
summed over ranks. Exits non-zero on any mismatch.

    python benchmarks/gpu_token_exact.py --model DIR --out DIR [--tp 1,2]
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from gpu_e2e import gpu_env, own_first

from pdserve.local_cluster import ServerProcess, scrape_by_label, scrape_metrics

MAX_TOKENS = 16
LENGTHS = (1, 15, 16, 17, 83, 700, 2000)
CONCURRENT = 16


def engine_args(utilization: float, tp: int, block_size: int) -> list[str]:
    return [
        "--dtype", "float32", "--max-model-len", "2048",
        "--block-size", str(block_size), "--seed", "0", "--max-num-seqs", "32",
        "--enforce-eager", "--gpu-memory-utilization", str(utilization),
        "--tensor-parallel-size", str(tp),
    ]  # fmt: skip


def random_prompt(length: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(10, 800) for _ in range(length)]


def tokens(url: str, prompt: list[int]) -> list[int]:
    body = {
        "prompt": prompt,
        "max_tokens": MAX_TOKENS,
        "temperature": 0,
        "return_token_ids": True,
    }
    request = urllib.request.Request(
        url + "/v1/completions",
        json.dumps(body).encode(),
        {"content-type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=300) as response:
        return json.loads(response.read())["choices"][0]["token_ids"]


def bytes_per_block(model: str, block_size: int) -> int:
    config = json.loads((Path(model) / "config.json").read_text())
    head_dim = config.get("head_dim") or (
        config["hidden_size"] // config["num_attention_heads"]
    )
    per_token = 2 * config["num_key_value_heads"] * head_dim * 4  # K+V, float32
    return config["num_hidden_layers"] * block_size * per_token


def check_sequential(model, consumer, baseline, tp: int, block: int) -> list[dict]:
    rows = []
    for length in LENGTHS:
        prompt = random_prompt(length, seed=length + 100 * tp)
        before = scrape_metrics(consumer.url)
        expected, got = tokens(baseline.url, prompt), tokens(consumer.url, prompt)
        after = scrape_metrics(consumer.url)
        moved = after.get("pdserve:kv_bytes_received_total", 0) - before.get(
            "pdserve:kv_bytes_received_total", 0
        )
        loads = after.get("pdserve:kv_loads_total", 0) - before.get(
            "pdserve:kv_loads_total", 0
        )
        want_bytes = -(-length // block) * bytes_per_block(model, block)
        rows.append(
            {
                "tp": tp,
                "length": length,
                "tokens_equal": got == expected,
                "loads": loads,
                "loads_ok": loads == tp,
                "bytes": moved,
                "bytes_ok": moved == want_bytes,
                "expected_bytes": want_bytes,
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    return rows


def check_concurrent(consumer, baseline, tp: int) -> dict:
    prompts = [random_prompt(20 + 97 * i, seed=5000 + i + tp) for i in range(16)]
    with ThreadPoolExecutor(CONCURRENT) as pool:
        got = list(pool.map(lambda p: tokens(consumer.url, p), prompts))
    expected = [tokens(baseline.url, p) for p in prompts]
    same = sum(g == e for g, e in zip(got, expected, strict=True))
    result = {"tp": tp, "concurrent": CONCURRENT, "tokens_equal": same}
    print(json.dumps(result), flush=True)
    return result


def pairings_by_transport(url: str) -> dict[str, int]:
    """Producer ranks the consumer at ``url`` paired with, by the transport
    agreed (its ``pdserve:kv_pairings_total``)."""
    found = scrape_by_label(url, "pdserve:kv_pairings_total", "transport")
    return {transport: int(count) for transport, count in found.items() if count}


def start(servers: list[ServerProcess], server: ServerProcess) -> ServerProcess:
    servers.append(server)
    server.wait_ready(300)
    return server


def run_tp(model: str, tp: int, block: int, out: Path) -> dict:
    logs = out / f"logs-tp{tp}"
    logs.mkdir(parents=True, exist_ok=True)
    # TP 1: producer GPU 0, consumer GPU 1 (seeing GPU 0 for ipc), baseline
    # GPU 0. TP 2: every node spans both GPUs.
    visible = (own_first(0), own_first(1), "0") if tp == 1 else ("0,1",) * 3
    engine = engine_args(0.25, tp, block)
    # One at a time: vLLM sizes its KV cache from the free memory it sees,
    # which another engine starting on the same GPU changes under it.
    servers: list[ServerProcess] = []
    try:
        producer = start(servers, ServerProcess.pdserve(
            f"producer-tp{tp}",
            ["--model", model, "--kv-role", "producer", *engine],
            logs, gpu_env(visible[0]),
        ))  # fmt: skip
        consumer = start(servers, ServerProcess.pdserve(
            f"consumer-tp{tp}",
            ["--model", model, "--kv-role", "consumer", "--producer-url", producer.url]
            + engine,
            logs, gpu_env(visible[1]),
        ))  # fmt: skip
        baseline = start(servers, ServerProcess.plain_vllm(
            f"baseline-tp{tp}", [model, *engine], logs, gpu_env(visible[2])
        ))  # fmt: skip
        rows = check_sequential(model, consumer, baseline, tp, block)
        concurrent = check_concurrent(consumer, baseline, tp)
        # Known once the engine reported a step (the pairing came before).
        pairings = pairings_by_transport(consumer.url)
        fallbacks = scrape_metrics(consumer.url).get(
            "pdserve:kv_transport_fallbacks_total", 0
        )
        print(json.dumps({"pairings": pairings, "fallbacks": fallbacks}), flush=True)
        ok = all(r["tokens_equal"] and r["loads_ok"] and r["bytes_ok"] for r in rows)
        ok = ok and concurrent["tokens_equal"] == CONCURRENT
        return {"tp": tp, "ok": ok, "rows": rows, "concurrent": concurrent,
                "pairings": pairings, "transport_fallbacks": fallbacks}  # fmt: skip
    except Exception as exc:
        tails = "\n".join(f"--- {s.name}\n{s.tail(80)}" for s in servers)
        print(f"TP {tp} failed: {exc!r}\n{tails}", flush=True)
        return {"tp": tp, "ok": False, "error": repr(exc)}
    finally:
        for server in servers:
            server.stop()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--tp", default="1,2")
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    results = [
        run_tp(args.model, int(tp), args.block_size, args.out)
        for tp in args.tp.split(",")
    ]
    (args.out / "token_exact.json").write_text(json.dumps(results, indent=1))
    for result in results:
        print(f"TP {result['tp']}: {'OK' if result['ok'] else 'MISMATCH/FAILED'}")
    sys.exit(0 if all(r["ok"] for r in results) else 1)


if __name__ == "__main__":
    main()
