"""Messages of the KV side channel between a consumer and a producer rank.

Every message is one frame: a 4-byte big-endian length, then a msgpack body.
Block payloads follow a ``ReadReply`` as raw bytes, outside any frame, so they
can be received straight into tensor memory.

With a KV secret both ends prove it to each other, bound to the connection:
the server's hello carries a nonce Ns, the client answers with its own nonce
Nc and HMAC(k, "client"|Ns|Nc), the server answers HMAC(k, "server"|Ns|Nc).
From then on every frame carries a tag (``StreamMac``) under a key of its
direction derived from (k, Ns, Nc), over its sequence number, the raw bytes
that came before it since the previous frame, and its body; a tcp payload is
followed by a ``PayloadEnd`` frame whose tag covers it. A relay can only pass
bytes through unchanged; a party without the secret can inject neither frames
nor KV. Without a secret no tag is sent.

Both ends are non-blocking and driven from the engine's own thread
(``FrameBuffer`` parses frames as bytes arrive); the blocking helpers at the
end serve startup handshakes and tests.
"""

from __future__ import annotations

import hashlib
import hmac
import socket
import struct
import time
from collections.abc import Sequence
from typing import Annotated, Any

import msgspec

from pdserve.identity import ModelIdentity
from pdserve.kv_layout import KVLayout

# Control messages are small; anything larger is a hostile or broken peer.
MAX_FRAME_BYTES = 4 * 1024 * 1024
# Before a peer has proven the KV secret it may send only this much a frame.
MAX_UNAUTHENTICATED_FRAME_BYTES = 4096
_LENGTH = struct.Struct(">I")
# Each side's nonce of the KV secret's proofs; a frame's tag (truncated
# HMAC-SHA256) once they are done.
NONCE_BYTES = 32
TAG_BYTES = 16

# A read names at most this many blocks (a lease holds at most as many):
# 2M tokens at block size 16, past any model's context.
MAX_READ_BLOCKS = 1 << 17
_Short = Annotated[str, msgspec.Meta(max_length=256)]
_BlockIds = Annotated[
    list[Annotated[int, msgspec.Meta(ge=0, lt=1 << 40)]],
    msgspec.Meta(max_length=MAX_READ_BLOCKS),
]


class ProtocolError(ConnectionError):
    """The peer sent something that is not a valid frame of this protocol."""


class LayerInfo(msgspec.Struct, frozen=True):
    name: str
    shape: list[int]
    dtype: str
    block_dim: int
    # Where the layer keeps its KV heads; -1: not known (no head slicing).
    head_dim: int = -1


class RankInfo(msgspec.Struct, tag=True):
    """What a rank tells its peer so both can check they hold compatible KV."""

    pdserve_version: str
    protocol_version: int
    vllm_version: str
    model: str
    dtype: str
    tp_size: int
    tp_rank: int
    block_size: int
    num_blocks: int
    layers: list[LayerInfo]
    transports: list[str]
    # vLLM's --kv-cache-dtype ("auto": the model's dtype).
    kv_cache_dtype: str = "auto"
    # Where this rank runs: device kind, device uuid and PCI bus id, and host
    # identity let a peer tell whether a GPU-direct transport can reach it
    # ("" where unknown: then it cannot).
    device: str = "cpu"
    device_uuid: str = ""
    device_pci_bus_id: str = ""
    host_id: str = ""
    # The producer instance (see Lease.instance_id); empty on a consumer.
    instance_id: str = ""
    # What the KV bytes mean (backend, layout, kernel blocks, fp8 format).
    kv_layout: KVLayout = KVLayout()
    # The model's KV heads over all ranks (0: unknown): with the TP sizes it
    # tells which heads each rank holds (ranks of different TP sizes).
    total_kv_heads: int = 0
    # What else decides the KV and tokens: revision, quantization, RoPE...
    identity: ModelIdentity = ModelIdentity()


class ServerHello(msgspec.Struct, tag=True):
    """The producer's first frame on every connection. With ``auth`` the
    client must answer ``AuthProof`` for ``nonce`` before anything else."""

    auth: bool
    nonce: Annotated[bytes, msgspec.Meta(max_length=64)] = b""


class AuthProof(msgspec.Struct, tag=True):
    """The client's nonce and ``client_mac`` of both nonces."""

    mac: Annotated[bytes, msgspec.Meta(max_length=64)]
    nonce: Annotated[bytes, msgspec.Meta(max_length=64)] = b""


class ServerProof(msgspec.Struct, tag=True):
    """The server's answer to a valid ``AuthProof``: ``server_mac`` of both
    nonces (a refusal is an ``Ack`` with ``ok`` false)."""

    mac: Annotated[bytes, msgspec.Meta(max_length=64)]


class PayloadEnd(msgspec.Struct, tag=True):
    """Follows a payload on a connection that proved the KV secret: its tag
    covers the payload's bytes."""


