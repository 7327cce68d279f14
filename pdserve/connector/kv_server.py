"""Producer rank's side-channel server: rank info, block reads, releases.

One thread per consumer connection; a malformed or hostile frame closes that
connection only. Every connection is greeted first; with a shared KV secret
the peer must prove it (HMAC of a fresh nonce) before anything is served.
Reads are served only for blocks of a live lease whose per-request token the
reader presents.
"""

from __future__ import annotations

import hmac
import secrets
import select
import socket
import threading

from pdserve.connector.leases import LeaseTable
from pdserve.kv_cache import PagedKVCache
from pdserve.log import init_logger
from pdserve.protocol import (
    Ack,
    AuthProof,
    GetRankInfo,
    ProtocolError,
    RankInfo,
    ReadBlocks,
    ReadReply,
    Release,
    ServerHello,
    TransportHello,
    TransportWelcome,
    auth_mac,
    recv_message,
    send_message,
)
from pdserve.threads import start_thread
from pdserve.transport import KVTransport

logger = init_logger(__name__)

IDLE_CONNECTION_SECONDS = 300.0
# An unauthenticated peer holds a server thread at most this long.
AUTH_SECONDS = 10.0
NONCE_BYTES = 32


class AuthRefused(ConnectionError):
    """The peer did not prove knowledge of the KV secret."""


class KVServer:
    def __init__(
        self,
        host: str,
        port: int,
        kv: PagedKVCache,
        info: RankInfo,
        leases: LeaseTable,
        transports: dict[str, KVTransport],
        secret: bytes | None = None,
    ) -> None:
        self.kv = kv
        self.info = info
        self.leases = leases
        self.transports = transports
        self._secret = secret
        self._bytes_sent = 0
        self._stopped = threading.Event()
        self._conns: set[socket.socket] = set()
        # Requests being handled right now; both counters are read by the
        # worker's main thread while server threads update them.
        self._busy = 0
        self._counters_lock = threading.Lock()
        self._listener = socket.create_server((host, port), reuse_port=False)
        self._listener.settimeout(0.5)
        self.port = self._listener.getsockname()[1]
        start_thread(self._accept_loop, f"pdserve-kv-server-{self.port}")

    def close(self) -> None:
        self._stopped.set()
        self._listener.close()
        for conn in list(self._conns):
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def _accept_loop(self) -> None:
        while not self._stopped.is_set():
            try:
                conn, peer = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self._conns.add(conn)
            start_thread(self._serve, "pdserve-kv-conn", conn, peer)

    def _serve(self, conn: socket.socket, peer: tuple) -> None:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with conn:
            try:
                self._greet(conn)
                conn.settimeout(IDLE_CONNECTION_SECONDS)
                while not self._stopped.is_set():
                    message = recv_message(conn)
                    self._add_busy(1)
                    try:
                        self._handle(conn, message)
                    finally:
                        self._add_busy(-1)
            except AuthRefused as exc:
                logger.warning("Refusing KV connection from %s: %s", peer, exc)
            except ProtocolError as exc:
                logger.warning("Closing KV connection from %s: %s", peer, exc)
            except (ConnectionError, TimeoutError, OSError):
                pass
            finally:
                self._conns.discard(conn)

    def _greet(self, conn: socket.socket) -> None:
        """Send the greeting; with a secret, require the peer's proof of it."""
        conn.settimeout(AUTH_SECONDS)
        if self._secret is None:
            send_message(conn, ServerHello(auth=False))
            return
        nonce = secrets.token_bytes(NONCE_BYTES)
        send_message(conn, ServerHello(auth=True, nonce=nonce))
        try:
            proof = recv_message(conn)
        except (ProtocolError, TimeoutError) as exc:
            raise AuthRefused(f"no KV secret proof ({exc or 'timed out'})") from None
        if not isinstance(proof, AuthProof):
            send_message(conn, Ack(ok=False, error="KV secret required"))
            raise AuthRefused(f"no KV secret proof (sent {type(proof).__name__})")
        if not hmac.compare_digest(proof.mac, auth_mac(self._secret, nonce)):
            send_message(conn, Ack(ok=False, error="KV secret rejected"))
            raise AuthRefused("wrong KV secret")
        send_message(conn, Ack(ok=True))

    def _add_busy(self, delta: int) -> None:
        with self._counters_lock:
            self._busy += delta

    def _add_bytes_sent(self, nbytes: int) -> None:
        with self._counters_lock:
            self._bytes_sent += nbytes

    def take_bytes_sent(self) -> int:
        """Bytes served since the last call."""
        with self._counters_lock:
            nbytes, self._bytes_sent = self._bytes_sent, 0
            return nbytes

    def is_busy(self) -> bool:
        """Whether a request is being served or waits to be read."""
        return self._busy > 0 or self.has_pending_input()

    def has_pending_input(self) -> bool:
        """Whether a connection or request waits for a server thread."""
        sockets = [self._listener, *self._conns]
        try:
            return bool(select.select(sockets, [], [], 0)[0])
        except (OSError, ValueError):
            return True  # a socket closed under us: let the threads run

    def _handle(self, conn: socket.socket, message: object) -> None:
        if isinstance(message, GetRankInfo):
            send_message(conn, self.info)
        elif isinstance(message, ReadBlocks):
            self._read(conn, message)
        elif isinstance(message, TransportHello):
            send_message(conn, self._welcome(message))
        elif isinstance(message, Release):
            try:
                released = self.leases.release(message.request_id, message.token)
                send_message(conn, Ack(ok=released))
            except PermissionError as exc:
                send_message(conn, Ack(ok=False, error=str(exc)))
        else:
            raise ProtocolError(f"unexpected message {type(message).__name__}")

    def _welcome(self, hello: TransportHello) -> TransportWelcome:
        transport = self.transports.get(hello.transport)
        if transport is None:
            return TransportWelcome(ok=False, error=f"{hello.transport} not served")
        try:
            return transport.welcome(hello, self.kv)
        except Exception as exc:  # a refusal, never a dead server
            logger.warning("%s session setup failed: %s", hello.transport, exc)
            return TransportWelcome(ok=False, error=str(exc))

    def _read(self, conn: socket.socket, read: ReadBlocks) -> None:
        try:
            # A consumer reads right after the producer answers, but the grant
            # reaches this worker with its next engine step, which a busy or
            # starved machine can delay: wait for it as long as the lease
            # would live. Waiting is not work the worker should wait for.
            self._add_busy(-1)
            try:
                lease = self.leases.wait_for(
                    read.request_id, read.token, self.leases.lease_seconds
                )
            finally:
                self._add_busy(1)
        except (LookupError, PermissionError) as exc:
            send_message(conn, ReadReply(ok=False, error=str(exc)))
            return
        if not set(read.block_ids) <= set(lease.block_ids):
            send_message(
                conn, ReadReply(ok=False, error="blocks outside the request's lease")
            )
            return
        transport = self.transports.get(read.transport)
        if transport is None:
            send_message(
                conn, ReadReply(ok=False, error=f"{read.transport} not served")
            )
            return
        # Counted before any byte leaves: the consumer's release (another
        # thread) must never be accounted before the bytes it released.
        nbytes = self.kv.bytes_per_block() * len(read.block_ids)
        self._add_bytes_sent(nbytes)
        try:
            transport.send_blocks(conn, self.kv, read.block_ids, read.session)
        except BaseException:
            self._add_bytes_sent(-nbytes)
            raise
