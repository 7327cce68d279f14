"""A producer rank's KV server over a CPU cache, for side-channel tests."""

from __future__ import annotations

from pdserve.connector.kv_server import KVServer
from pdserve.connector.leases import LeaseTable
from pdserve.kv_cache import PagedKVCache
from pdserve.protocol import RankInfo
from pdserve.transport import get_transport


def rank_info_for(kv: PagedKVCache) -> RankInfo:
    return RankInfo(
        pdserve_version="t", protocol_version=2, vllm_version="t", model="m",
        dtype="float32", tp_size=1, tp_rank=0, block_size=16,
        num_blocks=kv.num_blocks, layers=kv.layer_infos(), transports=["tcp"],
    )  # fmt: skip


def start_tcp_server(
    kv: PagedKVCache, leases: LeaseTable, secret: bytes | None = None
) -> KVServer:
    """A server on a free local port that moves blocks over tcp."""
    transports = {"tcp": get_transport("tcp")}
    return KVServer("127.0.0.1", 0, kv, rank_info_for(kv), leases, transports, secret)
