"""KV transport micro-benchmark on one host with two GPUs.

A producer process (GPU 0) and a consumer process (GPU 1) each hold a paged
KV cache shaped like Qwen2-7B's (28 layers, 4 KV heads, head dim 128, bf16,
block 16) in a large block pool. The consumer reads 512-, 2048- and
8192-token prompts' blocks, scattered at random in the producer's pool, into
scattered blocks of its own, through pdserve's real side channel and each
transport. Bytes are checked, and the GPU0->GPU1 peer copy peak is measured
in the same run for reference.

    python benchmarks/transport_microbench.py [--transports tcp,ipc,nccl]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time

import torch
import torch.multiprocessing as mp

from pdserve.connector.kv_client import ProducerRankClient
from pdserve.connector.kv_server import KVServer
from pdserve.connector.leases import LeaseTable
from pdserve.kv_cache import PagedKVCache
from pdserve.protocol import RankInfo
from pdserve.transport import device_uuid, get_transport, host_identity

LAYERS, KV_HEADS, HEAD_DIM, BLOCK = 28, 4, 128, 16
PROMPTS = (512, 2048, 8192)
TOKEN = "bench-token"


def make_kv(device: torch.device, num_blocks: int, fill: bool) -> PagedKVCache:
    shape = (2, num_blocks, BLOCK, KV_HEADS, HEAD_DIM)
    caches = {}
    for i in range(LAYERS):
        tensor = torch.empty(shape, dtype=torch.bfloat16, device=device)
        if fill:
            tensor.normal_()
        else:
            tensor.zero_()
        caches[f"model.layers.{i}.self_attn.attn"] = tensor
    return PagedKVCache(caches, num_blocks)


def rank_info(kv: PagedKVCache) -> RankInfo:
    return RankInfo(
        pdserve_version="bench",
        protocol_version=1,
        vllm_version="none",
        model="qwen2-7b-shape",
        dtype="bfloat16",
        tp_size=1,
        tp_rank=0,
        block_size=BLOCK,
        num_blocks=kv.num_blocks,
        layers=kv.layer_infos(),
        transports=["tcp", "ipc", "nccl"],
        device="cuda",
        device_uuid=device_uuid(kv.device),
        host_id=host_identity(),
    )


def fingerprint(kv: PagedKVCache, block_ids: list[int]) -> list[int]:
    index = kv.index(block_ids)
    return [
        int(kv.gather(layer, index).view(torch.int16).to(torch.int64).sum())
        for layer in (0, LAYERS // 2, LAYERS - 1)
    ]


def producer(to_consumer, from_consumer, num_blocks: int) -> None:
    device = torch.device("cuda", 0)
    torch.cuda.set_device(device)
    kv = make_kv(device, num_blocks, fill=True)
    leases = LeaseTable(lease_seconds=3600)
    transports = {name: get_transport(name) for name in ("tcp", "ipc", "nccl")}
    server = KVServer("127.0.0.1", 0, kv, rank_info(kv), leases, transports)
    rng = random.Random(0)
    plan = {}
    for tokens in PROMPTS:
        ids = rng.sample(range(num_blocks), tokens // BLOCK)
        leases.grant(f"prompt-{tokens}", ids, TOKEN)
        plan[tokens] = (ids, fingerprint(kv, ids))
    torch.cuda.synchronize()
    to_consumer.put((server.port, plan))
    from_consumer.get()
    server.close()


def peer_copy_gbps(nbytes: int = 1 << 30, repeats: int = 20) -> float:
    source = torch.empty(nbytes, dtype=torch.uint8, device="cuda:0")
    target = torch.empty(nbytes, dtype=torch.uint8, device="cuda:1")
    target.copy_(source)
    torch.cuda.synchronize(0)
    torch.cuda.synchronize(1)
    start = time.perf_counter()
    for _ in range(repeats):
        target.copy_(source, non_blocking=True)
    torch.cuda.synchronize(0)
    torch.cuda.synchronize(1)
    return nbytes * repeats / (time.perf_counter() - start) / 1e9


def consumer(from_producer, to_producer, results, names, repeats, num_blocks) -> None:
    device = torch.device("cuda", 1)
    torch.cuda.set_device(device)
    kv = make_kv(device, num_blocks, fill=False)
    port, plan = from_producer.get()
    client = ProducerRankClient("127.0.0.1", port, timeout=120)
    remote = client.rank_info()
    rows = [{"transport": "peer copy (1 GiB, GPU0->GPU1)", "gbps": peer_copy_gbps()}]
    rng = random.Random(1)
    for name in names:
        transport = get_transport(name)
        session = transport.open_session(client, kv, remote)
        for tokens, (remote_ids, expected) in plan.items():
            local_ids = rng.sample(range(num_blocks), len(remote_ids))
            times = []
            for attempt in range(repeats + 2):
                torch.cuda.synchronize(device)
                start = time.perf_counter()
                nbytes = client.read(
                    transport, kv, f"prompt-{tokens}", TOKEN, remote_ids, local_ids,
                    session,
                )  # fmt: skip
                torch.cuda.synchronize(device)
                if attempt >= 2:  # the first reads set up communicators
                    times.append(time.perf_counter() - start)
            assert fingerprint(kv, local_ids) == expected, f"{name} corrupted blocks"
            for layer in kv.layers:
                layer.index_fill_(1, kv.index(local_ids), 0)
            seconds = statistics.median(times)
            rows.append(
                {
                    "transport": name,
                    "tokens": tokens,
                    "blocks": len(remote_ids),
                    "mbytes": nbytes / 1e6,
                    "ms": seconds * 1e3,
                    "gbps": nbytes / seconds / 1e9,
                }
            )
    results.put(rows)
    to_producer.put("done")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--transports", default="ipc,nccl,tcp")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--pool-blocks", type=int, default=16384)
    parser.add_argument("--json", help="also write the rows here")
    args = parser.parse_args()
    names = args.transports.split(",")

    ctx = mp.get_context("spawn")
    to_consumer, to_producer, results = ctx.Queue(), ctx.Queue(), ctx.Queue()
    procs = [
        ctx.Process(target=producer, args=(to_consumer, to_producer, args.pool_blocks)),
        ctx.Process(
            target=consumer,
            args=(
                to_consumer,
                to_producer,
                results,
                names,
                args.repeats,
                args.pool_blocks,
            ),
        ),
    ]
    for proc in procs:
        proc.start()
    rows = None
    while rows is None:
        try:
            rows = results.get(timeout=5)
        except Exception:
            if any(proc.exitcode not in (None, 0) for proc in procs):
                for proc in procs:
                    proc.kill()
                sys.exit("a benchmark process failed (see above)")
    for proc in procs:
        proc.join(timeout=60)

    peak = rows[0]["gbps"]
    out = sys.stdout
    out.write(f"{torch.cuda.get_device_name(0)} x{torch.cuda.device_count()}\n")
    out.write(f"peer copy peak: {peak:.1f} GB/s\n\n")
    out.write(
        f"{'transport':<10}{'tokens':>7}{'MB':>9}{'ms':>9}{'GB/s':>9}{'of peak':>9}\n"
    )
    for row in rows[1:]:
        out.write(
            f"{row['transport']:<10}{row['tokens']:>7}{row['mbytes']:>9.1f}"
            f"{row['ms']:>9.2f}{row['gbps']:>9.1f}{row['gbps'] / peak:>9.0%}\n"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
