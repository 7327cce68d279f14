"""Consumer side of the KV side channel: talk to one producer rank.

``BlockingClient`` serves the startup handshake (rank info, transport
sessions): short exchanges with one deadline each. ``ProducerLink`` carries
the data path: one connection per producer rank, driven from the engine's own
thread every step (``pump``), never blocking; reads are pipelined on it and
answered in order. With a KV secret both check that the producer proves it
too, and every frame and payload it sends (protocol.py).

Deadlines: a read has ``timeout`` from when its answer is the one the link
waits for (it was sent, and the reads before it were answered): a read
queued behind others is not charged for their time. A load that cannot even
be sent (no connection) fails at its own deadline. A read that times out
fails alone: the connection closes (its answer may be half in), and the
reads sent after it go again on a new connection, each at most once (a
producer that stopped answering fails them all within twice the timeout).
Releases outlive a connection: those not known to have arrived go again on
the next one (the producer counts each consumer rank's release once).

A link never decides that a lease ends: it reports each load's outcome to
the load's owner (a ``Pull``), which sends the release through ``release``.
"""

from __future__ import annotations

import errno
import hmac
import secrets
import selectors
import socket
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Protocol

from pdserve.channel import Channel
from pdserve.connector.metadata import LoadSpec
from pdserve.handshake import (
    PRODUCER_UNPROVEN,
    SECRET_REJECTED,
    KVAuthError,
    check_kv_auth,
)
from pdserve.kv_cache import HeadRange, PagedKVCache
from pdserve.lease import Lease
from pdserve.log import init_logger
from pdserve.protocol import (
    MAX_FRAME_BYTES,
    NONCE_BYTES,
    Ack,
    AuthProof,
    GetRankInfo,
    Message,
    PayloadEnd,
    ProtocolError,
    RankInfo,
    ReadBlocks,
    ReadReply,
    Release,
    ServerHello,
    ServerProof,
    StreamMac,
    TransportHello,
    TransportWelcome,
    client_mac,
    recv_message,
    send_message,
    server_mac,
    session_macs,
)
from pdserve.timing import (
    RECONNECT_SECONDS,
    RELEASE_CONFIRM_SECONDS,
    RELEASE_KEEP_SECONDS,
)
from pdserve.transport import KVTransport
from pdserve.transport.base import Incoming, layer_sizes

logger = init_logger(__name__)

# A read goes again on a new connection at most this often after the one it
# was sent on broke.
MAX_RESENDS = 1
# Releases waiting for a connection, this many at most.
MAX_KEPT_RELEASES = 4096

MacPair = tuple[StreamMac, StreamMac]


def authenticate(
    conn: socket.socket, secret: bytes | None, deadline: float | None = None
) -> MacPair | None:
    """Answer the producer's greeting and check its proof; raises
    KVAuthError if the secrets differ. With a secret: the tags of what this
    side sends and receives from now on."""
    hello = recv_message(conn, deadline=deadline)
    check_greeting(hello, secret)
    if secret is None:
        return None
    assert isinstance(hello, ServerHello)
    proof, nonce = prove(secret, hello.nonce)
    send_message(conn, proof)
    reply = recv_message(conn, deadline=deadline)
    return check_server_proof(reply, secret, hello.nonce, nonce)


def check_greeting(hello: Message, secret: bytes | None) -> None:
    if not isinstance(hello, ServerHello):
        raise ConnectionError(f"expected ServerHello, got {type(hello).__name__}")
    check_kv_auth(has_secret=secret is not None, producer_requires=hello.auth)
    if secret is not None and len(hello.nonce) != NONCE_BYTES:
        raise ProtocolError(f"producer's nonce has {len(hello.nonce)} bytes")


def prove(secret: bytes, server_nonce: bytes) -> tuple[AuthProof, bytes]:
    """Our proof for the producer's nonce, and our own nonce in it."""
    nonce = secrets.token_bytes(NONCE_BYTES)
    return AuthProof(client_mac(secret, server_nonce, nonce), nonce), nonce


