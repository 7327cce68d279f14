"""Producer rank's side-channel server: rank info, block reads, releases.

Driven from the engine's own thread: the worker calls ``step`` every engine
step (its ``get_finished``), which accepts, reads, answers and moves bytes
without ever blocking. vLLM's CPU workers spin between steps and keep the
GIL from other threads of their process for minutes, so serving reads from a
thread of our own could starve; the engine keeps stepping while any lease is
held, so every read is served within a step or two. While the engine is
idle (no step for 50 ms) a small thread pumps control messages only:
accepting, authenticating, rank info, session hellos and refusing reads of
unknown leases. KV only ever moves on the engine's thread.

Hostile peers cost little: connections are capped, a peer that has not
proven the KV secret may send only tiny frames and must finish the exchange
within one deadline, reads are checked (token MAC, prompt hash, block ids)
before anything is pinned, and a malformed frame closes that connection only.
"""

from __future__ import annotations

import hmac
import secrets
import selectors
import socket
import threading
import time
from collections import deque
from dataclasses import dataclass, field

from pdserve.channel import Channel
from pdserve.connector.leases import LeaseTable, ReadRefused, Verdict
from pdserve.kv_cache import PagedKVCache
from pdserve.lease import token_valid
from pdserve.log import init_logger
from pdserve.protocol import (
    MAX_FRAME_BYTES,
    MAX_READ_BLOCKS,
    MAX_UNAUTHENTICATED_FRAME_BYTES,
    Ack,
    AuthProof,
    GetRankInfo,
    Message,
    ProtocolError,
    RankInfo,
    ReadBlocks,
    ReadReply,
    Release,
    ServerHello,
    TransportHello,
    TransportWelcome,
    auth_mac,
    encode_frame,
)
from pdserve.transport import KVTransport
from pdserve.transport.base import Outgoing, SessionLost, layer_sizes

logger = init_logger(__name__)

MAX_CONNECTIONS = 256
# Requests one connection may have waiting for their answers.
MAX_QUEUED_PER_CONNECTION = 1024
# ...naming at most this many blocks in all, and no new request is read
# from a connection that has this many answer bytes not yet taken.
MAX_QUEUED_BLOCKS_PER_CONNECTION = MAX_READ_BLOCKS
MAX_PENDING_OUT_BYTES = 8 * 1024 * 1024
IDLE_CONNECTION_SECONDS = 300.0
# An unauthenticated peer holds a connection at most this long in all.
AUTH_SECONDS = 10.0
NONCE_BYTES = 32
# A read that overtook its lease's grant waits this many engine steps (the
# grant comes with the next one), and never longer than this.
GRANT_WAIT_STEPS = 4
GRANT_WAIT_SECONDS = 10.0
# Without an engine step for this long the idle thread pumps instead.
ENGINE_IDLE_SECONDS = 0.05
IDLE_POLL_SECONDS = 0.005


class AuthRefused(ConnectionError):
    """The peer did not prove knowledge of the KV secret."""


@dataclass
class _Read:
    """A read waiting for its turn on its connection (answers keep order)."""

    message: ReadBlocks
    arrived_step: int
    arrived_at: float


@dataclass
class _Conn:
    fd: int
    channel: Channel
    peer: object
    nonce: bytes | None  # set while the peer still owes its proof
    deadline: float
    last_active: float
    # Answers in the order their requests came: bytes, or reads.
    queue: deque[bytes | _Read] = field(default_factory=deque)
    # The read whose payload is being queued on the channel.
    streaming: tuple[str, Outgoing] | None = None
    queued_blocks: int = 0


