"""Consumer side of the KV side channel: talk to one producer rank.

``BlockingClient`` serves the startup handshake (rank info, transport
sessions): short exchanges with one deadline each. ``ProducerLink`` carries
the data path: one connection per producer rank, driven from the engine's own
thread every step (``pump``), never blocking; reads are pipelined on it and
answered in order. Every load has one total deadline.
"""

from __future__ import annotations

import errno
import selectors
import socket
import time
from collections import deque
from dataclasses import dataclass, field

from pdserve.channel import Channel
from pdserve.connector.metadata import LoadSpec
from pdserve.handshake import SECRET_REJECTED, KVAuthError, check_kv_auth
from pdserve.kv_cache import HeadRange, PagedKVCache
from pdserve.lease import Lease
from pdserve.log import init_logger
from pdserve.protocol import (
    MAX_FRAME_BYTES,
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
    recv_message,
    send_message,
)
from pdserve.transport import KVTransport
from pdserve.transport.base import Incoming, layer_sizes

logger = init_logger(__name__)


def authenticate(
    conn: socket.socket, secret: bytes | None, deadline: float | None = None
) -> None:
    """Answer the producer's greeting; raises KVAuthError if the secrets differ."""
    hello = recv_message(conn, deadline=deadline)
    check_greeting(hello, secret)
    if secret is None:
        return
    assert isinstance(hello, ServerHello)
    send_message(conn, AuthProof(auth_mac(secret, hello.nonce)))
    check_auth_reply(recv_message(conn, deadline=deadline))


def check_greeting(hello: Message, secret: bytes | None) -> None:
    if not isinstance(hello, ServerHello):
        raise ConnectionError(f"expected ServerHello, got {type(hello).__name__}")
    check_kv_auth(has_secret=secret is not None, producer_requires=hello.auth)


def check_auth_reply(reply: Message) -> None:
    if not isinstance(reply, Ack) or not reply.ok:
        raise KVAuthError(SECRET_REJECTED)


class BlockingClient:
    """One short-lived exchange at a time with a producer rank (handshakes)."""

    def __init__(
        self, host: str, port: int, timeout: float, secret: bytes | None = None
    ) -> None:
        self.host = host
        self.port = port
        self.timeout = timeout
        self._secret = secret

    def _ask(self, message: Message, expected: type) -> Message:
        deadline = time.monotonic() + self.timeout
        with socket.create_connection((self.host, self.port), self.timeout) as conn:
            try:
                authenticate(conn, self._secret, deadline)
            except KVAuthError as exc:
                raise KVAuthError(f"{exc} at {self.host}:{self.port}") from None
            send_message(conn, message)
            reply = recv_message(conn, deadline=deadline)
        if not isinstance(reply, expected):
            raise ConnectionError(
                f"expected {expected.__name__}, got {type(reply).__name__}"
            )
        return reply

    def rank_info(self) -> RankInfo:
        reply = self._ask(GetRankInfo(), RankInfo)
        assert isinstance(reply, RankInfo)
        return reply

    def hello(self, message: TransportHello) -> TransportWelcome:
        reply = self._ask(message, TransportWelcome)
        assert isinstance(reply, TransportWelcome)
        return reply


@dataclass
class Load:
    """One pull in progress on a link."""

    spec: LoadSpec
    transport: KVTransport
    session: str
    deadline: float
    # Some heads of each block (TP sizes differ): the producer rank's run
    # of heads, and where it goes in ours; None: whole blocks.
    remote_heads: HeadRange = None
    local_heads: HeadRange = None
    # Consumer ranks reading this producer rank's part of the lease.
    releases_needed: int = 1
    started: float = field(default_factory=time.monotonic)
    sent_at: float = 0.0
    incoming: Incoming | None = None
    error: str | None = None
    # The error is the transport's own: its device copy failed (counted
    # towards giving that transport up), not the read or the connection.
    transport_failed: bool = False
    # ...because the producer no longer has the session: it is dead.
    session_lost: bool = False
    nbytes: int = 0
    # Wall-clock times of the TTFT split: the producer's answer, KV in place.
    replied_at: float = 0.0
    done_at: float = 0.0


class LinkState:
    IDLE = "idle"
    CONNECTING = "connecting"
    GREETING = "greeting"
    AUTHENTICATING = "authenticating"
    READY = "ready"


