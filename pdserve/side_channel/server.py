"""Producer rank's side-channel server: rank info, block reads, releases.

Driven from the engine's own thread: the worker calls ``step`` every engine
step (its ``get_finished``), which accepts, reads, answers and moves bytes
without ever blocking. vLLM's CPU workers spin between steps and keep the
GIL from other threads of their process for minutes, so serving reads from a
thread of our own could starve; the engine keeps stepping while any lease is
held, so every read is served within a step or two. While the engine is
idle (no step for 50 ms) a small thread pumps control messages only:
accepting, authenticating, rank info, session hellos and refusing reads of
unknown or ended leases. KV only ever moves on the engine's thread. Transport sessions
are set up on a thread of their own (session_setup.py), never in a pump.

Hostile peers cost little. Connections that have not proven the KV secret
have their own small budget (the oldest of them gives way to a newer one),
may send only tiny frames and must prove it within one short deadline, so
they never take a consumer's place among the proven ones; each peer address
may hold only so many. Without a secret no connection is proven: each peer
address is capped and idle ones close soon. Reads are checked (token MAC,
prompt hash, block ids) before anything is pinned, and a malformed frame
closes that connection only.
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

from pdserve.kv_cache import PagedKVCache
from pdserve.lease import token_valid
from pdserve.log import init_logger
from pdserve.side_channel.channel import Channel
from pdserve.side_channel.leases import LeaseTable, ReadRefused, Verdict
from pdserve.side_channel.protocol import (
    MAX_FRAME_BYTES,
    MAX_READ_BLOCKS,
    MAX_UNAUTHENTICATED_FRAME_BYTES,
    NONCE_BYTES,
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
    ServerProof,
    TransportHello,
    TransportWelcome,
    client_mac,
    server_mac,
    session_macs,
)
from pdserve.side_channel.session_setup import SessionSetups, Setup
from pdserve.timing import (
    AUTH_SECONDS,
    ENGINE_IDLE_SECONDS,
    GRANT_WAIT_SECONDS,
    GRANT_WAIT_STEPS,
    IDLE_CONNECTION_SECONDS,
    IDLE_POLL_SECONDS,
    OPEN_IDLE_CONNECTION_SECONDS,
    REFUSAL_LOG_SECONDS,
    SESSION_WAIT_SECONDS,
)
from pdserve.transport import KVTransport
from pdserve.transport.base import Outgoing, SessionLost, layer_sizes

logger = init_logger(__name__)

# Connections that proved the KV secret (without a secret: all of them).
MAX_CONNECTIONS = 256
# With a secret: connections that have not proven it yet, apart from those.
MAX_UNPROVEN_CONNECTIONS = 32
# Of one peer address: connections in all, and of those not proven yet.
MAX_CONNECTIONS_PER_PEER = 64
MAX_UNPROVEN_PER_PEER = 16
# Requests one connection may have waiting for their answers.
MAX_QUEUED_PER_CONNECTION = 1024
# ...naming at most this many blocks in all, and no new request is read
# from a connection that has this many answer bytes not yet taken.
MAX_QUEUED_BLOCKS_PER_CONNECTION = MAX_READ_BLOCKS
MAX_PENDING_OUT_BYTES = 8 * 1024 * 1024


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
    host: str  # the peer's address, whose connections are capped
    peer: object
    opened_at: float
    last_active: float
    nonce: bytes | None  # set while the peer still owes its proof
    proven: bool = False  # it proved the KV secret
    # Answers in the order their requests came: messages, reads, or
    # session setups whose welcome has yet to be made.
    queue: deque[Message | _Read | Setup] = field(default_factory=deque)
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
        clock=time.monotonic,
    ) -> None:
        self.kv = kv
        self.info = info
        self.leases = leases
        self.transports = transports
        self._node_key = node_key
        self._secret = secret
        self._clock = clock  # connection and read deadlines
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
        self._refusals = 0
        self._next_refusal_log = 0.0
        # Sessions whose setup runs now: reads naming them wait.
        self._setting_up: dict[tuple[str, str], Setup] = {}
        self._setups = SessionSetups(
            kv, f"pdserve-kv-setup-{self.port}", self._setup_finished
        )
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
        self._setups.close()

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
            refusal = self._admit(_host(peer))
            if refusal is not None:
                self._note_refusal(peer, refusal)
                sock.close()
                continue
            self._open(sock, peer)

    def _admit(self, host: str) -> str | None:
        """Why a new connection from ``host`` is refused, or None. With a
        secret it joins the unproven, the oldest of which gives way when
        they are full: to keep a newcomer out a flood must outpace a
        consumer's proof (one round trip), not merely hold its places."""
        conns = list(self._conns.values())
        if sum(c.host == host for c in conns) >= MAX_CONNECTIONS_PER_PEER:
            return "too many connections from this address"
        if self._secret is None:
            full = len(conns) >= MAX_CONNECTIONS
            return "too many connections" if full else None
        unproven = [c for c in conns if not c.proven]
        if sum(c.host == host for c in unproven) >= MAX_UNPROVEN_PER_PEER:
            return "too many connections from this address owe their proof"
        if len(unproven) >= MAX_UNPROVEN_CONNECTIONS:
            oldest = min(unproven, key=lambda c: c.opened_at)
            self._note_refusal(oldest.peer, "no proof yet, and newer peers wait")
            self._drop(oldest)
        return None

    def _note_refusal(self, peer: object, reason: str) -> None:
        self._refusals += 1
        now = time.monotonic()
        if now >= self._next_refusal_log:
            logger.warning(
                "Refusing KV connection from %s: %s (%d refused since the last "
                "such warning)",
                peer,
                reason,
                self._refusals,
            )
            self._refusals = 0
            self._next_refusal_log = now + REFUSAL_LOG_SECONDS

    def _open(self, sock: socket.socket, peer: object) -> None:
        now = self._clock()
        channel = Channel(sock, MAX_UNAUTHENTICATED_FRAME_BYTES)
        nonce = secrets.token_bytes(NONCE_BYTES) if self._secret else None
        conn = _Conn(channel.fileno(), channel, _host(peer), peer, now, now, nonce)
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
        for answer in conn.queue:
            if isinstance(answer, Setup):
                answer.mark_dropped()  # the setup thread gives its session up
        conn.channel.close()

    def _read_from(self, conn: _Conn) -> None:
        if conn.channel.pending_out > MAX_PENDING_OUT_BYTES:
            return  # it takes its answers first
        try:
            conn.channel.pump_in()
            while (message := conn.channel.next_message()) is not None:
                conn.last_active = self._clock()
                self._handle(conn, message)
        except AuthRefused as exc:
            self._note_refusal(conn.peer, str(exc))
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
            conn.queue.append(_Read(message, self.leases.step, self._clock()))
        elif isinstance(message, Release):
            self._release(message)
        elif isinstance(message, GetRankInfo):
            conn.queue.append(self.info)
        elif isinstance(message, TransportHello):
            conn.queue.append(self._hello(conn, message))
        else:
            raise ProtocolError(f"unexpected message {type(message).__name__}")

    def _authenticate(self, conn: _Conn, message: Message) -> None:
        """Check the client's proof, then prove the secret in turn: from
        then on every frame both ways is tagged under this connection's keys."""
        secret, nonce = self._secret, conn.nonce
        assert secret is not None and nonce is not None
        if not isinstance(message, AuthProof):
            self._refuse_auth(conn, "KV secret required")
            raise AuthRefused(f"no KV secret proof (sent {type(message).__name__})")
        if len(message.nonce) != NONCE_BYTES or not hmac.compare_digest(
            message.mac, client_mac(secret, nonce, message.nonce)
        ):
            self._refuse_auth(conn, "KV secret rejected")
            raise AuthRefused("wrong KV secret")
        if sum(c.proven for c in self._conns.values()) >= MAX_CONNECTIONS:
            self._refuse_auth(conn, "too many connections")
            raise AuthRefused("too many connections")
        conn.channel.send(ServerProof(server_mac(secret, nonce, message.nonce)))
        conn.channel.secure(*session_macs(secret, nonce, message.nonce, server=True))
        conn.nonce = None
        conn.proven = True
        conn.channel.frames.max_frame = MAX_FRAME_BYTES

    def _refuse_auth(self, conn: _Conn, error: str) -> None:
        conn.channel.send(Ack(ok=False, error=error))
        conn.channel.pump_out()

    def _release(self, message: Release) -> None:
        if token_valid(
            self._node_key, message.request_id, message.prompt_hash, message.token
        ):
            self.leases.release(
                message.request_id,
                message.prompt_hash,
                message.needed,
                message.consumer,
            )

    def _hello(self, conn: _Conn, hello: TransportHello) -> Message | Setup:
        """A refusal now, or the session's setup (its welcome leaves, in
        this connection's order, once the setup thread has made it)."""
        transport = self.transports.get(hello.transport)
        if transport is None:
            return TransportWelcome(ok=False, error=f"{hello.transport} not served")
        if transport.needs_secret and not conn.proven:
            # ipc maps the whole KV cache for the peer; an NCCL pair holds
            # a GPU for it through a store anyone could join.
            return TransportWelcome(
                ok=False, error=f"{hello.transport} needs a KV secret"
            )
        setup = Setup(hello, transport)
        if setup.key in self._setting_up:
            return TransportWelcome(ok=False, error="session already being set up")
        if not self._setups.submit(setup):
            return TransportWelcome(ok=False, error="too many sessions being set up")
        self._setting_up[setup.key] = setup
        return setup

    def _setup_finished(self, setup: Setup) -> None:
        """The setup thread is done with ``setup``: reads of it go ahead."""
        with self._lock:
            if self._setting_up.get(setup.key) is setup:
                del self._setting_up[setup.key]

    # ---- answers, in order, as far as they can go now ----

    def _progress(self, control_only: bool = False) -> None:
        now = self._clock()
        for conn in list(self._conns.values()):
            sent = conn.channel.bytes_sent
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
            if conn.channel.bytes_sent != sent:
                conn.last_active = now  # the peer takes its answers
            if conn.nonce is not None and now > conn.opened_at + AUTH_SECONDS:
                self._note_refusal(conn.peer, "no proof in time")
                self._drop(conn)
            elif self._idle(conn, now):
                self._drop(conn)

    def _idle(self, conn: _Conn, now: float) -> bool:
        """No request waits, and for too long the peer has neither asked
        nor taken an answer's byte (a payload being taken keeps it)."""
        if conn.queue:
            return False  # each waits a bounded time (a grant, a setup)
        limit = IDLE_CONNECTION_SECONDS if conn.proven else OPEN_IDLE_CONNECTION_SECONDS
        return now - conn.last_active > limit

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
            if isinstance(head, Setup):
                if head.welcome is None:
                    return  # the setup thread is still making it
                conn.channel.send(head.welcome)
                head.mark_sent()
            elif not isinstance(head, _Read):
                conn.channel.send(head)
            elif control_only and not self._refused_now(conn, head):
                return  # a real lease's read: the engine's thread serves it
            elif not control_only and not self._start_read(conn, head):
                return  # its grant (or its session) is not ready yet
            conn.queue.popleft()
            if isinstance(head, _Read):
                conn.queued_blocks -= len(head.message.block_ids)

    def _refused_now(self, conn: _Conn, read: _Read) -> bool:
        """Refuse a read that opens no lease here without the engine: its
        token is not ours, or its lease ended. The engine steps while it
        holds a lease, not after: a read of an ended lease left for its
        thread would wait for a step that never comes. A read whose grant
        has not come yet is left to the engine's thread: this thread also
        runs during a long engine step, and the grant comes with the next."""
        message = read.message
        try:
            self._check(message)
            self._session_waits(read)
            self.leases.open_read(
                message.request_id, message.prompt_hash, message.block_ids, pin=False
            )
        except ReadRefused as exc:
            self._refuse(conn, read.message, exc)
            return True
        return False

    def _session_waits(self, read: _Read) -> bool:
        """Whether ``read`` names a session still being set up (it waits,
        not long); one no setup knows is the transport's to refuse."""
        key = (read.message.transport, read.message.session)
        if key not in self._setting_up:
            return False
        if self._clock() - read.arrived_at > SESSION_WAIT_SECONDS:
            raise ReadRefused(f"{key[0]} session {key[1]!r} not set up in time")
        return True

    def _refuse(self, conn: _Conn, message: ReadBlocks, exc: ReadRefused) -> None:
        logger.debug("pdserve: refusing read of %s: %s", message.request_id, exc)
        self._refused += 1
        conn.channel.send(ReadReply(ok=False, error=str(exc)))

    def _start_read(self, conn: _Conn, read: _Read) -> bool:
        """Start answering ``read``; False while it waits for its grant."""
        message = read.message
        try:
            transport = self._check(message)
            if self._session_waits(read):
                return False
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
            or self._clock() - read.arrived_at > GRANT_WAIT_SECONDS
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


def _host(peer: object) -> str:
    """The address part of an accepted peer's (address, port, ...)."""
    if isinstance(peer, tuple) and peer:
        return str(peer[0])
    return str(peer)
