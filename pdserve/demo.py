"""Local demo: a producer and a consumer on this machine's CPU, serving an
embedded tiny model built offline, and one request through them.

    python -m pdserve.demo [--prompt TEXT] [--max-tokens N] [--keep-running]

Prints the answer and where the time to first token went.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from pdserve.local_cluster import ServerProcess, cpu_env, scrape_metrics, split_cores
from pdserve.tiny_model import ensure_tiny_model

ENGINE_ARGS = ["--dtype", "float32", "--max-model-len", "2048", "--enforce-eager"]


def timed_stream(
    url: str, prompt: str | list[int], max_tokens: int, **extra: object
) -> tuple[str, float, float]:
    """Answer text, seconds to first token, seconds to the last."""
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0}
    body.update(extra, stream=True)
    request = urllib.request.Request(
        url + "/v1/completions",
        data=json.dumps(body).encode(),
        headers={"content-type": "application/json"},
    )
    start = time.perf_counter()
    first = None
    text = ""
    with urllib.request.urlopen(request, timeout=300) as response:
        for raw in response:
            line = raw.strip()
            if not line.startswith(b"data:") or line.endswith(b"[DONE]"):
                continue
            chunk = json.loads(line.removeprefix(b"data:"))
            text += chunk["choices"][0].get("text", "")
            if first is None:
                first = time.perf_counter() - start
    return text, first or 0.0, time.perf_counter() - start


# The TTFT hops of a remote prefill in path order, as pdserve's metrics
# name them (pdserve:ttft_<hop>_seconds).
PATH_HOPS = (
    ("http_in", "consumer HTTP layer (placement, tokens)"),
    ("producer_call", "call to the producer (HTTP, its frontend)"),
    ("producer_queue", "producer queue"),
    ("producer_prefill", "producer prefill"),
    ("answer_back", "the lease back to the consumer"),
    ("lease_delivery", "the lease to the consumer's engine"),
    ("consumer_admission", "admission, the producer's token out"),
)


def report(consumer: str, prompt: str, max_tokens: int, out=sys.stdout) -> None:
    before = scrape_metrics(consumer)
    text, ttft, total = timed_stream(consumer, prompt, max_tokens)
    time.sleep(0.1)  # the engine's stats reach /metrics just after the answer
    after = scrape_metrics(consumer)

    def moved(name: str) -> float:
        return after.get(name, 0.0) - before.get(name, 0.0)

    out.write(f"\nprompt: {prompt!r}\nanswer: {text!r}\n\n")
    out.write("time to first token, hop by hop (this request):\n")
    named = 0.0
    for hop, label in PATH_HOPS:
        seconds = moved(f"pdserve:ttft_{hop}_seconds_sum")
        named += seconds
        out.write(f"  {label:<44} {seconds * 1000:8.1f} ms\n")
    http = moved("pdserve:ttft_http_seconds_sum")
    rows = [
        ("the consumer's frontend sending it", max(0.0, http - named)),
        ("time to first token (at the client)", ttft),
        (
            "token 1 to token 2 (the KV pull lies here)",
            moved("pdserve:second_token_seconds_sum"),
        ),
        (f"end to end ({max_tokens} tokens)", total),
    ]
    for label, seconds in rows:
        out.write(f"  {label:<44} {seconds * 1000:8.1f} ms\n")
    first = moved("pdserve:first_tokens_from_producer_total")
    steps = [
        moved(f"pdserve:engine_steps_to_{n}_token_sum") for n in ("first", "second")
    ]
    out.write(
        f"  {'first token from the producer':<44} {'yes' if first else 'no':>8}\n"
        f"  {'consumer engine steps to tokens 1 / 2':<44} "
        f"{steps[0]:>4.0f} / {steps[1]:.0f}\n"
        f"  {'KV bytes pulled':<44} {moved('pdserve:kv_bytes_received_total'):8.0f} B\n"
    )
    out.flush()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompt", default="The weather on the coast this week is")
    parser.add_argument("--max-tokens", type=int, default=24)
    parser.add_argument("--keep-running", action="store_true")
    args = parser.parse_args()

    model = ensure_tiny_model()
    log_dir = Path(tempfile.mkdtemp(prefix="pdserve-demo-"))
    sys.stdout.write(f"tiny model: {model}\nserver logs: {log_dir}\n")
    producer_cores, consumer_cores = split_cores()
    producer = ServerProcess.pdserve(
        "producer",
        ["--model", model, "--kv-role", "producer", *ENGINE_ARGS],
        log_dir,
        cpu_env(cores=producer_cores),
    )
    # The demo shows the remote path: its short prompt would otherwise be
    # prefilled on the consumer (placement), which is cheaper.
    consumer_args = ["--model", model, "--kv-role", "consumer"]
    consumer_args += ["--local-prefill-max-tokens", "0"]
    consumer_args += ["--producer-saturation-requests", "1000000"]
    consumer_args += ["--producer-url", producer.url, *ENGINE_ARGS]
    consumer = ServerProcess.pdserve(
        "consumer", consumer_args, log_dir, cpu_env(cores=consumer_cores)
    )
    try:
        start = time.perf_counter()
        for server in (producer, consumer):
            server.wait_ready()
            sys.stdout.write(
                f"{server.name} ready at {server.url} "
                f"({time.perf_counter() - start:.0f} s after start)\n"
            )
        report(consumer.url, args.prompt, args.max_tokens)
        if args.keep_running:
            sys.stdout.write(f"\nconsumer serving at {consumer.url}; Ctrl-C stops\n")
            while True:
                time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        consumer.stop()
        producer.stop()


if __name__ == "__main__":
    main()
