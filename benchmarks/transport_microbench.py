"""KV transport micro-benchmark on one host with two GPUs.

A producer process (GPU 0) and a consumer process (GPU 1) each hold a paged
KV cache shaped like Qwen2-7B's (28 layers, 4 KV heads, head dim 128, bf16,
block 16) in a large block pool. The consumer reads 512-, 2048- and
8192-token prompts' blocks, scattered at random in the producer's pool, into
scattered blocks of its own, through pdserve's real side channel and each
transport, both engines pumped as their engine threads would. Every byte of
every layer and block position is compared with the producer's (through an
IPC mapping of its cache), and the GPU0->GPU1 peer copy peak is measured in
the same run for reference. Reported: the whole read (request, answer, copy)
and, for ipc, the copy kernel alone.

    python benchmarks/transport_microbench.py [--transports tcp,ipc,nccl]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import threading
import time

import torch
import torch.multiprocessing as mp

from pdserve.connector.kv_client import BlockingClient, Load, ProducerLink
from pdserve.connector.kv_server import KVServer
from pdserve.connector.leases import LeaseTable
from pdserve.connector.metadata import LoadSpec
from pdserve.kv_cache import PagedKVCache
from pdserve.lease import Lease, lease_token
from pdserve.protocol import RankInfo, TransportHello, prompt_hash
from pdserve.transport import (
    device_pci_bus_id,
    device_uuid,
    get_transport,
    host_identity,
)
from pdserve.transport.devices import local_index_of
from pdserve.transport.ipc import import_tensor

LAYERS, KV_HEADS, HEAD_DIM, BLOCK = 28, 4, 128, 16
PROMPTS = (512, 2048, 8192)
KEY = b"bench-node-key".ljust(32, b"-")
# The side channel is authenticated, as in production (nccl needs it).
SECRET = b"bench-kv-secret"


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
        pdserve_version="bench", protocol_version=3, vllm_version="none",
        model="qwen2-7b-shape", dtype="bfloat16", tp_size=1, tp_rank=0,
        block_size=BLOCK, num_blocks=kv.num_blocks, layers=kv.layer_infos(),
        transports=["tcp", "ipc", "nccl"], device="cuda",
        device_uuid=device_uuid(kv.device),
        device_pci_bus_id=device_pci_bus_id(kv.device),
        host_id=host_identity(), instance_id="bench",
    )  # fmt: skip


def lease_for(tokens: int, ids: list[int], port: int, attempt: int) -> Lease:
    digest = prompt_hash(list(range(tokens)))
    request_id = f"prompt-{tokens}-{attempt}"
    return Lease(
        request_id=request_id, token=lease_token(KEY, request_id, digest),
        instance_id="bench", block_ids=ids, prompt_hash=digest,
        num_prompt_tokens=tokens, kv_ports=[port],
    )  # fmt: skip


def devices() -> tuple[int, int]:
    """Producer and consumer GPUs: 0 and 1, or both 0 on a one-GPU box (then
    ipc copies within one GPU and the 'peer' peak is a same-GPU copy)."""
    return (0, 1) if torch.cuda.device_count() > 1 else (0, 0)


def producer(to_consumer, from_consumer, num_blocks: int, reads: int) -> None:
    device = torch.device("cuda", devices()[0])
    torch.cuda.set_device(device)
    kv = make_kv(device, num_blocks, fill=True)
    leases = LeaseTable(lease_seconds=3600)
    transports = {name: get_transport(name) for name in ("tcp", "ipc", "nccl")}
    server = KVServer(
        "127.0.0.1", 0, kv, rank_info(kv), leases, transports, node_key=KEY,
        secret=SECRET,
    )  # fmt: skip
    rng = random.Random(0)
    plan = {}
    for tokens in PROMPTS:
        # The same blocks under one lease per read: a read releases its lease.
        ids = rng.sample(range(num_blocks), tokens // BLOCK)
        plan[tokens] = [lease_for(tokens, ids, server.port, i) for i in range(reads)]
        for lease in plan[tokens]:
            leases.grant(lease.request_id, ids, lease.prompt_hash)
    torch.cuda.synchronize()
    to_consumer.put((server.port, plan))
    stop = threading.Event()
    threading.Thread(target=lambda: (from_consumer.get(), stop.set())).start()
    while not stop.is_set():  # the producer engine's steps, back to back
        server.step()
    server.close()


def peer_copy_gbps(nbytes: int = 1 << 30, repeats: int = 20) -> float:
    source = torch.empty(nbytes, dtype=torch.uint8, device=f"cuda:{devices()[0]}")
    target = torch.empty(nbytes, dtype=torch.uint8, device=f"cuda:{devices()[1]}")
    target.copy_(source)
    torch.cuda.synchronize(source.device)
    torch.cuda.synchronize(target.device)
    start = time.perf_counter()
    for _ in range(repeats):
        target.copy_(source, non_blocking=True)
    torch.cuda.synchronize(source.device)
    torch.cuda.synchronize(target.device)
    return nbytes * repeats / (time.perf_counter() - start) / 1e9


def read_once(link: ProducerLink, load: Load) -> Load:
    link.submit(load)
    while True:
        finished = link.pump()
        if finished:
            return finished[0]


def check_bytes(kv: PagedKVCache, remote: list[torch.Tensor], src, dst) -> None:
    """Every byte of every layer and block position equals the producer's."""
    src_index = torch.tensor(src, device=remote[0].device)
    dst_index = kv.index(dst)
    for layer, (mine, theirs) in enumerate(zip(kv.layers, remote, strict=True)):
        dim = kv.block_dims[layer]
        got = mine.index_select(dim, dst_index)
        want = theirs.index_select(dim, src_index).to(kv.device)
        if not torch.equal(got.view(torch.int16), want.view(torch.int16)):
            raise AssertionError(f"layer {layer}: blocks differ")


