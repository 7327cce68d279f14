"""The interface every KV transport implements: move blocks of one rank's KV.

Control traffic (rank info, read requests, releases) always travels on the
TCP side channel; a transport decides how the block bytes move and may set
up a session first (IPC handles, a NCCL pair). One file per transport.
"""

from __future__ import annotations

import secrets
import socket
from abc import ABC, abstractmethod
from contextlib import AbstractContextManager, nullcontext
from typing import TYPE_CHECKING, ClassVar

import torch

from pdserve.kv_cache import PagedKVCache
from pdserve.protocol import ReadReply, TransportHello, TransportWelcome, recv_message

if TYPE_CHECKING:
    from pdserve.protocol import RankInfo


class TransportUnavailable(RuntimeError):
    """This transport cannot connect these two ranks; use another."""


class KVTransport(ABC):
    name: ClassVar[str]

    # ---- producer ----

    def welcome(self, hello: TransportHello, kv: PagedKVCache) -> TransportWelcome:
        """Accept a consumer's session; the default transport needs none."""
        return TransportWelcome(ok=True)

    @abstractmethod
    def send_blocks(
        self, conn: socket.socket, kv: PagedKVCache, block_ids: list[int], session: str
    ) -> None:
        """Answer a read with a ReadReply and move the blocks."""

    # ---- consumer ----

    def open_session(self, client, kv: PagedKVCache, remote: RankInfo) -> str:
        """Set up what reads from ``client``'s rank need (``client.hello`` sends
        a TransportHello); returns the session id. Raises TransportUnavailable."""
        return ""

    def exclusive(self, session: str) -> AbstractContextManager:
        """Held around a whole read; transports that must not interleave reads
        on one session lock here."""
        return nullcontext()

    def recv_blocks(
        self,
        conn: socket.socket,
        kv: PagedKVCache,
        remote_block_ids: list[int],
        local_block_ids: list[int],
        session: str,
    ) -> int:
        """Take the answer to a read into ``local_block_ids``; returns bytes.

        Raises on any error."""
        sizes = expect_reply(conn, kv, len(local_block_ids))
        if local_block_ids:
            self.copy_in(conn, kv, remote_block_ids, local_block_ids, session, sizes)
        return sum(sizes)

    @abstractmethod
    def copy_in(
        self,
        conn: socket.socket,
        kv: PagedKVCache,
        remote_block_ids: list[int],
        local_block_ids: list[int],
        session: str,
        sizes: list[int],
    ) -> None:
        """Move the blocks the producer announced (``sizes`` bytes per layer)
        into ``local_block_ids``."""


def layer_sizes(kv: PagedKVCache, num_blocks: int) -> list[int]:
    return [kv.block_nbytes(i) * num_blocks for i in range(len(kv.layers))]


def expect_reply(conn: socket.socket, kv: PagedKVCache, num_blocks: int) -> list[int]:
    """Read the producer's ReadReply and check the sizes it announces."""
    reply = recv_message(conn)
    if not isinstance(reply, ReadReply):
        raise ConnectionError(f"expected ReadReply, got {type(reply).__name__}")
    if not reply.ok:
        raise ConnectionError(f"producer refused the read: {reply.error}")
    expected = layer_sizes(kv, num_blocks)
    if reply.layer_nbytes != expected:
        raise ConnectionError(
            f"producer announced {reply.layer_nbytes} bytes per layer, "
            f"expected {expected}"
        )
    return expected


def flat_views(kv: PagedKVCache, flat: torch.Tensor, num: int) -> list[torch.Tensor]:
    """Per-layer views into one byte buffer, shaped like gathered blocks."""
    views, offset = [], 0
    for layer, size in enumerate(layer_sizes(kv, num)):
        chunk = flat[offset : offset + size].view(kv.layers[layer].dtype)
        views.append(chunk.view(kv.gathered_shape(layer, num)))
        offset += size
    return views


def require_gpus(name: str, kv: PagedKVCache, remote: RankInfo) -> None:
    if kv.device.type != "cuda" or remote.device != "cuda":
        raise TransportUnavailable(f"{name} needs both ranks on GPUs")


def greet(
    name: str, client, kv: PagedKVCache, remote: RankInfo
) -> tuple[str, TransportWelcome]:
    """Open a GPU-direct session with ``client``'s rank: a new session id and
    the producer's welcome. Raises TransportUnavailable."""
    require_gpus(name, kv, remote)
    session = secrets.token_hex(8)
    welcome = client.hello(TransportHello(name, session))
    if not welcome.ok:
        raise TransportUnavailable(f"producer refused {name}: {welcome.error}")
    return session, welcome