class GetRankInfo(msgspec.Struct, tag=True):
    pass


class ReadBlocks(msgspec.Struct, tag=True):
    """Ask for the KV of ``block_ids``, which must belong to the lease.

    ``prompt_hash`` is computed by the consumer from its own prompt tokens;
    the lease token binds it, so KV of other tokens is never served."""

    request_id: _Short
    token: _Short
    prompt_hash: _Short
    block_ids: _BlockIds
    # How the bytes move; a GPU-direct transport names its session.
    transport: _Short = "tcp"
    session: _Short = ""
    # Only these of the rank's KV heads (the reader's TP size differs);
    # head_count 0: whole blocks.
    head_start: Annotated[int, msgspec.Meta(ge=0, le=1 << 16)] = 0
    head_count: Annotated[int, msgspec.Meta(ge=0, le=1 << 16)] = 0

    @property
    def heads(self) -> tuple[int, int] | None:
        return (self.head_start, self.head_count) if self.head_count else None


class TransportHello(msgspec.Struct, tag=True):
    """Consumer: set up a GPU-direct transport session with this rank."""

    transport: _Short
    session: _Short
    payload: dict[str, Any] = {}
    # The consumer rank saying hello (instance and TP rank): a new hello of
    # the same consumer replaces its older session. "" from older consumers.
    consumer_id: _Short = ""


class TransportWelcome(msgspec.Struct, tag=True):
    ok: bool
    error: str = ""
    payload: dict[str, Any] = {}


class ReadReply(msgspec.Struct, tag=True):
    ok: bool
    error: str = ""
    # Bytes that follow the frame, per layer, in ``RankInfo.layers`` order.
    layer_nbytes: list[int] = []
    # Transports whose consumer copies by itself (ipc): how long, from the
    # consumer's sending of the read, the producer keeps the blocks for it.
    hold_seconds: float = 0.0
    # The producer has no (or a broken) transport session by the read's
    # name: the consumer's session is dead and must not be used again.
    session_lost: bool = False


class Release(msgspec.Struct, tag=True):
    """The consumer is done with (or gives up) the lease of ``request_id``.
    No reply: the producer only frees what the token opens."""

    request_id: _Short
    token: _Short
    prompt_hash: _Short
    # Consumer ranks that read this producer rank's part of the lease (TP
    # sizes differ); the lease ends at the last one's release.
    needed: Annotated[int, msgspec.Meta(ge=1, le=1024)] = 1
    # The releasing consumer rank: a release sent again (its connection
    # broke) counts once.
    consumer: _Short = ""


class Ack(msgspec.Struct, tag=True):
    ok: bool
    error: str = ""


Message = (
    ServerHello
    | AuthProof
    | ServerProof
    | PayloadEnd
    | GetRankInfo
    | RankInfo
    | ReadBlocks
    | ReadReply
    | Release
    | Ack
    | TransportHello
    | TransportWelcome
)

_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(Message)


class IntegrityError(ProtocolError):
    """A frame's (or the payload before it) tag is wrong: the bytes were
    changed, dropped, replayed or injected on their way."""


class StreamMac:
    """One direction of a connection that proved the KV secret: tags each
    frame over its sequence number, the raw bytes since the previous frame
    and its body. The sender seals, the receiver opens, both in stream order."""

    def __init__(self, key: bytes) -> None:
        self._key = key
        self._seq = 0
        self._raw = self._raw_mac()

    def _raw_mac(self) -> hmac.HMAC:
        return hmac.new(self._key, b"raw", "sha256")

    def absorb(self, data: bytes | bytearray | memoryview) -> None:
        """Raw (payload) bytes that went (or came) outside frames."""
        self._raw.update(data)

    def _tag(self, body: bytes | memoryview) -> bytes:
        header = self._seq.to_bytes(8, "big") + self._raw.digest()
        self._seq += 1
        self._raw = self._raw_mac()
        mac = hmac.new(self._key, header, "sha256")
        mac.update(body)
        return mac.digest()[:TAG_BYTES]

    def seal(self, body: bytes) -> bytes:
        return body + self._tag(body)

    def open(self, sealed: bytes) -> bytes:
        if len(sealed) < TAG_BYTES:
            raise IntegrityError("frame too short for its tag")
        body, tag = sealed[:-TAG_BYTES], sealed[-TAG_BYTES:]
        if not hmac.compare_digest(tag, self._tag(body)):
            raise IntegrityError("frame or payload failed its integrity check")
        return body


def encode_frame(message: Message, mac: StreamMac | None = None) -> bytes:
    body = _encoder.encode(message)
    if mac is not None:
        body = mac.seal(body)
    return _LENGTH.pack(len(body)) + body


def decode_body(body: bytes | memoryview) -> Message:
    try:
        return _decoder.decode(body)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise ProtocolError(f"undecodable message: {exc}") from exc


class FrameBuffer:
    """Bytes received so far on a non-blocking connection, cut into frames
    (checked against their tags once ``mac`` is set)."""

    def __init__(self, max_frame: int = MAX_FRAME_BYTES) -> None:
        self.max_frame = max_frame
        self.mac: StreamMac | None = None
        self._data = bytearray()

    @property
    def limit(self) -> int:
        """The largest frame body accepted now (a tag included)."""
        return self.max_frame + (TAG_BYTES if self.mac is not None else 0)

    def __len__(self) -> int:
        return len(self._data)

    def feed(self, data: bytes | memoryview) -> None:
        self._data += data

    def next_message(self) -> Message | None:
        """The next complete frame's message, or None until it has arrived."""
        if len(self._data) < _LENGTH.size:
            return None
        (length,) = _LENGTH.unpack_from(self._data)
        if length > self.limit:
            raise ProtocolError(f"frame of {length} bytes exceeds {self.limit}")
        end = _LENGTH.size + length
        if len(self._data) < end:
            return None
        body = bytes(self._data[_LENGTH.size : end])
        del self._data[:end]
        if self.mac is not None:
            body = self.mac.open(body)
        return decode_body(body)

    def take_raw(self, view: memoryview) -> int:
        """Move already received bytes into ``view``; returns how many."""
        n = min(len(view), len(self._data))
        view[:n] = self._data[:n]
        del self._data[:n]
        if self.mac is not None:
            self.mac.absorb(view[:n])
        return n


# ---- blocking helpers: startup handshakes and tests ----


def send_message(
    sock: socket.socket, message: Message, mac: StreamMac | None = None
) -> None:
    sock.sendall(encode_frame(message, mac))


def recv_exact(
    sock: socket.socket, view: memoryview, deadline: float | None = None
) -> None:
    """Fill ``view`` from ``sock``. With ``deadline`` (time.monotonic) the
    whole receive is bounded, not only each wait for more bytes."""
    received = 0
    total = len(view)
    while received < total:
        if deadline is not None:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError("peer too slow")
            sock.settimeout(remaining)
        n = sock.recv_into(view[received:], total - received)
        if n == 0:
            raise ConnectionError("peer closed the connection")
        received += n


def recv_message(
    sock: socket.socket,
    max_bytes: int = MAX_FRAME_BYTES,
    deadline: float | None = None,
    mac: StreamMac | None = None,
) -> Message:
    header = bytearray(_LENGTH.size)
    recv_exact(sock, memoryview(header), deadline)
    (length,) = _LENGTH.unpack(header)
    limit = max_bytes + (TAG_BYTES if mac is not None else 0)
    if length > limit:
        raise ProtocolError(f"frame of {length} bytes exceeds {limit}")
    body = bytearray(length)
    recv_exact(sock, memoryview(body), deadline)
    return decode_body(mac.open(bytes(body)) if mac is not None else bytes(body))


def prompt_hash(token_ids: Sequence[int], adapter: str = "") -> str:
    """Fingerprint of the prompt tokens whose KV a lease holds (and of the
    LoRA adapter they ran with: ``pdserve.fingerprint``)."""
    digest = hashlib.blake2b(digest_size=16)
    try:
        digest.update(struct.pack(f"<{len(token_ids)}q", *token_ids))
    except struct.error:
        # Not a tokenizer's ids (out of int64): a fingerprint no real
        # prompt has, rather than an exception.
        digest.update(b"invalid:" + repr(list(token_ids)).encode())
    if adapter:
        digest.update(b"\0adapter:" + adapter.encode("utf-8", "replace"))
    return digest.hexdigest()


# ---- the KV secret's proofs and session keys ----


def _keyed(secret: bytes, label: bytes, server_nonce: bytes, client_nonce: bytes):
    # Both nonces have fixed lengths (checked by each side): no ambiguity.
    message = b"pdserve-kv-" + label + b":" + server_nonce + client_nonce
    return hmac.digest(secret, message, "sha256")


def client_mac(secret: bytes, server_nonce: bytes, client_nonce: bytes) -> bytes:
    """The client's proof that it knows ``secret``, bound to this connection."""
    return _keyed(secret, b"client", server_nonce, client_nonce)


def server_mac(secret: bytes, server_nonce: bytes, client_nonce: bytes) -> bytes:
    """The server's: a different label, so neither proof serves as the other."""
    return _keyed(secret, b"server", server_nonce, client_nonce)


def session_macs(
    secret: bytes, server_nonce: bytes, client_nonce: bytes, server: bool
) -> tuple[StreamMac, StreamMac]:
    """(what this end sends, what it receives) of a proven connection."""
    to_server = StreamMac(_keyed(secret, b"to-server", server_nonce, client_nonce))
    to_client = StreamMac(_keyed(secret, b"to-client", server_nonce, client_nonce))
    return (to_client, to_server) if server else (to_server, to_client)
