"""Same-host GPU transport: the consumer maps the producer's KV tensors once
(CUDA IPC, which HIP provides on ROCm too) and copies blocks device to device:
per layer one gather on the producer's GPU, one peer copy, one scatter."""

from __future__ import annotations

import secrets
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
from pdserve.transport.base import (
    KVTransport,
    TransportUnavailable,
    expect_reply,
    layer_sizes,
)


def device_uuid(device: torch.device) -> str:
    if device.type != "cuda":
        return ""
    return str(getattr(torch.cuda.get_device_properties(device), "uuid", ""))


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
        self._streams: dict[tuple[int, int], torch.cuda.Stream] = {}
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
    ) -> int:
        # The consumer copies by itself; the lease keeps the blocks until then.
        sizes = layer_sizes(kv, len(block_ids))
        send_message(conn, ReadReply(ok=True, layer_nbytes=sizes))
        return sum(sizes)

    # ---- consumer ----

    def open_session(self, client, kv: PagedKVCache, remote: RankInfo) -> str:
        if kv.device.type != "cuda" or remote.device != "cuda":
            raise TransportUnavailable("ipc needs both ranks on GPUs")
        session = secrets.token_hex(8)
        welcome = client.hello(TransportHello(self.name, session))
        if not welcome.ok:
            raise TransportUnavailable(f"producer refused ipc: {welcome.error}")
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

    def _stream(self, device: torch.device) -> torch.cuda.Stream:
        key = (device.index or 0, threading.get_ident())
        with self._lock:
            if key not in self._streams:
                self._streams[key] = torch.cuda.Stream(device=device)
            return self._streams[key]

    def recv_blocks(
        self,
        conn: socket.socket,
        kv: PagedKVCache,
        remote_block_ids: list[int],
        local_block_ids: list[int],
        session: str,
    ) -> int:
        sizes = expect_reply(conn, kv, len(local_block_ids))
        if not local_block_ids:
            return 0
        remote = self._remote[session]
        remote_device = remote[0].device
        remote_stream, local_stream = (
            self._stream(remote_device),
            self._stream(kv.device),
        )
        with torch.cuda.stream(remote_stream):
            remote_index = torch.tensor(remote_block_ids, device=remote_device)
            gathered = [
                layer.index_select(kv.block_dims[i], remote_index)
                for i, layer in enumerate(remote)
            ]
            ready = torch.cuda.Event()
            ready.record(remote_stream)
        with torch.cuda.stream(local_stream):
            local_stream.wait_event(ready)
            local_index = kv.index(local_block_ids)
            for i, blocks in enumerate(gathered):
                kv.scatter(i, local_index, blocks.to(kv.device, non_blocking=True))
        local_stream.synchronize()
        return sum(sizes)
