"""Messages of the KV side channel between a consumer and a producer rank.

Every message is one frame: a 4-byte big-endian length, then a msgpack body.
Block payloads follow a ``ReadReply`` as raw bytes, outside any frame, so they
can be received straight into tensor memory.
"""

from __future__ import annotations

import hashlib
import hmac
import socket
import struct
from collections.abc import Sequence
from typing import Any

import msgspec

# Control messages are small; anything larger is a hostile or broken peer.
MAX_FRAME_BYTES = 16 * 1024 * 1024
_LENGTH = struct.Struct(">I")


class ProtocolError(ConnectionError):
    """The peer sent something that is not a valid frame of this protocol."""


class LayerInfo(msgspec.Struct, frozen=True):
    name: str
    shape: list[int]
    dtype: str
    block_dim: int


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
    # Where this rank runs: device kind, device uuid and host identity let a
    # peer tell whether a GPU-direct transport can reach it.
    device: str = "cpu"
    device_uuid: str = ""
    host_id: str = ""


class ServerHello(msgspec.Struct, tag=True):
    """The producer's first frame on every connection. With ``auth`` the
    client must answer ``AuthProof`` for ``nonce`` before anything else."""

    auth: bool
    nonce: bytes = b""


class AuthProof(msgspec.Struct, tag=True):
    """HMAC-SHA256 of the server's nonce, keyed with the shared KV secret."""

    mac: bytes


class GetRankInfo(msgspec.Struct, tag=True):
    pass


class ReadBlocks(msgspec.Struct, tag=True):
    """Ask for the KV of ``block_ids``, which must belong to the lease."""

    request_id: str
    token: str
    block_ids: list[int]
    # How the bytes move; a GPU-direct transport names its session.
    transport: str = "tcp"
    session: str = ""


class TransportHello(msgspec.Struct, tag=True):
    """Consumer: set up a GPU-direct transport session with this rank."""

    transport: str
    session: str
    payload: dict[str, Any] = {}


class TransportWelcome(msgspec.Struct, tag=True):
    ok: bool
    error: str = ""
    payload: dict[str, Any] = {}


class ReadReply(msgspec.Struct, tag=True):
    ok: bool
    error: str = ""
    # Bytes that follow the frame, per layer, in ``RankInfo.layers`` order.
    layer_nbytes: list[int] = []


class Release(msgspec.Struct, tag=True):
    """The consumer is done with (or gives up) the lease of ``request_id``."""

    request_id: str
    token: str


class Ack(msgspec.Struct, tag=True):
    ok: bool
    error: str = ""


Message = (
    ServerHello
    | AuthProof
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


def encode_frame(message: Message) -> bytes:
    body = _encoder.encode(message)
    return _LENGTH.pack(len(body)) + body


def decode_body(body: bytes) -> Message:
    try:
        return _decoder.decode(body)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise ProtocolError(f"undecodable message: {exc}") from exc


def send_message(sock: socket.socket, message: Message) -> None:
    sock.sendall(encode_frame(message))


def recv_exact(sock: socket.socket, view: memoryview) -> None:
    """Fill ``view`` from ``sock``; the socket's timeout bounds every wait."""
    received = 0
    total = len(view)
    while received < total:
        n = sock.recv_into(view[received:], total - received)
        if n == 0:
            raise ConnectionError("peer closed the connection")
        received += n


def recv_message(sock: socket.socket) -> Message:
    header = bytearray(_LENGTH.size)
    recv_exact(sock, memoryview(header))
    (length,) = _LENGTH.unpack(header)
    if length > MAX_FRAME_BYTES:
        raise ProtocolError(f"frame of {length} bytes exceeds {MAX_FRAME_BYTES}")
    body = bytearray(length)
    recv_exact(sock, memoryview(body))
    return decode_body(bytes(body))


def prompt_hash(token_ids: Sequence[int]) -> str:
    """Fingerprint of the prompt tokens whose KV a lease holds."""
    digest = hashlib.blake2b(digest_size=16)
    digest.update(struct.pack(f"<{len(token_ids)}q", *token_ids))
    return digest.hexdigest()


def auth_mac(secret: bytes, nonce: bytes) -> bytes:
    """Proof that the sender knows ``secret``, bound to one connection's nonce."""
    return hmac.new(secret, b"pdserve-kv-auth:" + nonce, hashlib.sha256).digest()