class KVServer:
    def __init__(
        self,
        host: str,
        port: int,
        kv: PagedKVCache,
        info: RankInfo,
        leases: LeaseTable,
        transports: dict[str, KVTransport],
        node_key: bytes,
        secret: bytes | None = None,
    ) -> None:
        self.kv = kv
        self.info = info
        self.leases = leases
        self.transports = transports
        self._node_key = node_key
        self._secret = secret
        self._bytes_sent = 0
        self._refused = 0
        self._conns: dict[int, _Conn] = {}
        self._lock = threading.Lock()
        self._selector = selectors.DefaultSelector()
        self._listener = socket.create_server((host, port))
        self._listener.setblocking(False)
        self._selector.register(self._listener, selectors.EVENT_READ, None)
        self.port = self._listener.getsockname()[1]
        self._last_step = 0.0
        self._stopped = threading.Event()
        threading.Thread(
            target=self._idle_loop, name=f"pdserve-kv-idle-{self.port}", daemon=True
        ).start()

    # ---- who drives it ----

    def step(self) -> None:
        """Called on the engine's thread every step."""
        self._last_step = time.monotonic()
        self.leases.tick()
        self.pump()

    def _idle_loop(self) -> None:
        while not self._stopped.wait(IDLE_POLL_SECONDS):
            if time.monotonic() - self._last_step < ENGINE_IDLE_SECONDS:
                continue
            try:
                self.pump(IDLE_POLL_SECONDS, control_only=True)
            except Exception:  # this thread must outlive any bug
                logger.exception("pdserve KV server: idle pump failed")

    def pump(self, timeout: float = 0.0, control_only: bool = False) -> None:
        """``control_only``: answer everything but reads of real leases and
        payloads, which wait for the engine's thread."""
        with self._lock:
            if self._stopped.is_set():
                return
            for key, _ in self._selector.select(timeout):
                if key.data is None:
                    self._accept()
                else:
                    self._read_from(key.data)
            self._progress(control_only)

    def close(self) -> None:
        with self._lock:
            self._stopped.set()
            for conn in list(self._conns.values()):
                self._drop(conn)
            self._selector.close()
            self._listener.close()

    # ---- connections ----

    def _accept(self) -> None:
        while True:
            try:
                sock, peer = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # out of fds: refuse this one, keep serving
                logger.warning("pdserve KV server: accept failed: %s", exc)
                return
            if len(self._conns) >= MAX_CONNECTIONS:
                logger.warning("Refusing KV connection from %s: too many", peer)
                sock.close()
                continue
            self._open(sock, peer)

    def _open(self, sock: socket.socket, peer: object) -> None:
        now = time.monotonic()
        channel = Channel(sock, MAX_UNAUTHENTICATED_FRAME_BYTES)
        nonce = secrets.token_bytes(NONCE_BYTES) if self._secret else None
        conn = _Conn(channel.fileno(), channel, peer, nonce, now + AUTH_SECONDS, now)
        channel.send(ServerHello(auth=nonce is not None, nonce=nonce or b""))
        if nonce is None:
            channel.frames.max_frame = MAX_FRAME_BYTES
        self._conns[conn.fd] = conn
        self._selector.register(sock, selectors.EVENT_READ, conn)

    def _drop(self, conn: _Conn) -> None:
        if self._conns.get(conn.fd) is not conn:
            return
        del self._conns[conn.fd]
        self._selector.unregister(conn.channel.sock)
        if conn.streaming is not None:
            request_id, outgoing = conn.streaming
            outgoing.abort()
            self.leases.close_read(request_id)
        conn.channel.close()

    def _read_from(self, conn: _Conn) -> None:
        if conn.channel.pending_out > MAX_PENDING_OUT_BYTES:
            return  # it takes its answers first
        try:
            conn.channel.pump_in()
            while (message := conn.channel.next_message()) is not None:
                conn.last_active = time.monotonic()
                self._handle(conn, message)
        except AuthRefused as exc:
            logger.warning("Refusing KV connection from %s: %s", conn.peer, exc)
            self._drop(conn)
        except ProtocolError as exc:
            logger.warning("Closing KV connection from %s: %s", conn.peer, exc)
            self._drop(conn)
        except OSError:  # ConnectionError included: the peer went away
            self._drop(conn)
        except Exception:  # a bug costs this connection, never the server
            logger.exception("Closing KV connection from %s", conn.peer)
            self._drop(conn)

    # ---- requests ----

    def _handle(self, conn: _Conn, message: Message) -> None:
        if conn.nonce is not None:
            return self._authenticate(conn, message)
        if len(conn.queue) >= MAX_QUEUED_PER_CONNECTION:
            raise ProtocolError("too many requests waiting on one connection")
        if isinstance(message, ReadBlocks):
            conn.queued_blocks += len(message.block_ids)
            if conn.queued_blocks > MAX_QUEUED_BLOCKS_PER_CONNECTION:
                raise ProtocolError("too many blocks asked for on one connection")
            conn.queue.append(_Read(message, self.leases.step, time.monotonic()))
        elif isinstance(message, Release):
            self._release(message)
        elif isinstance(message, GetRankInfo):
            conn.queue.append(_encoded(self.info))
        elif isinstance(message, TransportHello):
            self._greet_session(conn, message)
        else:
            raise ProtocolError(f"unexpected message {type(message).__name__}")

    def _authenticate(self, conn: _Conn, message: Message) -> None:
        assert self._secret is not None and conn.nonce is not None
        if not isinstance(message, AuthProof):
            conn.channel.send(Ack(ok=False, error="KV secret required"))
            conn.channel.pump_out()
            raise AuthRefused(f"no KV secret proof (sent {type(message).__name__})")
        if not hmac.compare_digest(message.mac, auth_mac(self._secret, conn.nonce)):
            conn.channel.send(Ack(ok=False, error="KV secret rejected"))
            conn.channel.pump_out()
            raise AuthRefused("wrong KV secret")
        conn.nonce = None
        conn.channel.frames.max_frame = MAX_FRAME_BYTES
        conn.channel.send(Ack(ok=True))

    def _release(self, message: Release) -> None:
        if token_valid(
            self._node_key, message.request_id, message.prompt_hash, message.token
        ):
            self.leases.release(message.request_id, message.prompt_hash, message.needed)

    def _greet_session(self, conn: _Conn, hello: TransportHello) -> None:
        """Answer a transport hello now (setting up a session comes before
        any read on it), then let the transport finish with the consumer."""
        welcome = self._welcome(hello)
        conn.queue.append(_encoded(welcome))
        self._answer(conn)
        conn.channel.pump_out()
        transport = self.transports.get(hello.transport)
        if welcome.ok and transport is not None:
            try:
                transport.after_welcome(hello.session)
            except Exception as exc:  # the consumer falls back
                logger.warning("%s session setup failed: %s", hello.transport, exc)
                transport.close_session(hello.session)

    def _welcome(self, hello: TransportHello) -> TransportWelcome:
        transport = self.transports.get(hello.transport)
        if transport is None:
            return TransportWelcome(ok=False, error=f"{hello.transport} not served")
        if hello.transport == "nccl" and self._secret is None:
            # Setting up an NCCL pair holds this engine until the peer joins,
            # through a store anyone could join: only for proven peers.
            return TransportWelcome(ok=False, error="nccl needs a KV secret")
        try:
            return transport.welcome(hello, self.kv)
        except Exception as exc:  # a refusal, never a dead server
            logger.warning("%s session setup failed: %s", hello.transport, exc)
            return TransportWelcome(ok=False, error=str(exc))

    # ---- answers, in order, as far as they can go now ----

    def _progress(self, control_only: bool = False) -> None:
        now = time.monotonic()
        for conn in list(self._conns.values()):
            try:
                self._answer(conn, control_only)
                conn.channel.pump_out()
            except OSError:
                self._drop(conn)
                continue
            except Exception:  # a bug costs this connection, never the engine
                logger.exception("Closing KV connection from %s", conn.peer)
                self._drop(conn)
                continue
            if conn.nonce is not None and now > conn.deadline:
                logger.warning(
                    "Closing KV connection from %s: no proof in time", conn.peer
                )
                self._drop(conn)
            elif now - conn.last_active > IDLE_CONNECTION_SECONDS and not conn.queue:
                self._drop(conn)

    def _answer(self, conn: _Conn, control_only: bool = False) -> None:
        while True:
            if conn.streaming is not None:
                if control_only:
                    return
                request_id, outgoing = conn.streaming
                if not outgoing.advance():
                    return
                conn.streaming = None
                self.leases.close_read(request_id)
            if not conn.queue:
                return
            head = conn.queue[0]
            if isinstance(head, bytes):
                conn.channel.send_raw(head)
            elif control_only and not self._refused_now(conn, head):
                return  # a real lease's read: the engine's thread serves it
            elif not control_only and not self._start_read(conn, head):
                return  # its grant has not arrived yet
            conn.queue.popleft()
            if isinstance(head, _Read):
                conn.queued_blocks -= len(head.message.block_ids)

    def _refused_now(self, conn: _Conn, read: _Read) -> bool:
        """Refuse a read that opens no lease here without the engine."""
        try:
            self._check(read.message)
        except ReadRefused as exc:
            self._refuse(conn, read.message, exc)
            return True
        return False

    def _refuse(self, conn: _Conn, message: ReadBlocks, exc: ReadRefused) -> None:
        logger.debug("pdserve: refusing read of %s: %s", message.request_id, exc)
        self._refused += 1
        conn.channel.send(ReadReply(ok=False, error=str(exc)))

    def _start_read(self, conn: _Conn, read: _Read) -> bool:
        """Start answering ``read``; False while it waits for its grant."""
        message = read.message
        try:
            transport = self._check(message)
            if (
                self.leases.open_read(
                    message.request_id, message.prompt_hash, message.block_ids
                )
                is Verdict.NOT_YET_GRANTED
            ):
                if not self._grant_overdue(read):
                    return False
                raise ReadRefused(f"no lease for request {message.request_id}")
        except ReadRefused as exc:
            self._refuse(conn, message, exc)
            return True
        try:
            outgoing = transport.serve(
                conn.channel,
                self.kv,
                list(message.block_ids),
                message.session,
                message.heads,
            )
        except Exception as exc:
            self.leases.close_read(message.request_id)
            logger.warning("pdserve: serving %s failed: %s", message.request_id, exc)
            conn.channel.send(
                ReadReply(
                    ok=False,
                    error=f"{transport.name}: {exc}",
                    session_lost=isinstance(exc, SessionLost),
                )
            )
            return True
        logger.debug(
            "pdserve: serving %d blocks of %s over %s",
            len(message.block_ids),
            message.request_id,
            transport.name,
        )
        self._bytes_sent += sum(
            layer_sizes(self.kv, len(message.block_ids), message.heads)
        )
        if hold := transport.hold_seconds():
            self.leases.hold(message.request_id, hold)
        if not outgoing.advance():
            conn.streaming = (message.request_id, outgoing)
        else:
            self.leases.close_read(message.request_id)
        return True

    def _check(self, read: ReadBlocks) -> KVTransport:
        if not token_valid(
            self._node_key, read.request_id, read.prompt_hash, read.token
        ):
            raise ReadRefused(f"unknown lease {read.request_id!r}")
        transport = self.transports.get(read.transport)
        if transport is None:
            raise ReadRefused(f"{read.transport} not served")
        if read.heads is not None:
            self._check_heads(read.heads, transport)
        return transport

    def _check_heads(self, heads: tuple[int, int], transport: KVTransport) -> None:
        first, count = heads
        if not transport.moves_heads:
            raise ReadRefused(f"{transport.name} moves whole blocks only")
        if self.kv.head_dims is None:
            raise ReadRefused("this rank cannot serve some heads of its blocks")
        if first + count > self.kv.num_heads:
            raise ReadRefused(f"heads {first}..{first + count} of {self.kv.num_heads}")

    def _grant_overdue(self, read: _Read) -> bool:
        return (
            self.leases.step - read.arrived_step > GRANT_WAIT_STEPS
            or time.monotonic() - read.arrived_at > GRANT_WAIT_SECONDS
        )

    # ---- for the worker's stats ----

    def take_counters(self) -> tuple[int, int]:
        """Bytes served and reads refused since the last call."""
        with self._lock:
            sent, refused = self._bytes_sent, self._refused
            self._bytes_sent = self._refused = 0
            return sent, refused

    def is_idle(self) -> bool:
        """No request waits for an answer and no payload is in flight."""
        with self._lock:
            return not any(c.queue or c.streaming for c in self._conns.values())


def _encoded(message: Message) -> bytes:
    return encode_frame(message)