def consumer(from_producer, to_producer, results, names, repeats, num_blocks) -> None:
    device = torch.device("cuda", devices()[1])
    torch.cuda.set_device(device)
    kv = make_kv(device, num_blocks, fill=False)
    port, plan = from_producer.get()
    client = BlockingClient("127.0.0.1", port, timeout=120, secret=SECRET)
    remote = client.rank_info()
    # An independent mapping of the producer's cache, only to check bytes.
    welcome = client.hello(TransportHello("ipc", "check"))
    index = local_index_of(
        welcome.payload["device_uuid"], welcome.payload["device_pci_bus_id"]
    )
    producer_layers = [import_tensor(e, index) for e in welcome.payload["layers"]]
    src, dst = devices()
    rows = [
        {"transport": f"copy (1 GiB, GPU{src}->GPU{dst})", "gbps": peer_copy_gbps()}
    ]
    rng = random.Random(1)
    for name in names:
        transport = get_transport(name)
        session = transport.open_session(client, kv, remote)
        link = ProducerLink("127.0.0.1", port, kv, timeout=120, secret=SECRET)
        for tokens, per_read in plan.items():
            lease = per_read[0]
            local_ids = rng.sample(range(1, num_blocks), len(lease.block_ids))
            times, copy_times = [], []
            for attempt in range(repeats + 2):
                lease = per_read[attempt + (repeats + 2) * names.index(name)]
                spec = LoadSpec(lease.request_id, lease, lease.block_ids, local_ids)
                torch.cuda.synchronize(device)
                start = time.perf_counter()
                done = read_once(
                    link, Load(spec, transport, session, time.monotonic() + 120)
                )
                torch.cuda.synchronize(device)
                if done.error:
                    raise AssertionError(f"{name}: {done.error}")
                if attempt >= 2:  # the first reads set up communicators
                    times.append(time.perf_counter() - start)
                if name == "ipc" and attempt >= 2:
                    copy_times.append(time_copy(transport, session, kv, spec))
            check_bytes(kv, producer_layers, lease.block_ids, local_ids)
            for layer, dim in zip(kv.layers, kv.block_dims, strict=True):
                layer.index_fill_(dim, kv.index(local_ids), 0)
            seconds = statistics.median(times)
            row = {
                "transport": name,
                "tokens": tokens,
                "blocks": len(lease.block_ids),
                "mbytes": done.nbytes / 1e6,
                "ms": seconds * 1e3,
                "gbps": done.nbytes / seconds / 1e9,
            }
            if copy_times:
                row["copy_ms"] = statistics.median(copy_times) * 1e3
                row["copy_gbps"] = done.nbytes / statistics.median(copy_times) / 1e9
            rows.append(row)
            print(json.dumps(row), flush=True)
        link.close()
    results.put(rows)
    to_producer.put("done")


def time_copy(transport, session: str, kv: PagedKVCache, spec: LoadSpec) -> float:
    """The one-launch copy alone, as the ipc read issues it."""
    copier = transport._sessions[session].copier
    src = torch.tensor(spec.remote_block_ids, device=kv.device)
    dst = torch.tensor(spec.local_block_ids, device=kv.device)
    torch.cuda.synchronize(kv.device)
    start = time.perf_counter()
    copier.copy(src, dst)
    torch.cuda.synchronize(kv.device)
    return time.perf_counter() - start


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
        ctx.Process(
            target=producer,
            args=(
                to_consumer,
                to_producer,
                args.pool_blocks,
                (args.repeats + 2) * len(names),
            ),
        ),  # fmt: skip
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
        ),  # fmt: skip
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
        f"{'transport':<10}{'tokens':>7}{'MB':>9}{'ms':>9}{'GB/s':>9}{'of peak':>9}"
        f"{'copy ms':>9}{'copy/peak':>10}\n"
    )
    for row in rows[1:]:
        copy = row.get("copy_gbps")
        out.write(
            f"{row['transport']:<10}{row['tokens']:>7}{row['mbytes']:>9.1f}"
            f"{row['ms']:>9.2f}{row['gbps']:>9.1f}{row['gbps'] / peak:>9.0%}"
            + (f"{row['copy_ms']:>9.2f}{copy / peak:>10.0%}" if copy else "")
            + "\n"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
