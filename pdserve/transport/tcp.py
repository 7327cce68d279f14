"""KV blocks as raw bytes on the side-channel socket: works on any device."""

from __future__ import annotations

import socket

import torch

from pdserve.kv_cache import PagedKVCache
from pdserve.protocol import ReadReply, recv_exact, send_message
from pdserve.transport.base import KVTransport, layer_sizes


def _byte_view(tensor: torch.Tensor) -> memoryview:
    return memoryview(tensor.view(torch.uint8).reshape(-1).numpy())


class TcpTransport(KVTransport):
    name = "tcp"

    def send_blocks(
        self, conn: socket.socket, kv: PagedKVCache, block_ids: list[int], session: str
    ) -> None:
        sizes = layer_sizes(kv, len(block_ids))
        send_message(conn, ReadReply(ok=True, layer_nbytes=sizes))
        if not block_ids:
            return
        index = kv.index(block_ids)
        for layer in range(len(kv.layers)):
            # Host staging is inherent to TCP; GPU transports avoid it.
            blocks = kv.gather(layer, index).cpu()
            conn.sendall(_byte_view(blocks))

    def copy_in(
        self,
        conn: socket.socket,
        kv: PagedKVCache,
        remote_block_ids: list[int],
        local_block_ids: list[int],
        session: str,
        sizes: list[int],
    ) -> None:
        index = kv.index(local_block_ids)
        for layer, tensor in enumerate(kv.layers):
            shape = kv.gathered_shape(layer, len(local_block_ids))
            buffer = torch.empty(shape, dtype=tensor.dtype)
            recv_exact(conn, _byte_view(buffer))
            kv.scatter(layer, index, buffer.to(tensor.device))
