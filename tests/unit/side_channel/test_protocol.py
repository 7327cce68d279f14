"""The KV side channel's framing over real sockets, including hostile peers."""

from __future__ import annotations

import re
import socket
import struct
import threading
import tracemalloc
from pathlib import Path

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import pdserve
from pdserve.side_channel.protocol import (
    MAX_FRAME_BYTES,
    MAX_READ_BLOCKS,
    NONCE_BYTES,
    Ack,
    AuthProof,
    FrameBuffer,
    GetRankInfo,
    IntegrityError,
    LayerInfo,
    PayloadEnd,
    ProtocolError,
    RankInfo,
    ReadBlocks,
    ReadReply,
    Release,
    ServerProof,
    StreamMac,
    TransportHello,
    decode_body,
    encode_frame,
    prompt_hash,
    recv_message,
    send_message,
    session_macs,
)

TIMEOUT = 5.0
MESSAGE_TYPES = (GetRankInfo, RankInfo, ReadBlocks, ReadReply, Release, Ack)


def rank_info(layers: int = 2) -> RankInfo:
    return RankInfo(
        pdserve_version="0.1.0",
        protocol_version=1,
        vllm_version="0.32.0",
        model="Qwen/Qwen3-0.6B",
        dtype="bfloat16",
        tp_size=2,
        tp_rank=1,
        block_size=16,
        num_blocks=1234,
        layers=[
            LayerInfo(f"model.layers.{i}.self_attn", [2, 1234, 16, 4, 128], "bf16", 1)
            for i in range(layers)
        ],
        transports=["tcp"],
    )


MESSAGES = [
    GetRankInfo(),
    rank_info(),
    ReadBlocks(
        request_id="cmpl-1-0", token="tok", prompt_hash="h", block_ids=[5, 0, 4_000]
    ),
    ReadBlocks(request_id="", token="", prompt_hash="", block_ids=[]),
    ReadReply(ok=True, layer_nbytes=[65536, 65536]),
    ReadReply(ok=True, layer_nbytes=[1], hold_seconds=30.0),
    ReadReply(ok=False, error="unknown lease 'x'"),
    Release(request_id="r-ü", token="t", prompt_hash="h"),
    Release(request_id="r", token="t", prompt_hash="h", needed=2, consumer="c/1"),
    AuthProof(mac=b"m" * 32, nonce=b"n" * NONCE_BYTES),
    ServerProof(mac=b"m" * 32),
    PayloadEnd(),
    Ack(ok=True),
    Ack(ok=False, error="nope"),
    TransportHello("nccl", "0123abcd", consumer_id="a1b2c3/1"),
]


def receive(sock: socket.socket):
    """recv_message, but a test fails instead of hanging if it never returns
    (socket timeouts cannot bound a loop that spins on a closed peer)."""
    outcome: list = []

    def run() -> None:
        try:
            outcome.append(("ok", recv_message(sock)))
        except BaseException as exc:  # re-raised in the test's thread
            outcome.append(("error", exc))

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(TIMEOUT + 2)
    if not outcome:
        pytest.fail("recv_message did not return")
    kind, value = outcome[0]
    if kind == "error":
        raise value
    return value


@pytest.fixture
def pair():
    a, b = socket.socketpair()
    a.settimeout(TIMEOUT)
    b.settimeout(TIMEOUT)
    yield a, b
    a.close()
    b.close()


@pytest.mark.parametrize("message", MESSAGES, ids=lambda m: type(m).__name__)
def test_message_round_trip(pair, message):
    a, b = pair
    a.sendall(encode_frame(message))
    got = receive(b)
    assert type(got) is type(message)
    assert got == message


def test_frame_is_length_prefixed_msgpack():
    frame = encode_frame(Ack(ok=True))
    (length,) = struct.unpack(">I", frame[:4])
    assert length == len(frame) - 4
    assert msgspec.msgpack.decode(frame[4:]) == {"type": "Ack", "ok": True, "error": ""}


