"""The interface every KV transport implements: move blocks of one rank's KV.

Control traffic (rank info, read requests, releases) always travels on the
TCP side channel; a transport only decides how the block bytes move. A
GPU-direct transport is one more file implementing this interface.
"""

from __future__ import annotations

import socket
from abc import ABC, abstractmethod
from typing import ClassVar

from pdserve.kv_cache import PagedKVCache


class KVTransport(ABC):
    name: ClassVar[str]

    @abstractmethod
    def send_blocks(
        self, conn: socket.socket, kv: PagedKVCache, block_ids: list[int]
    ) -> int:
        """Producer side: answer a read with a ReadReply and the blocks' bytes.

        Returns the number of payload bytes sent.
        """

    @abstractmethod
    def recv_blocks(
        self, conn: socket.socket, kv: PagedKVCache, block_ids: list[int]
    ) -> int:
        """Consumer side: take the answer to a read into ``block_ids``.

        Raises on any error; returns the number of payload bytes received.
        """