def check_server_proof(
    reply: Message, secret: bytes, server_nonce: bytes, client_nonce: bytes
) -> MacPair:
    if isinstance(reply, Ack) and not reply.ok:
        if reply.error.startswith("KV secret"):
            raise KVAuthError(SECRET_REJECTED)
        # Not ConnectionRefusedError: the producer is there (and busy).
        raise ConnectionError(f"producer refused: {reply.error[:200]}")
    expected = server_mac(secret, server_nonce, client_nonce)
    if not isinstance(reply, ServerProof) or not hmac.compare_digest(
        reply.mac, expected
    ):
        raise KVAuthError(PRODUCER_UNPROVEN)
    return session_macs(secret, server_nonce, client_nonce, server=False)


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
                macs = authenticate(conn, self._secret, deadline)
            except KVAuthError as exc:
                raise KVAuthError(f"{exc} at {self.host}:{self.port}") from None
            sending, receiving = macs or (None, None)
            send_message(conn, message, sending)
            reply = recv_message(conn, deadline=deadline, mac=receiving)
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


class LoadOwner(Protocol):
    """Who a load reports to (``Pull``), from inside the link's pump."""

    def copying(self, load: Load) -> None:
        """Its answer came: its bytes are being put in place."""

    def ended(self, load: Load) -> None:
        """It ended, ``load.error`` saying how (None: its KV is in place)."""


@dataclass
class Load:
    """One producer rank's part of a pull, in progress on a link."""

    spec: LoadSpec
    transport: KVTransport
    session: str
    # Until it is sent: past this it fails (the producer is unreachable).
    deadline: float
    # Some heads of each block (TP sizes differ): the producer rank's run
    # of heads, and where it goes in ours; None: whole blocks.
    remote_heads: HeadRange = None
    local_heads: HeadRange = None
    # Consumer ranks reading this producer rank's part of the lease.
    releases_needed: int = 1
    producer_rank: int = 0
    owner: LoadOwner | None = None
    started: float = field(default_factory=time.monotonic)
    sent_at: float = 0.0
    # Since when its answer is the one its link waits for: its timeout runs.
    answer_since: float = 0.0
    # Times it was sent again after its connection broke.
    resends: int = 0
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