def test_back_to_back_frames_keep_their_boundaries(pair):
    a, b = pair
    a.sendall(b"".join(encode_frame(m) for m in MESSAGES))
    assert [receive(b) for _ in MESSAGES] == MESSAGES


def test_frame_split_into_single_bytes(pair):
    a, b = pair
    frame = encode_frame(rank_info())
    received = []
    reader = threading.Thread(target=lambda: received.append(recv_message(b)))
    reader.start()
    for i in range(len(frame)):
        a.send(frame[i : i + 1])
    reader.join(TIMEOUT)
    assert received == [rank_info()]


def test_large_message_arrives_through_partial_reads(pair):
    a, b = pair
    ids = [(1 << 39) + i for i in range(MAX_READ_BLOCKS)]  # 9 bytes each
    message = ReadBlocks(request_id="big", token="t", prompt_hash="h", block_ids=ids)
    assert len(encode_frame(message)) > 1_000_000  # beyond any socket buffer
    sender = threading.Thread(target=send_message, args=(a, message))
    sender.start()
    got = receive(b)
    sender.join(TIMEOUT)
    assert got == message


def test_prompt_hash():
    assert prompt_hash([1, 2, 3]) == prompt_hash([1, 2, 3])
    assert prompt_hash([1, 2, 3]) == prompt_hash((1, 2, 3))
    assert prompt_hash([1, 2, 3]) != prompt_hash([1, 2, 4])
    assert prompt_hash([1, 2, 3]) != prompt_hash([3, 2, 1])
    assert prompt_hash([1, 2, 3]) != prompt_hash([1, 2])
    assert prompt_hash([1]) != prompt_hash([1, 0])
    assert prompt_hash([]) != prompt_hash([0])
    digest = prompt_hash([151643, 0, 7])
    assert len(digest) == 32 and int(digest, 16) >= 0


@settings(max_examples=50, deadline=None)
@given(
    st.lists(st.integers(min_value=0, max_value=2**31), min_size=1, max_size=20),
    st.randoms(use_true_random=False),
)
def test_prompt_hash_distinguishes_permutations(tokens, rnd):
    shuffled = list(tokens)
    rnd.shuffle(shuffled)
    assert (prompt_hash(tokens) == prompt_hash(shuffled)) == (tokens == shuffled)


