"""Cross-host GPU transport: NCCL (RCCL on ROCm) point-to-point over a
dedicated two-party process group per producer/consumer rank pair, set up
through a TCPStore the producer rank hosts. Never touches the default group.

A read is one send of all requested blocks, gathered into one buffer; one
read per pair is in flight at a time, so sends and receives always match.
"""

from __future__ import annotations

import socket
import threading
from contextlib import contextmanager
from datetime import timedelta
from typing import Any

import torch

from pdserve.kv_cache import PagedKVCache
from pdserve.protocol import (
    RankInfo,
    ReadReply,
    TransportHello,
    TransportWelcome,
    send_message,
)
from pdserve.transport.base import (
    KVTransport,
    TransportUnavailable,
    flat_views,
    greet,
    layer_sizes,
    require_gpus,
)

PRODUCER, CONSUMER = 0, 1
TIMEOUT = timedelta(seconds=30)


def pair_group(store: Any, rank: int) -> Any:
    from torch.distributed import ProcessGroupNCCL

    options = ProcessGroupNCCL.Options()
    options._timeout = TIMEOUT
    return ProcessGroupNCCL(store, rank, 2, options)


class _Session:
    def __init__(self, group: Any, store: Any, device: torch.device) -> None:
        self.group = group
        self.store = store  # kept alive: the group rendezvoused through it
        self.lock = threading.Lock()
        self.stream = torch.cuda.Stream(device=device)


class NcclTransport(KVTransport):
    name = "nccl"

    def __init__(self, host: str = "0.0.0.0") -> None:
        self.host = host
        self._sessions: dict[str, _Session] = {}

    # ---- producer ----

    def welcome(self, hello: TransportHello, kv: PagedKVCache) -> TransportWelcome:
        if kv.device.type != "cuda":
            return TransportWelcome(ok=False, error="producer KV is not on a GPU")
        from torch.distributed import TCPStore

        store = TCPStore(
            self.host, 0, 2, is_master=True, timeout=TIMEOUT, wait_for_workers=False
        )
        session = _Session(pair_group(store, PRODUCER), store, kv.device)
        self._sessions[hello.session] = session
        return TransportWelcome(ok=True, payload={"store_port": store.port})

    def send_blocks(
        self, conn: socket.socket, kv: PagedKVCache, block_ids: list[int], session: str
    ) -> None:
        pair = self._sessions.get(session)
        if pair is None:
            send_message(conn, ReadReply(ok=False, error="unknown nccl session"))
            return
        sizes = layer_sizes(kv, len(block_ids))
        with pair.lock, torch.cuda.stream(pair.stream):
            send_message(conn, ReadReply(ok=True, layer_nbytes=sizes))
            if not block_ids:
                return
            flat = torch.empty(sum(sizes), dtype=torch.uint8, device=kv.device)
            index = kv.index(block_ids)
            for layer, view in enumerate(flat_views(kv, flat, len(block_ids))):
                torch.index_select(
                    kv.layers[layer], kv.block_dims[layer], index, out=view
                )
            pair.group.send([flat], CONSUMER, 0).wait(TIMEOUT)

    # ---- consumer ----

    def open_session(self, client, kv: PagedKVCache, remote: RankInfo) -> str:
        require_gpus(self.name, kv, remote)
        import torch.distributed as dist

        if not dist.is_nccl_available():
            raise TransportUnavailable("this torch build has no NCCL/RCCL")
        session, welcome = greet(self.name, client, kv, remote)
        store = dist.TCPStore(
            client.host,
            welcome.payload["store_port"],
            2,
            is_master=False,
            timeout=TIMEOUT,
        )
        self._sessions[session] = _Session(
            pair_group(store, CONSUMER), store, kv.device
        )
        return session

    @contextmanager
    def exclusive(self, session: str):
        with self._sessions[session].lock:
            yield

    def copy_in(
        self,
        conn: socket.socket,
        kv: PagedKVCache,
        remote_block_ids: list[int],
        local_block_ids: list[int],
        session: str,
        sizes: list[int],
    ) -> None:
        pair = self._sessions[session]
        with torch.cuda.stream(pair.stream):
            flat = torch.empty(sum(sizes), dtype=torch.uint8, device=kv.device)
            index = kv.index(local_block_ids)
            pair.group.recv([flat], PRODUCER, 0).wait(TIMEOUT)
            for i, view in enumerate(flat_views(kv, flat, len(local_block_ids))):
                kv.scatter(i, index, view)
        pair.stream.synchronize()
