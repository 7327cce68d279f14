"""Prefill placement on GPUs (vLLM as installed there): does the consumer
render prompts and follow its prefix cache through vLLM's KV events?

A producer and a consumer with ``--local-prefill-max-tokens 40`` serve the
tiny float32 model, beside a plain vLLM baseline. A 30-token prompt must be
prefilled locally (``short_prompt``); a 224-token prompt remotely; the same
prompt plus 10 tokens locally (``prefix_cached``, within 30 s: the events
reach the index), all token-exact. Exits non-zero otherwise; prints what it
saw (on a vLLM without the renderer pdserve uses, every prompt is remote).

    python benchmarks/gpu_placement.py --model DIR --out DIR
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from gpu_e2e import gpu_env, own_first
from gpu_token_exact import engine_args, random_prompt, tokens

from pdserve.local_cluster import ServerProcess, scrape_by_label, scrape_metrics


def local(url: str) -> dict[str, float]:
    """Local prefills by reason."""
    return scrape_by_label(url, "pdserve:local_prefills_total", "reason")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    logs = args.out / "logs-placement"
    logs.mkdir(parents=True, exist_ok=True)
    servers: dict[str, ServerProcess] = {}
    rows: list[dict] = []
    ok = True
    try:
        servers["producer"] = ServerProcess.pdserve(
            "producer",
            ["--model", args.model, "--kv-role", "producer", *engine_args(0.2, 1, 16)],
            logs, gpu_env(own_first(0)),
        )  # fmt: skip
        servers["producer"].wait_ready(300)
        servers["consumer"] = ServerProcess.pdserve(
            "consumer",
            ["--model", args.model, "--kv-role", "consumer",
             "--producer-url", servers["producer"].url,
             "--local-prefill-max-tokens", "40", *engine_args(0.2, 1, 16)],
            logs, gpu_env(own_first(1)),
        )  # fmt: skip
        servers["consumer"].wait_ready(300)
        servers["baseline"] = ServerProcess.plain_vllm(
            "baseline", [args.model, *engine_args(0.2, 1, 16)], logs, gpu_env("0")
        )
        servers["baseline"].wait_ready(300)
        consumer, baseline = servers["consumer"].url, servers["baseline"].url

        def check(label: str, prompt: list[int], reason: str | None) -> bool:
            before = local(consumer)
            remote = scrape_metrics(consumer).get("pdserve:remote_prefills_total", 0)
            equal = tokens(consumer, prompt) == tokens(baseline, prompt)
            after = local(consumer)
            moved = {
                k: v - before.get(k, 0)
                for k, v in after.items()
                if v != before.get(k, 0)
            }
            went_remote = (
                scrape_metrics(consumer).get("pdserve:remote_prefills_total", 0)
                - remote
            )
            rows.append(
                {
                    "case": label,
                    "tokens_equal": equal,
                    "local": moved,
                    "remote": went_remote,
                }
            )
            print(json.dumps(rows[-1]), flush=True)
            placed = moved == {reason: 1} if reason else went_remote == 1
            return equal and placed

        ok &= check("30 tokens", random_prompt(30, 1), "short_prompt")
        long = random_prompt(224, 2)
        ok &= check("224 tokens", long, None)
        again = long + random_prompt(10, 3)
        deadline = time.monotonic() + 30
        while not check("same 224 + 10 tokens", again, "prefix_cached"):
            if time.monotonic() > deadline:
                ok = False
                break
            time.sleep(0.5)
    except Exception as exc:
        tails = "\n".join(f"--- {n}\n{s.tail(40)}" for n, s in servers.items())
        print(f"placement failed: {exc!r}\n{tails}", flush=True)
        ok = False
    finally:
        for server in servers.values():
            server.stop()
    (args.out / "placement.json").write_text(json.dumps({"ok": ok, "rows": rows}))
    print("placement:", "OK" if ok else "FAILED")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
