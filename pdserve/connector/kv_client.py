"""Consumer side of the KV side channel: talk to one producer rank.

Connections are pooled per producer address and reused across requests;
every socket operation is bounded by a timeout. Every new connection first
answers the producer's greeting, proving the shared KV secret if it asks.
"""

from __future__ import annotations

import queue
import select
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TypeVar

from pdserve.handshake import SECRET_REJECTED, KVAuthError, check_kv_auth
from pdserve.kv_cache import PagedKVCache
from pdserve.protocol import (
    Ack,
    AuthProof,
    GetRankInfo,
    RankInfo,
    ReadBlocks,
    Release,
    ServerHello,
    TransportHello,
    TransportWelcome,
    auth_mac,
    recv_message,
    send_message,
)
from pdserve.transport import KVTransport

T = TypeVar("T")

# The producer closes connections idle for IDLE_CONNECTION_SECONDS (300 s);
# reuse them only well before that, so a read never meets a closing socket.
REUSE_IDLE_SECONDS = 60.0


def closed(conn: socket.socket) -> bool:
    """Whether the peer closed (or wrote to) an idle connection: either
    way it cannot carry a new request."""
    try:
        return bool(select.select([conn], [], [], 0)[0])
    except (OSError, ValueError):
        return True


def authenticate(conn: socket.socket, secret: bytes | None) -> None:
    """Answer the producer's greeting; raises KVAuthError if the secrets differ."""
    hello = recv_message(conn)
    if not isinstance(hello, ServerHello):
        raise ConnectionError(f"expected ServerHello, got {type(hello).__name__}")
    check_kv_auth(has_secret=secret is not None, producer_requires=hello.auth)
    if secret is None:
        return
    send_message(conn, AuthProof(auth_mac(secret, hello.nonce)))
    reply = recv_message(conn)
    if not isinstance(reply, Ack) or not reply.ok:
        raise KVAuthError(SECRET_REJECTED)


class ProducerRankClient:
    def __init__(
        self, host: str, port: int, timeout: float, secret: bytes | None = None
    ) -> None:
        self.host = host
        self.port = port
        self.timeout = timeout
        self._secret = secret
        # Idle connections with the time they were last used.
        self._idle: queue.SimpleQueue[tuple[socket.socket, float]] = queue.SimpleQueue()

    def close(self) -> None:
        while True:
            try:
                self._idle.get_nowait()[0].close()
            except queue.Empty:
                return

    def _reusable(self) -> socket.socket | None:
        """An idle connection the producer has not closed, if there is one."""
        while True:
            try:
                conn, last_used = self._idle.get_nowait()
            except queue.Empty:
                return None
            if time.monotonic() - last_used < REUSE_IDLE_SECONDS and not closed(conn):
                return conn
            conn.close()

    @contextmanager
    def _connection(self) -> Iterator[socket.socket]:
        conn = self._reusable() or self._open()
        conn.settimeout(self.timeout)
        try:
            yield conn
        except BaseException:
            # The stream may be mid-message: never reuse it.
            conn.close()
            raise
        self._idle.put((conn, time.monotonic()))

    def _open(self) -> socket.socket:
        conn = socket.create_connection((self.host, self.port), self.timeout)
        try:
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            authenticate(conn, self._secret)
        except KVAuthError as exc:
            conn.close()
            raise KVAuthError(f"{exc} at {self.host}:{self.port}") from None
        except BaseException:
            conn.close()
            raise
        return conn

    def _call(self, fn: Callable[[socket.socket], T]) -> T:
        with self._connection() as conn:
            return fn(conn)

    def rank_info(self) -> RankInfo:
        def ask(conn: socket.socket) -> RankInfo:
            send_message(conn, GetRankInfo())
            reply = recv_message(conn)
            if not isinstance(reply, RankInfo):
                raise ConnectionError(f"expected RankInfo, got {type(reply).__name__}")
            return reply

        return self._call(ask)

    def read(
        self,
        transport: KVTransport,
        kv: PagedKVCache,
        request_id: str,
        token: str,
        remote_block_ids: list[int],
        local_block_ids: list[int],
        session: str = "",
    ) -> int:
        request = ReadBlocks(
            request_id, token, remote_block_ids, transport.name, session
        )

        def read(conn: socket.socket) -> int:
            send_message(conn, request)
            return transport.recv_blocks(
                conn, kv, remote_block_ids, local_block_ids, session
            )

        with transport.exclusive(session):
            return self._call(read)

    def hello(self, message: TransportHello) -> TransportWelcome:
        def ask(conn: socket.socket) -> TransportWelcome:
            send_message(conn, message)
            reply = recv_message(conn)
            if not isinstance(reply, TransportWelcome):
                raise ConnectionError(f"expected welcome, got {type(reply).__name__}")
            return reply

        return self._call(ask)

    def release(self, request_id: str, token: str) -> bool:
        def release(conn: socket.socket) -> bool:
            send_message(conn, Release(request_id, token))
            reply = recv_message(conn)
            return isinstance(reply, Ack) and reply.ok

        return self._call(release)


class ProducerClients:
    """One client per producer rank address, created on first use."""

    def __init__(self, timeout: float, secret: bytes | None = None) -> None:
        self.timeout = timeout
        self._secret = secret
        self._clients: dict[tuple[str, int], ProducerRankClient] = {}
        self._lock = threading.Lock()

    def get(self, host: str, port: int) -> ProducerRankClient:
        with self._lock:
            client = self._clients.get((host, port))
            if client is None:
                client = ProducerRankClient(host, port, self.timeout, self._secret)
                self._clients[(host, port)] = client
            return client

    def close(self) -> None:
        with self._lock:
            for client in self._clients.values():
                client.close()
            self._clients.clear()
