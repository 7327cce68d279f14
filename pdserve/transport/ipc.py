"""Same-host GPU transport: the consumer maps the producer's KV tensors once
(CUDA IPC, which HIP provides on ROCm too) and copies blocks device to device:
per layer one gather on the producer's GPU, one peer copy, one scatter."""

from __future__ import annotations

import os
import socket
import threading
from typing import Any

import torch

from pdserve.kv_cache import PagedKVCache, dtype_name
from pdserve.protocol import (
    RankInfo,
    ReadReply,
    TransportHello,
    TransportWelcome,
    send_message,
)
from pdserve.transport import device_uuid
from pdserve.transport.base import (
    KVTransport,
    TransportUnavailable,
    flat_views,
    greet,
    layer_sizes,
)


def local_index_of(uuid: str) -> int | None:
    for index in range(torch.cuda.device_count()):
        if device_uuid(torch.device("cuda", index)) == uuid:
            return index
    return None


def export_tensor(tensor: torch.Tensor) -> dict[str, Any]:
    (
        _device,
        handle,
        size_bytes,
        offset_bytes,
        ref_counter_handle,
        ref_counter_offset,
        event_handle,
        event_sync_required,
    ) = tensor.untyped_storage()._share_cuda_()
    return {
        "size": list(tensor.shape),
        "stride": list(tensor.stride()),
        "offset": tensor.storage_offset(),
        "dtype": dtype_name(tensor.dtype),
        "handle": handle,
        "size_bytes": size_bytes,
        "offset_bytes": offset_bytes,
        "ref_counter_handle": ref_counter_handle,
        "ref_counter_offset": ref_counter_offset,
        "event_handle": event_handle or b"",
        "event_sync_required": event_sync_required,
    }


def import_tensor(exported: dict[str, Any], device_index: int) -> torch.Tensor:
    from torch.multiprocessing.reductions import rebuild_cuda_tensor

    return rebuild_cuda_tensor(
        torch.Tensor,
        torch.Size(exported["size"]),
        tuple(exported["stride"]),
        exported["offset"],
        torch.UntypedStorage,
        getattr(torch, exported["dtype"]),
        device_index,
        exported["handle"],
        exported["size_bytes"],
        exported["offset_bytes"],
        False,
        exported["ref_counter_handle"],
        exported["ref_counter_offset"],
        exported["event_handle"] or None,
        exported["event_sync_required"],
    )


class IpcTransport(KVTransport):
    name = "ipc"

    def __init__(self) -> None:
        self._exported: list[dict[str, Any]] | None = None
        self._remote: dict[str, list[torch.Tensor]] = {}
        # Per (producer device, our device, thread): gather, copy, scatter.
        self._streams: dict[tuple[int, int, int], tuple[torch.cuda.Stream, ...]] = {}
        self._lock = threading.Lock()

    # ---- producer ----

    def welcome(self, hello: TransportHello, kv: PagedKVCache) -> TransportWelcome:
        if kv.device.type != "cuda":
            return TransportWelcome(ok=False, error="producer KV is not on a GPU")
        if self._exported is None:
            self._exported = [export_tensor(t) for t in kv.layers]
        payload = {"device_uuid": device_uuid(kv.device), "layers": self._exported}
        return TransportWelcome(ok=True, payload=payload)

    def send_blocks(
        self, conn: socket.socket, kv: PagedKVCache, block_ids: list[int], session: str
    ) -> None:
        # The consumer copies by itself; the lease keeps the blocks until then.
        sizes = layer_sizes(kv, len(block_ids))
        send_message(conn, ReadReply(ok=True, layer_nbytes=sizes))

    # ---- consumer ----

    def open_session(self, client, kv: PagedKVCache, remote: RankInfo) -> str:
        session, welcome = greet(self.name, client, kv, remote)
        index = local_index_of(welcome.payload["device_uuid"])
        if index is None:
            raise TransportUnavailable(
                "producer GPU is not visible to this process (CUDA_VISIBLE_DEVICES?)"
            )
        try:
            layers = [import_tensor(e, index) for e in welcome.payload["layers"]]
        except RuntimeError as exc:
            raise TransportUnavailable(f"mapping producer KV failed: {exc}") from exc
        self._remote[session] = layers
        return session

    def _streams_for(self, remote: torch.device, local: torch.device):
        key = (remote.index or 0, local.index or 0, threading.get_ident())
        with self._lock:
            if key not in self._streams:
                self._streams[key] = (
                    torch.cuda.Stream(device=remote),
                    torch.cuda.Stream(device=local),
                    torch.cuda.Stream(device=local),
                )
            return self._streams[key]

    def copy_in(
        self,
        conn: socket.socket,
        kv: PagedKVCache,
        remote_block_ids: list[int],
        local_block_ids: list[int],
        session: str,
        sizes: list[int],
    ) -> None:
        remote = self._remote[session]
        num = len(local_block_ids)
        gather_stream, copy_stream, scatter_stream = self._streams_for(
            remote[0].device, kv.device
        )
        # Layers go in chunks through three stages on three streams, so the
        # gather on the producer's GPU, the peer copy and the scatter on ours
        # overlap; the peer copy is one large copy per chunk.
        with torch.cuda.stream(gather_stream):
            remote_index = torch.tensor(remote_block_ids, device=remote[0].device)
            remote_flat = torch.empty(
                sum(sizes), dtype=torch.uint8, device=remote[0].device
            )
        with torch.cuda.stream(scatter_stream):
            local_index = kv.index(local_block_ids)
            local_flat = torch.empty(sum(sizes), dtype=torch.uint8, device=kv.device)
        remote_views = flat_views(kv, remote_flat, num)
        local_views = flat_views(kv, local_flat, num)
        for layers, (start, end) in chunks(sizes):
            with torch.cuda.stream(gather_stream):
                for i in layers:
                    torch.index_select(
                        remote[i], kv.block_dims[i], remote_index, out=remote_views[i]
                    )
                gathered = torch.cuda.Event()
                gathered.record(gather_stream)
            with torch.cuda.stream(copy_stream):
                copy_stream.wait_event(gathered)
                local_flat[start:end].copy_(remote_flat[start:end], non_blocking=True)
                copied = torch.cuda.Event()
                copied.record(copy_stream)
            with torch.cuda.stream(scatter_stream):
                scatter_stream.wait_event(copied)
                for i in layers:
                    kv.scatter(i, local_index, local_views[i])
        scatter_stream.synchronize()


# Layer groups a GPU-direct read is pipelined in (gather / move / scatter).
PIPELINE_CHUNKS = int(os.environ.get("PDSERVE_PIPELINE_CHUNKS", "4"))


def chunks(sizes: list[int], count: int = PIPELINE_CHUNKS):
    """Layer groups of a pipelined transfer with their byte range in the
    flat buffer: [(layers, (start, end)), ...]."""
    per_chunk = -(-len(sizes) // count)
    offset = 0
    for first in range(0, len(sizes), per_chunk):
        layers = range(first, min(first + per_chunk, len(sizes)))
        size = sum(sizes[i] for i in layers)
        yield layers, (offset, offset + size)
        offset += size
