"""Same-host GPU transport: the consumer maps the producer's KV tensors once
(CUDA IPC, which HIP provides on ROCm too) and copies blocks straight from
the producer's memory into its own, one kernel launch for all layers
(block_copy.py): no staging buffer, nothing allocated on the producer's GPU.

The producer answers a read at once and keeps the lease's blocks until the
consumer releases them or the hold it promised runs out; the consumer starts
its copy only well inside that hold.
"""

from __future__ import annotations

import threading
from typing import Any

import torch

from pdserve.channel import Channel
from pdserve.kv_cache import HeadRange, PagedKVCache, dtype_name
from pdserve.protocol import RankInfo, ReadReply, TransportHello, TransportWelcome
from pdserve.timing import IPC_HOLD_SECONDS
from pdserve.transport.base import (
    Incoming,
    KVTransport,
    Outgoing,
    TransportUnavailable,
    greet,
    layer_sizes,
)
from pdserve.transport.block_copy import (
    BlockCopier,
    block_ids_on,
    block_layout,
    staging_layouts,
)
from pdserve.transport.devices import device_pci_bus_id, device_uuid, local_index_of


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


class _Answered(Outgoing):
    def advance(self) -> bool:
        return True


class _Session:
    """The producer's KV mapped into this process, and how to copy from it."""

    def __init__(self, remote: list[torch.Tensor], kv: PagedKVCache) -> None:
        self.remote = remote  # keeps the mapping alive
        self.copier = BlockCopier(
            [block_layout(t, d) for t, d in zip(remote, kv.block_dims, strict=True)],
            [block_layout(t, d) for t, d in zip(kv.layers, kv.block_dims, strict=True)],
            anchor=kv.layers[0],
        )
        self.stream = torch.cuda.Stream(device=kv.device)
        self._probe(kv)
        self.copier.warmup()

    def _probe(self, kv: PagedKVCache) -> None:
        """Copy one block both with torch (which also enables peer access)
        and with the kernel; refuse the session unless the bytes agree."""
        block = torch.tensor([0], dtype=torch.int64, device=kv.device)
        # Segment by segment onto our GPU: nothing is allocated on theirs.
        expected = torch.cat(
            [
                _raw_bytes(t)[o : o + lay.segment_bytes].to(kv.device)
                for t, lay in zip(self.remote, self.copier.src_layouts, strict=True)
                for o in lay.segment_offsets
            ]
        )
        scratch = torch.zeros_like(expected)
        probe = BlockCopier(
            self.copier.src_layouts,
            staging_layouts(
                scratch.data_ptr(),
                [(self.copier.num_segments, self.copier.segment_bytes)]
                * len(self.remote),
                1,
            ),
            anchor=kv.layers[0],
        )
        probe.copy(block, block, self.stream)
        self.stream.synchronize()
        if not torch.equal(scratch, expected):
            raise TransportUnavailable("copy from the producer's GPU read wrong bytes")


def _raw_bytes(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor's memory as bytes, in physical order, from its first element."""
    flat = torch.empty(0, dtype=torch.uint8, device=tensor.device)
    flat.set_(tensor.untyped_storage())
    return flat[tensor.storage_offset() * tensor.element_size() :]


class _Copying(Incoming):
    def __init__(
        self,
        session: _Session,
        kv: PagedKVCache,
        remote_block_ids: list[int],
        local_block_ids: list[int],
    ) -> None:
        stream = session.stream
        # The destination blocks are fresh from vLLM's allocator: order the
        # copy after whatever the engine enqueued before.
        stream.wait_stream(torch.cuda.current_stream(kv.device))
        with torch.cuda.device(kv.device), torch.cuda.stream(stream):
            src = block_ids_on(remote_block_ids, kv.device)
            dst = block_ids_on(local_block_ids, kv.device)
            session.copier.copy(src, dst, stream)
            self.done = torch.cuda.Event()
            self.done.record(stream)

    def poll(self) -> bool:
        return self.done.query()


class IpcTransport(KVTransport):
    name = "ipc"
    # A session maps the producer's whole KV cache, read and write.
    needs_secret = True

    def __init__(self) -> None:
        # Producer: the export, made once by the session-setup thread.
        self._exported: list[dict[str, Any]] | None = None
        # Consumer: mappings by session; pairing may add one while the
        # engine's thread reads through another.
        self._sessions: dict[str, _Session] = {}
        self._lock = threading.Lock()

    # ---- producer ----

    def welcome(self, hello: TransportHello, kv: PagedKVCache) -> TransportWelcome:
        if kv.device.type != "cuda":
            return TransportWelcome(ok=False, error="producer KV is not on a GPU")
        if self._exported is None:
            self._exported = [export_tensor(t) for t in kv.layers]
        payload = {
            "device_uuid": device_uuid(kv.device),
            "device_pci_bus_id": device_pci_bus_id(kv.device),
            "layers": self._exported,
        }
        return TransportWelcome(ok=True, payload=payload)

    def serve(
        self,
        channel: Channel,
        kv: PagedKVCache,
        block_ids: list[int],
        session: str,
        heads: HeadRange = None,
    ) -> Outgoing:
        assert heads is None, "whole blocks only (moves_heads is False)"
        sizes = layer_sizes(kv, len(block_ids))
        channel.send(
            ReadReply(ok=True, layer_nbytes=sizes, hold_seconds=IPC_HOLD_SECONDS)
        )
        return _Answered()

    def hold_seconds(self) -> float:
        return IPC_HOLD_SECONDS

    # ---- consumer ----

    def open_session(
        self, client, kv: PagedKVCache, remote: RankInfo, consumer_id: str = ""
    ) -> str:
        session, welcome = greet(self.name, client, kv, remote, consumer_id)
        index = local_index_of(
            welcome.payload.get("device_uuid", ""),
            welcome.payload.get("device_pci_bus_id", ""),
        )
        if index is None:
            raise TransportUnavailable(
                "producer GPU is not visible to this process (CUDA_VISIBLE_DEVICES?) "
                "or cannot be told apart (no UUID or PCI bus id, or a shared UUID)"
            )
        try:
            layers = [import_tensor(e, index) for e in welcome.payload["layers"]]
            mapped = _Session(layers, kv)
        except (RuntimeError, ValueError, ImportError) as exc:
            raise TransportUnavailable(f"mapping producer KV failed: {exc}") from exc
        with self._lock:
            self._sessions[session] = mapped
        return session

    def receive(
        self,
        kv: PagedKVCache,
        remote_block_ids: list[int],
        local_block_ids: list[int],
        session: str,
        heads: HeadRange = None,
    ) -> Incoming:
        assert heads is None, "whole blocks only (moves_heads is False)"
        with self._lock:
            mapped = self._sessions.get(session)
        if mapped is None:  # dropped while the read was on its way
            raise ConnectionError("ipc session is unknown")
        return _Copying(mapped, kv, remote_block_ids, local_block_ids)

    def drop_sessions(self) -> None:
        with self._lock:
            dropped = list(self._sessions.values())
            self._sessions.clear()
        for session in dropped:
            session.stream.synchronize()  # no copy may read an unmapped range