@dataclass
class _Kept:
    """A release the link keeps until it is known to have arrived."""

    release: Release
    queued_at: float
    sent_at: float = 0.0
    # Reads sent on the connection before it: the answer to the next one
    # proves the producer read it.
    reads_before: int = 0


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
        consumer_id: str = "",
        clock=time.monotonic,
    ) -> None:
        self.address = (host, port)
        self.kv = kv
        self.timeout = timeout
        self._secret = secret
        # Who releases (the producer counts each consumer rank once).
        self.consumer_id = consumer_id or secrets.token_hex(8)
        self._clock = clock
        self.state = LinkState.IDLE
        self.channel: Channel | None = None
        self._selector: selectors.BaseSelector | None = None
        self._connect_deadline = 0.0
        self._retry_at = 0.0  # releases alone reconnect from then on
        self._nonces = (b"", b"")  # (the producer's, ours) while proving
        self._waiting: deque[Load] = deque()  # not sent yet
        self._inflight: deque[Load] = deque()  # sent; answers come in order
        self._copying: list[Load] = []  # bytes arriving by device copy
        self._releases: deque[_Kept] = deque()  # not sent yet
        self._unconfirmed: deque[_Kept] = deque()  # sent, maybe not arrived
        self._reads_sent = 0  # on this connection
        self._reads_answered = 0
        self._finished: list[Load] = []

    # ---- what the worker asks ----

    def submit(self, load: Load) -> None:
        self._waiting.append(load)

    def release(self, lease: Lease, needed: int = 1) -> None:
        release = Release(
            lease.request_id, lease.token, lease.prompt_hash, needed, self.consumer_id
        )
        self._releases.append(_Kept(release, self._clock()))
        while len(self._releases) + len(self._unconfirmed) > MAX_KEPT_RELEASES:
            (self._unconfirmed or self._releases).popleft()  # oldest first

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
            self._broke(exc)
        self._poll_copies()
        self._check_deadlines()
        self._flush()
        self._forget_old_releases()
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
            self._broke(exc)

    def close(self, reason: str = "link closed") -> list[Load]:
        """Close the connection; every load it still had ends failed (its
        owner told; returned too). Releases stay queued for the next
        connection, should the link be pumped again."""
        self._close_channel()
        self._requeue_releases()
        cut = (*self._inflight, *self._waiting, *self._copying)
        self._inflight.clear()
        self._waiting.clear()
        self._copying.clear()
        for load in cut:
            if load.incoming is not None:
                load.incoming.abort()
            self._finish(load, reason)
        finished, self._finished = self._finished, []
        return finished

    # ---- connection ----

    def _advance(self) -> None:
        if self.state == LinkState.READY and not self._inflight and self._peer_gone():
            # Closed while idle (the producer restarted, or its idle timeout):
            # no read was lost, so open a new connection for what waits.
            self._close_channel()
            self._requeue_releases()
        if self.state == LinkState.IDLE:
            if not (self._waiting or self._releases_due()):
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

    def _releases_due(self) -> bool:
        return bool(self._releases) and self._clock() >= self._retry_at

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
        self._connect_deadline = self._clock() + self.timeout
        self._reads_sent = self._reads_answered = 0
        self.state = LinkState.CONNECTING

    def _finish_connect(self) -> None:
        assert self.channel is not None and self._selector is not None
        if not self._selector.select(0):
            if self._clock() > self._connect_deadline:
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
                if self._clock() > self._connect_deadline:
                    raise TimeoutError("producer greeting timed out")
                return
            if self.state == LinkState.GREETING:
                self._greeted(message)
            else:
                secret = self._secret
                assert secret is not None
                macs = check_server_proof(message, secret, *self._nonces)
                self.channel.secure(*macs)
                self.state = LinkState.READY

    def _greeted(self, hello: Message) -> None:
        assert self.channel is not None
        check_greeting(hello, self._secret)
        assert isinstance(hello, ServerHello)
        if self._secret is None:
            self.state = LinkState.READY
            return
        proof, nonce = prove(self._secret, hello.nonce)
        self._nonces = (hello.nonce, nonce)
        self.channel.send(proof)
        self.channel.pump_out()
        self.state = LinkState.AUTHENTICATING

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

    def _broke(self, exc: Exception) -> None:
        """The connection failed. The read whose answer was coming in is
        the one it failed for (a bad answer, or cut mid-payload)."""
        head = self._inflight[0] if self._inflight else None
        answering = head is not None and (
            isinstance(exc, ProtocolError) or head.incoming is not None
        )
        self._lose_connection(
            str(exc) or type(exc).__name__, head if answering else None
        )

    def _lose_connection(self, reason: str, culprit: Load | None = None) -> None:
        """Close the connection: ``culprit`` fails; the other reads sent on
        it go again on a new one (each at most MAX_RESENDS times), releases
        not known to have arrived too. Had it never been set up (the
        producer is unreachable or refused us), the waiting loads fail."""
        was_ready = self.state == LinkState.READY
        self._close_channel()
        self._requeue_releases()
        again: list[Load] = []
        for load in self._inflight:
            if load.incoming is not None:
                load.incoming.abort()
                load.incoming = None
            if load is culprit or load.resends >= MAX_RESENDS:
                self._finish(load, reason)
            else:
                self._prepare_resend(load)
                again.append(load)
        self._inflight.clear()
        self._waiting.extendleft(reversed(again))
        if not was_ready:
            self._retry_at = self._clock() + RECONNECT_SECONDS
            for load in self._waiting:
                self._finish(load, reason)
            self._waiting.clear()

    def _prepare_resend(self, load: Load) -> None:
        load.resends += 1
        load.sent_at = load.answer_since = 0.0
        load.deadline = max(load.deadline, self._clock() + self.timeout)
        logger.debug("pdserve: read of %s goes again", load.spec.lease.request_id)

    # ---- releases ----

    def _requeue_releases(self) -> None:
        """Releases sent on a closed connection may not have arrived."""
        self._releases.extendleft(reversed(self._unconfirmed))
        self._unconfirmed.clear()

    def _confirm_releases(self) -> None:
        """Releases that arrived: before an answered read, or long enough
        ago on a connection that still works."""
        now = self._clock()
        while self._unconfirmed and (
            self._unconfirmed[0].reads_before < self._reads_answered
            or now - self._unconfirmed[0].sent_at > RELEASE_CONFIRM_SECONDS
        ):
            self._unconfirmed.popleft()

    def _forget_old_releases(self) -> None:
        if self.state == LinkState.READY:
            self._confirm_releases()
        now = self._clock()
        while self._releases and now - self._releases[0].queued_at > (
            RELEASE_KEEP_SECONDS
        ):
            self._releases.popleft()  # its lease ended on its own by now

    # ---- reads ----

    def _send_queued(self) -> None:
        assert self.channel is not None
        now = self._clock()
        while self._releases:
            kept = self._releases.popleft()
            self.channel.send(kept.release)
            kept.sent_at, kept.reads_before = now, self._reads_sent
            self._unconfirmed.append(kept)
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
            load.sent_at = now
            if not self._inflight:
                load.answer_since = now
            self._reads_sent += 1
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
            if self._inflight:
                self._inflight[0].answer_since = self._clock()
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
        self._reads_answered += 1
        self._confirm_releases()
        if not reply.ok:
            # A session the producer no longer has is this transport's failure.
            load.transport_failed = load.session_lost = reply.session_lost
            self._finish(load, f"producer refused the read: {reply.error}")
            return True
        expected = layer_sizes(
            self.kv, len(load.spec.local_block_ids), load.local_heads
        )
        if reply.layer_nbytes != expected:
            raise ProtocolError(
                f"producer announced {reply.layer_nbytes} bytes per layer, "
                f"expected {expected}"
            )
        if reply.hold_seconds and self._clock() > load.sent_at + reply.hold_seconds / 2:
            # Too late to copy safely within the hold the producer promised.
            self._finish(load, "producer's hold on the blocks ran out")
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
            if load.transport.payload_on_channel:
                raise  # its payload follows on this connection: that must close
            # A GPU-direct read has nothing on this connection, so only this
            # load fails: its session was dropped, or the copy did not start.
            return self._copy_failed(load, exc)
        if load.owner is not None:
            load.owner.copying(load)

    def _take_payload(self, load: Load) -> bool:
        """Move payload bytes into the load; False until it has them all
        (and, on a secured connection, the frame whose tag covers them)."""
        assert self.channel is not None and load.incoming is not None
        while (view := load.incoming.raw_view()) is not None:
            n = self.channel.read_raw_into(view)
            if n:
                load.incoming.on_raw(n)
            if n < len(view):
                return False
        if not (self.channel.secured and load.transport.payload_on_channel):
            return True
        self.channel.pump_in()
        end = self.channel.next_message()  # checks the payload's tag
        if end is None:
            return False
        if not isinstance(end, PayloadEnd):
            raise ProtocolError(f"expected PayloadEnd, got {type(end).__name__}")
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
            else:
                still.append(load)
        self._copying = still

    def _check_deadlines(self) -> None:
        now = self._clock()
        if self._inflight and now > self._inflight[0].answer_since + self.timeout:
            # Its answer may be half in: the connection cannot be trusted now.
            self._lose_connection("KV transfer timed out", self._inflight[0])
        if self.state != LinkState.READY:
            late = [load for load in self._waiting if load.deadline < now]
            for load in late:
                self._waiting.remove(load)
                self._finish(load, "KV transfer timed out (producer unreachable)")

    def _copy_failed(self, load: Load, exc: Exception) -> None:
        load.transport_failed = True
        self._finish(load, f"{load.transport.name} copy failed: {exc}")

    def _finish(self, load: Load, error: str | None) -> None:
        """Where every load on this link ends: its owner is told."""
        load.error = error
        self._finished.append(load)
        if load.owner is not None:
            load.owner.ended(load)


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET
