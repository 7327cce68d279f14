"""The interface every KV transport implements: move blocks of one rank's KV.

Control traffic (rank info, read requests, releases) always travels on the
TCP side channel; a transport decides how the block bytes move and may set
up a session first (IPC handles, a NCCL pair). One file per transport.

Transfers are driven from the engine's own thread: ``serve`` and ``receive``
only start one, and the side channel calls ``advance`` / ``poll`` every
engine step until it is done. Nothing may block for longer than a copy that
is already running.
"""

from __future__ import annotations

import secrets
from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, ClassVar

from pdserve.kv_cache import HeadRange, PagedKVCache
from pdserve.protocol import TransportHello, TransportWelcome

if TYPE_CHECKING:
    from pdserve.channel import Channel
    from pdserve.protocol import RankInfo


class TransportUnavailable(RuntimeError):
    """This transport cannot connect these two ranks; use another."""


class SessionLost(TransportUnavailable):
    """The producer has no (working) session by that name: the consumer's
    session is dead and must not be used again."""


class Outgoing(ABC):
    """Producer: one read being served. Its lease stays pinned until
    ``advance`` says the blocks' bytes are no longer needed."""

    @abstractmethod
    def advance(self) -> bool:
        """Do what can be done now; True once the blocks may be reused."""

    def abort(self) -> None:
        """The connection or session failed: stop, never touch the blocks again."""
        return None


class Incoming(ABC):
    """Consumer: one read being received into its local blocks."""

    def raw_view(self) -> memoryview | None:
        """Where the next payload bytes on the side channel go, or None."""
        return None

    def on_raw(self, nbytes: int) -> None:
        """``nbytes`` arrived in the last ``raw_view``."""
        return None

    @abstractmethod
    def poll(self) -> bool:
        """True once every block is in place (device work included)."""

    def abort(self) -> None:
        """Give up; the local blocks will be recomputed."""
        return None


class KVTransport(ABC):
    name: ClassVar[str]
    # The block bytes follow the ReadReply on the side channel (then, on a
    # connection that proved the KV secret, a PayloadEnd covers them).
    payload_on_channel: ClassVar[bool] = False
    # Its sessions hand a peer the producer's memory or hold its GPU for
    # the peer: only for peers that proved the KV secret.
    needs_secret: ClassVar[bool] = False

    # ---- producer ----

    # ``welcome`` and ``after_welcome`` run on the KV server's session-setup
    # thread while the engine's thread serves reads and closes sessions:
    # a transport's session table must be safe for both.

    def welcome(self, hello: TransportHello, kv: PagedKVCache) -> TransportWelcome:
        """Accept a consumer's session; the default transport needs none."""
        return TransportWelcome(ok=True)

    def after_welcome(self, session: str) -> None:
        """Called once the welcome has left: finish a session setup that
        needs the consumer (who only starts its part on the welcome)."""
        return None

    # Whether reads of some heads of each block (TP sizes differ) can move.
    moves_heads: ClassVar[bool] = False

    @abstractmethod
    def serve(
        self,
        channel: Channel,
        kv: PagedKVCache,
        block_ids: list[int],
        session: str,
        heads: HeadRange = None,
    ) -> Outgoing:
        """Queue the ReadReply (and any payload) for a checked, pinned read
        (of ``heads`` only, where ``moves_heads``)."""

    def hold_seconds(self) -> float:
        """How long the consumer may take to copy by itself (0: it does not)."""
        return 0.0

    def close_session(self, session: str) -> None:
        """Forget a session (its consumer went away or said hello again)."""
        return None

    # ---- consumer ----

    def open_session(
        self, client, kv: PagedKVCache, remote: RankInfo, consumer_id: str = ""
    ) -> str:
        """Set up what reads from ``client``'s rank need (``client.hello`` sends
        a TransportHello naming this rank as ``consumer_id``); returns the
        session id. Raises TransportUnavailable."""
        return ""

    @abstractmethod
    def receive(
        self,
        kv: PagedKVCache,
        remote_block_ids: list[int],
        local_block_ids: list[int],
        session: str,
        heads: HeadRange = None,
    ) -> Incoming:
        """Start taking the blocks the producer announced as it accepted
        (into ``heads`` of the local blocks, where ``moves_heads``)."""

    def healthy(self, session: str) -> bool:
        """False once the session broke (the consumer falls back to tcp)."""
        return True

    def drop_sessions(self) -> None:
        """The producer changed (restart): forget every session and mapping."""
        return None


def layer_sizes(
    kv: PagedKVCache, num_blocks: int, heads: HeadRange = None
) -> list[int]:
    return [kv.block_nbytes(i, heads) * num_blocks for i in range(len(kv.layers))]


def require_gpus(name: str, kv: PagedKVCache, remote: RankInfo) -> None:
    if kv.device.type != "cuda" or remote.device != "cuda":
        raise TransportUnavailable(f"{name} needs both ranks on GPUs")


def greet(
    name: str, client, kv: PagedKVCache, remote: RankInfo, consumer_id: str = ""
) -> tuple[str, TransportWelcome]:
    """Open a GPU-direct session with ``client``'s rank: a new session id and
    the producer's welcome. Raises TransportUnavailable."""
    require_gpus(name, kv, remote)
    session = secrets.token_hex(8)
    welcome = client.hello(TransportHello(name, session, consumer_id=consumer_id))
    if not welcome.ok:
        raise TransportUnavailable(f"producer refused {name}: {welcome.error}")
    return session, welcome