@settings(
    max_examples=50,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(st.binary(max_size=512))
def test_random_bytes_never_hang_or_crash(data):
    a, b = socket.socketpair()
    try:
        b.settimeout(TIMEOUT)
        a.sendall(data)
        a.close()
        try:
            message = receive(b)
        except ConnectionError:  # ProtocolError included
            return
        # Only a complete, well-formed frame decodes.
        (length,) = struct.unpack(">I", data[:4])
        assert len(data) >= 4 + length
        assert isinstance(message, MESSAGE_TYPES)
    finally:
        a.close()
        b.close()


@settings(max_examples=50, deadline=None)
@given(st.binary(max_size=512))
def test_random_frame_body_is_a_message_or_protocol_error(body):
    a, b = socket.socketpair()
    try:
        b.settimeout(TIMEOUT)
        a.sendall(struct.pack(">I", len(body)) + body)
        try:
            message = receive(b)
        except ProtocolError:
            return
        assert isinstance(message, MESSAGE_TYPES)
    finally:
        a.close()
        b.close()


@pytest.mark.parametrize("keep", [0, 2, 4, 10])
def test_truncated_frame_then_close(pair, keep):
    a, b = pair
    frame = encode_frame(rank_info())
    assert keep < len(frame)
    a.sendall(frame[:keep])
    a.shutdown(socket.SHUT_WR)
    with pytest.raises(ConnectionError):
        receive(b)


def test_huge_length_prefix_refused_without_allocating(pair):
    a, b = pair
    a.sendall(struct.pack(">I", 0xFFFFFFFF))  # the peer stays open
    tracemalloc.start()
    try:
        with pytest.raises(ProtocolError, match="exceeds"):
            receive(b)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1024 * 1024


def test_length_just_over_limit_refused(pair):
    a, b = pair
    a.sendall(struct.pack(">I", MAX_FRAME_BYTES + 1))
    with pytest.raises(ProtocolError):
        receive(b)


def test_length_at_limit_waits_for_body(pair):
    a, b = pair
    a.sendall(struct.pack(">I", MAX_FRAME_BYTES) + b"\x00" * 100)
    a.shutdown(socket.SHUT_WR)
    with pytest.raises(ConnectionError) as exc:
        receive(b)
    # A frame of the maximum size is legal: it failed on the missing body.
    assert not isinstance(exc.value, ProtocolError)


@pytest.mark.parametrize(
    "body",
    [
        {"type": "Shutdown"},
        {"type": "ReadBlocks", "request_id": "r", "token": "t"},  # missing field
        {"type": "ReadBlocks", "request_id": 1, "token": "t", "block_ids": []},
        {  # a negative block id
            "type": "ReadBlocks",
            "request_id": "r",
            "token": "t",
            "prompt_hash": "h",
            "block_ids": [-1],
        },
        {  # an id longer than any lease's
            "type": "Release",
            "request_id": "r" * 1000,
            "token": "t",
            "prompt_hash": "h",
        },
        {"request_id": "r", "token": "t"},  # no tag
        [1, 2, 3],
        7,
    ],
)
def test_valid_msgpack_that_is_no_message(pair, body):
    a, b = pair
    data = msgspec.msgpack.encode(body)
    a.sendall(struct.pack(">I", len(data)) + data)
    with pytest.raises(ProtocolError):
        receive(b)
    with pytest.raises(ProtocolError):
        decode_body(data)


def test_garbage_body_is_protocol_error(pair):
    a, b = pair
    a.sendall(struct.pack(">I", 3) + b"\xc1\xc1\xc1")  # 0xc1 is never used
    with pytest.raises(ProtocolError):
        receive(b)


def test_stream_stays_usable_after_a_bad_body(pair):
    a, b = pair
    bad = msgspec.msgpack.encode({"type": "Nope"})
    a.sendall(struct.pack(">I", len(bad)) + bad + encode_frame(Ack(ok=True)))
    with pytest.raises(ProtocolError):
        receive(b)
    assert receive(b) == Ack(ok=True)


class OlderTransportHello(msgspec.Struct, tag="TransportHello"):
    """TransportHello as peers before ``consumer_id`` send and decode it."""

    transport: str
    session: str
    payload: dict = {}


def test_transport_hello_without_consumer_id_decodes_both_ways():
    older = msgspec.msgpack.encode(OlderTransportHello("nccl", "s"))
    assert decode_body(older) == TransportHello("nccl", "s", consumer_id="")

    newer = msgspec.msgpack.encode(TransportHello("nccl", "s", consumer_id="c/0"))
    assert msgspec.msgpack.decode(newer, type=OlderTransportHello).session == "s"


def test_rank_info_without_pci_bus_id_decodes_both_ways():
    info = msgspec.structs.replace(
        rank_info(), device_uuid="GPU-1", device_pci_bus_id="0000:1a:00"
    )
    fields = msgspec.to_builtins(info)
    del fields["device_pci_bus_id"]  # as a peer before the field sends it
    older = decode_body(msgspec.msgpack.encode(fields))
    assert isinstance(older, RankInfo)
    assert older.device_pci_bus_id == "" and older.device_uuid == "GPU-1"

    class OlderRankInfo(msgspec.Struct, tag="RankInfo"):
        device_uuid: str = ""

    newer = msgspec.msgpack.decode(encode_frame(info)[4:], type=OlderRankInfo)
    assert newer.device_uuid == "GPU-1"


# ---- tagged frames (a connection that proved the KV secret) ----

KEY = b"k" * 32
REPLY = ReadReply(ok=True, layer_nbytes=[3])


def sealed(*parts) -> bytes:
    """Frames and raw byte runs as a sender tags them."""
    mac, out = StreamMac(KEY), b""
    for part in parts:
        if isinstance(part, bytes):
            mac.absorb(part)
            out += part
        else:
            out += encode_frame(part, mac)
    return out


def receiver(data: bytes, mac: StreamMac | None = None) -> FrameBuffer:
    frames = FrameBuffer()
    frames.mac = mac or StreamMac(KEY)
    frames.feed(data)
    return frames


def read_reply_and_payload(frames: FrameBuffer) -> list:
    reply = frames.next_message()
    view = memoryview(bytearray(3))
    frames.take_raw(view)
    return [reply, bytes(view), frames.next_message()]


def test_tagged_frames_and_payload_round_trip():
    frames = receiver(sealed(REPLY, b"abc", PayloadEnd()))
    assert read_reply_and_payload(frames) == [REPLY, b"abc", PayloadEnd()]


@pytest.mark.parametrize("where", ["frame", "payload", "end"])
def test_a_changed_byte_fails_the_integrity_check(where):
    data = bytearray(sealed(REPLY, b"abc", PayloadEnd()))
    reply_bytes = len(encode_frame(REPLY, StreamMac(KEY)))
    data[{"frame": 8, "payload": reply_bytes + 1, "end": len(data) - 1}[where]] ^= 1
    with pytest.raises(IntegrityError):
        read_reply_and_payload(receiver(bytes(data)))


@pytest.mark.parametrize("order", [(1, 0), (0, 0), (1,)], ids=str)
def test_replayed_dropped_or_reordered_frames_fail(order):
    mac = StreamMac(KEY)
    frames = [encode_frame(Ack(ok=True), mac), encode_frame(Ack(ok=False), mac)]
    buffer = receiver(b"".join(frames[i] for i in order))
    with pytest.raises(IntegrityError):
        for _ in order:
            buffer.next_message()
    buffer = receiver(b"".join(frames))
    assert [buffer.next_message(), buffer.next_message()] == [
        Ack(ok=True),
        Ack(ok=False),
    ]


def test_an_untagged_frame_is_refused_once_tags_are_on():
    with pytest.raises(ProtocolError):
        receiver(encode_frame(Ack(ok=True))).next_message()


def test_each_direction_has_its_own_key():
    nonces = b"s" * NONCE_BYTES, b"c" * NONCE_BYTES
    server_sends, server_receives = session_macs(KEY, *nonces, server=True)
    client_sends, _ = session_macs(KEY, *nonces, server=False)
    frame = encode_frame(Ack(ok=True), client_sends)
    assert receiver(frame, server_receives).next_message() == Ack(ok=True)
    # What the server sent cannot be reflected back to it as the client's.
    echoed = encode_frame(Ack(ok=True), server_sends)
    _, fresh_receives = session_macs(KEY, *nonces, server=True)
    with pytest.raises(IntegrityError):
        receiver(echoed, fresh_receives).next_message()


def test_blocking_helpers_tag_and_check(pair):
    a, b = pair
    send_message(a, Ack(ok=True), StreamMac(KEY))
    assert recv_message(b, mac=StreamMac(KEY)) == Ack(ok=True)
    send_message(a, Ack(ok=True))
    with pytest.raises(ProtocolError):
        recv_message(b, mac=StreamMac(KEY))


def test_protocol_history_tells_every_version():
    """pdserve/__init__.py says what each protocol version changed: one entry
    per version, in order, up to the current one."""
    text = Path(pdserve.__file__).read_text()
    versions = [int(v) for v in re.findall(r"^# (\d+): ", text, re.MULTILINE)]
    assert versions == list(range(1, pdserve.PROTOCOL_VERSION + 1))
