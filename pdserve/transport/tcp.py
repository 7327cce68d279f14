"""KV blocks as raw bytes on the side-channel socket: works on any device.

The producer gathers one layer at a time, only when the socket has taken most
of the previous one, so a read costs at most about a layer of host memory;
the consumer scatters each layer as soon as its bytes are in.
"""

from __future__ import annotations

import torch

from pdserve.kv_cache import HeadRange, PagedKVCache
from pdserve.side_channel.channel import Channel
from pdserve.side_channel.protocol import ReadReply
from pdserve.transport.base import Incoming, KVTransport, Outgoing, layer_sizes

# Gather the next layer once fewer bytes than this wait in the socket queue.
LOW_WATER_BYTES = 4 << 20


def _byte_view(tensor: torch.Tensor) -> memoryview:
    return memoryview(tensor.view(torch.uint8).reshape(-1).numpy())


class _Sending(Outgoing):
    def __init__(
        self,
        channel: Channel,
        kv: PagedKVCache,
        block_ids: list[int],
        heads: HeadRange,
    ):
        self.channel = channel
        self.kv = kv
        self.heads = heads
        self.index = kv.index(block_ids)
        self.next_layer = 0
        self.ended = False
        sizes = layer_sizes(kv, len(block_ids), heads)
        channel.send(ReadReply(ok=True, layer_nbytes=sizes))
        if not block_ids:
            self.next_layer = len(kv.layers)

    def advance(self) -> bool:
        while (
            self.next_layer < len(self.kv.layers)
            and self.channel.pending_out < LOW_WATER_BYTES
        ):
            # Host staging is inherent to TCP; GPU transports avoid it.
            blocks = self.kv.gather(self.next_layer, self.index, self.heads).cpu()
            self.channel.send_raw(_byte_view(blocks))
            self.next_layer += 1
        if self.next_layer < len(self.kv.layers):
            return False
        if not self.ended:
            self.ended = True
            self.channel.end_payload()
        return True


class _Receiving(Incoming):
    def __init__(
        self, kv: PagedKVCache, local_block_ids: list[int], heads: HeadRange
    ) -> None:
        self.kv = kv
        self.heads = heads
        self.num = len(local_block_ids)
        self.index = kv.index(local_block_ids)
        self.layer = 0
        self.filled = 0
        self.buffer: torch.Tensor | None = None
        self._scattered_on_device = False
        if self.num == 0:
            self.layer = len(kv.layers)

    def _current(self) -> torch.Tensor:
        if self.buffer is None:
            shape = self.kv.gathered_shape(self.layer, self.num, self.heads)
            self.buffer = torch.empty(shape, dtype=self.kv.layers[self.layer].dtype)
        return self.buffer

    def raw_view(self) -> memoryview | None:
        if self.layer == len(self.kv.layers):
            return None
        return _byte_view(self._current())[self.filled :]

    def on_raw(self, nbytes: int) -> None:
        self.filled += nbytes
        buffer = self._current()
        if self.filled < buffer.numel() * buffer.element_size():
            return
        device = self.kv.device
        blocks = buffer.to(device, non_blocking=False)
        self.kv.scatter(self.layer, self.index, blocks, self.heads)
        self._scattered_on_device = device.type != "cpu"
        self.layer += 1
        self.filled = 0
        self.buffer = None

    def poll(self) -> bool:
        if self.layer < len(self.kv.layers):
            return False
        if self._scattered_on_device:
            # The scatter ran on this thread's current stream; the engine's
            # next step may run on another, so the load is done only when
            # the scatter is.
            torch.cuda.current_stream(self.kv.device).synchronize()
            self._scattered_on_device = False
        return True


class TcpTransport(KVTransport):
    name = "tcp"
    moves_heads = True
    payload_on_channel = True

    def serve(
        self,
        channel: Channel,
        kv: PagedKVCache,
        block_ids: list[int],
        session: str,
        heads: HeadRange = None,
    ) -> Outgoing:
        return _Sending(channel, kv, block_ids, heads)

    def receive(
        self,
        kv: PagedKVCache,
        remote_block_ids: list[int],
        local_block_ids: list[int],
        session: str,
        heads: HeadRange = None,
    ) -> Incoming:
        return _Receiving(kv, local_block_ids, heads)