class ProducerLink:
    """The consumer rank's connection to one producer rank's side channel."""

    def __init__(
        self,
        host: str,
        port: int,
        kv: PagedKVCache,
        timeout: float,
        secret: bytes | None = None,
    ) -> None:
        self.address = (host, port)
        self.kv = kv
        self.timeout = timeout
        self._secret = secret
        self.state = LinkState.IDLE
        self.channel: Channel | None = None
        self._selector: selectors.BaseSelector | None = None
        self._connect_deadline = 0.0
        self._waiting: deque[Load] = deque()  # not sent yet
        self._inflight: deque[Load] = deque()  # sent; answers come in order
        self._copying: list[Load] = []  # bytes arriving by device copy
        self._releases: deque[Release] = deque()
        self._finished: list[Load] = []

    # ---- what the worker asks ----

    def submit(self, load: Load) -> None:
        self._waiting.append(load)

    def release(self, lease: Lease, needed: int = 1) -> None:
        self._releases.append(
            Release(lease.request_id, lease.token, lease.prompt_hash, needed)
        )

    def has_releases(self) -> bool:
        return bool(self._releases)

    def drained(self) -> bool:
        """Nothing queued, nothing left in the socket's way out."""
        return not (self._waiting or self._inflight or self._releases) and (
            self.channel is None or self.channel.pending_out == 0
        )

    def busy(self) -> bool:
        return bool(self._waiting or self._inflight or self._copying)

    def pump(self) -> list[Load]:
        """Advance everything that can advance now; the loads that ended."""
        try:
            self._advance()
        except (OSError, ProtocolError, KVAuthError) as exc:
            self._fail_connection(str(exc) or type(exc).__name__)
        self._poll_copies()
        self._check_deadlines()
        self._flush()
        finished, self._finished = self._finished, []
        return finished

    def _flush(self) -> None:
        """Send now what finished loads queued (their releases): the engine
        may not step again once its last waiting request has its KV."""
        if self.state != LinkState.READY or self.channel is None:
            return
        try:
            self._send_queued()
            self.channel.pump_out()
        except OSError as exc:
            self._fail_connection(str(exc))

    def close(self, reason: str = "link closed") -> list[Load]:
        """Close the connection; every load it still had ends failed (and is
        returned: the caller owns reporting it)."""
        self._fail_connection(reason)
        for load in self._copying:
            if load.incoming is not None:
                load.incoming.abort()
            self._finish(load, reason)
        self._copying.clear()
        finished, self._finished = self._finished, []
        return finished

    # ---- connection ----

    def _advance(self) -> None:
        if self.state == LinkState.READY and not self._inflight and self._peer_gone():
            # Closed while idle (the producer restarted, or its idle timeout):
            # nothing was lost, so open a new connection for what waits.
            self._close_channel()
        if self.state == LinkState.IDLE:
            if not (self._waiting or self._releases):
                return
            self._connect()
        if self.state == LinkState.CONNECTING:
            self._finish_connect()
        if self.state in (LinkState.GREETING, LinkState.AUTHENTICATING):
            self._greet()
        if self.state != LinkState.READY:
            return
        assert self.channel is not None
        self._send_queued()
        self.channel.pump_out()
        self._receive()
        self.channel.pump_out()

    def _connect(self) -> None:
        sock = socket.socket(_family(self.address[0]), socket.SOCK_STREAM)
        sock.setblocking(False)
        code = sock.connect_ex(self.address)
        if code not in (0, errno.EINPROGRESS, errno.EWOULDBLOCK, errno.EALREADY):
            sock.close()
            raise ConnectionRefusedError(code, errno.errorcode.get(code, "connect"))
        self.channel = Channel(sock, MAX_FRAME_BYTES)
        self._selector = selectors.DefaultSelector()
        self._selector.register(sock, selectors.EVENT_WRITE)
        self._connect_deadline = time.monotonic() + self.timeout
        self.state = LinkState.CONNECTING

    def _finish_connect(self) -> None:
        assert self.channel is not None and self._selector is not None
        if not self._selector.select(0):
            if time.monotonic() > self._connect_deadline:
                raise TimeoutError("connecting to the producer timed out")
            return
        code = self.channel.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if code:
            raise ConnectionRefusedError(code, errno.errorcode.get(code, "connect"))
        self._selector.close()
        self._selector = None
        self.state = LinkState.GREETING

    def _greet(self) -> None:
        assert self.channel is not None
        self.channel.pump_in()
        while self.state != LinkState.READY:
            message = self.channel.next_message()
            if message is None:
                if time.monotonic() > self._connect_deadline:
                    raise TimeoutError("producer greeting timed out")
                return
            if self.state == LinkState.GREETING:
                check_greeting(message, self._secret)
                assert isinstance(message, ServerHello)
                if self._secret is None:
                    self.state = LinkState.READY
                else:
                    self.channel.send(AuthProof(auth_mac(self._secret, message.nonce)))
                    self.channel.pump_out()
                    self.state = LinkState.AUTHENTICATING
            else:
                check_auth_reply(message)
                self.state = LinkState.READY

    def _peer_gone(self) -> bool:
        assert self.channel is not None
        try:
            self.channel.pump_in()
        except OSError:  # ConnectionError included
            return True
        return False

    def _close_channel(self) -> None:
        if self.channel is not None:
            self.channel.close()
            self.channel = None
        if self._selector is not None:
            self._selector.close()
            self._selector = None
        self.state = LinkState.IDLE

    def _fail_connection(self, reason: str) -> None:
        self._close_channel()
        for load in (*self._inflight, *self._waiting):
            self._finish(load, reason)
        self._inflight.clear()
        self._waiting.clear()
        self._releases.clear()  # those leases end by expiring

    # ---- reads ----

    def _send_queued(self) -> None:
        assert self.channel is not None
        while self._releases:
            self.channel.send(self._releases.popleft())
        while self._waiting:
            load = self._waiting.popleft()
            lease = load.spec.lease
            first, count = load.remote_heads or (0, 0)
            self.channel.send(
                ReadBlocks(
                    request_id=lease.request_id,
                    token=lease.token,
                    prompt_hash=lease.prompt_hash,
                    block_ids=load.spec.remote_block_ids,
                    transport=load.transport.name,
                    session=load.session,
                    head_start=first,
                    head_count=count,
                )
            )
            load.sent_at = time.monotonic()
            logger.debug("pdserve: read of %s sent", lease.request_id)
            self._inflight.append(load)

    def _receive(self) -> None:
        assert self.channel is not None
        while self._inflight:
            load = self._inflight[0]
            if load.incoming is None and not self._accept_reply(load):
                return
            if load.error is None and not self._take_payload(load):
                return
            self._inflight.popleft()
            if load.error is None:
                self._copying.append(load)

    def _accept_reply(self, load: Load) -> bool:
        """Read the ReadReply that answers ``load``; False until it is in."""
        assert self.channel is not None
        self.channel.pump_in()
        reply = self.channel.next_message()
        if reply is None:
            return False
        if not isinstance(reply, ReadReply):
            raise ProtocolError(f"expected ReadReply, got {type(reply).__name__}")
        if not reply.ok:
            # A session the producer no longer has is this transport's failure.
            load.transport_failed = load.session_lost = reply.session_lost
            self._finish(load, f"producer refused the read: {reply.error}")
            self._release(load)  # in case it is granted after all
            return True
        expected = layer_sizes(
            self.kv, len(load.spec.local_block_ids), load.local_heads
        )
        if reply.layer_nbytes != expected:
            raise ProtocolError(
                f"producer announced {reply.layer_nbytes} bytes per layer, "
                f"expected {expected}"
            )
        if (
            reply.hold_seconds
            and time.monotonic() > load.sent_at + reply.hold_seconds / 2
        ):
            # Too late to copy safely within the hold the producer promised.
            self._finish(load, "producer's hold on the blocks ran out")
            self._release(load)
            return True
        load.nbytes = sum(expected)
        load.replied_at = time.time()
        self._start_copy(load)
        return True

    def _start_copy(self, load: Load) -> None:
        try:
            load.incoming = load.transport.receive(
                self.kv,
                load.spec.remote_block_ids,
                load.spec.local_block_ids,
                load.session,
                load.local_heads,
            )
        except (ConnectionError, RuntimeError) as exc:
            if load.transport.name == "tcp":
                raise  # its payload follows on this connection: that must close
            # A GPU-direct read has nothing on this connection, so only this
            # load fails: its session was dropped, or the copy did not start.
            self._copy_failed(load, exc)
            self._release(load)

    def _release(self, load: Load) -> None:
        self.release(load.spec.lease, load.releases_needed)

    def _take_payload(self, load: Load) -> bool:
        """Move payload bytes into the load; False until it has them all."""
        assert self.channel is not None and load.incoming is not None
        while (view := load.incoming.raw_view()) is not None:
            n = self.channel.read_raw_into(view)
            if n:
                load.incoming.on_raw(n)
            if n < len(view):
                return False
        return True

    def _poll_copies(self) -> None:
        still = []
        for load in self._copying:
            assert load.incoming is not None
            try:
                done = load.incoming.poll()
            except Exception as exc:  # a failed device copy: recompute
                self._copy_failed(load, exc)
                continue
            if done:
                load.done_at = time.time()
                self._finish(load, None)
                self._release(load)
            else:
                still.append(load)
        self._copying = still

    def _check_deadlines(self) -> None:
        now = time.monotonic()
        if any(load.deadline < now for load in self._inflight):
            # Mid-answer on a stream: the connection cannot be trusted now.
            self._fail_connection("KV transfer timed out")
        elif self.state != LinkState.READY:
            late = [load for load in self._waiting if load.deadline < now]
            for load in late:
                self._waiting.remove(load)
                self._finish(load, "KV transfer timed out (producer unreachable)")

    def _copy_failed(self, load: Load, exc: Exception) -> None:
        load.transport_failed = True
        self._finish(load, f"{load.transport.name} copy failed: {exc}")

    def _finish(self, load: Load, error: str | None) -> None:
        load.error = error
        self._finished.append(load)


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET
