"""Hostile bytes on a producer rank's KV port close that connection only;
the server keeps serving well-formed clients."""

from __future__ import annotations

import socket
import struct
import threading

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pdserve.kv_cache import PagedKVCache
from pdserve.side_channel.client import BlockingClient
from pdserve.side_channel.leases import LeaseTable
from pdserve.side_channel.protocol import (
    MAX_FRAME_BYTES,
    MAX_READ_BLOCKS,
    GetRankInfo,
    ReadBlocks,
    ReadReply,
    Release,
    ServerHello,
    TransportHello,
    recv_message,
)
from pdserve.side_channel.server import MAX_CONNECTIONS_PER_PEER, KVServer
from tests.eventually import eventually
from tests.unit.side_channel_fakes import Session, make_lease, start_server

SECRET = b"fuzz-secret"


@pytest.fixture(scope="module", params=[None, SECRET], ids=["open", "secret"])
def any_server(request):
    """(server, the secret its clients need): fuzzed with and without one."""
    for kv_server in serve(request.param):
        yield kv_server, request.param


@pytest.fixture(scope="module")
def server():
    yield from serve(None)


def serve(secret: bytes | None):
    kv = PagedKVCache({"layer": torch.zeros(2, 8, 16, 2, 8)}, 8)
    leases = LeaseTable(3600)  # outlives the module: only a bug ends it
    kv_server = start_server(kv, leases, secret)
    lease = make_lease("req", [1, 2], kv_server.port)
    leases.grant("req", lease.block_ids, lease.prompt_hash)
    # A producer holding a lease keeps stepping: reads of real leases are
    # served on its thread (the idle thread only answers control messages).
    stop = threading.Event()
    engine = threading.Thread(target=step_until, args=(kv_server, stop))
    engine.start()
    yield kv_server
    stop.set()
    engine.join()
    kv_server.close()


def step_until(kv_server: KVServer, stop: threading.Event) -> None:
    while not stop.wait(0.002):
        kv_server.step()


def send_raw(port: int, data: bytes) -> bytes:
    """Send ``data`` after the server's greeting; return what the server
    answered before closing (or b"")."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as conn:
        assert isinstance(recv_message(conn), ServerHello)
        try:
            conn.sendall(data)
            conn.shutdown(socket.SHUT_WR)
            return conn.recv(1 << 16)
        except OSError:
            return b""


def still_serves(port: int, secret: bytes | None = None) -> bool:
    client = BlockingClient("127.0.0.1", port, timeout=5, secret=secret)
    return client.rank_info().model == "m"


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(st.binary(max_size=512))
def test_random_bytes_leave_server_serving(any_server, data):
    kv_server, secret = any_server
    send_raw(kv_server.port, data)
    assert still_serves(kv_server.port, secret)


@pytest.mark.parametrize(
    "data",
    [
        struct.pack(">I", MAX_FRAME_BYTES + 1),  # huge length prefix
        struct.pack(">I", 0xFFFFFFFF) + b"x" * 100,
        struct.pack(">I", 100) + b"short",  # truncated frame
        struct.pack(">I", 3) + b"\x81\xa4type",  # msgpack that is no message
    ],
)
def test_malformed_frames_close_only_that_connection(server, data):
    assert send_raw(server.port, data) == b""
    assert still_serves(server.port)


def test_wrong_message_type_closes_connection(server):
    from pdserve.side_channel.protocol import Ack, encode_frame

    assert send_raw(server.port, encode_frame(Ack(ok=True))) == b""
    assert still_serves(server.port)


texts = st.text(max_size=40)  # non-ASCII included
block_lists = st.one_of(
    st.lists(st.integers(0, 10), max_size=20),  # duplicates, real blocks
    st.lists(st.integers(0, (1 << 40) - 1), max_size=50),
    st.just([1, 2] * 1000),
)
messages = st.one_of(
    st.builds(ReadBlocks, texts, texts, texts, block_lists, texts, texts),
    st.builds(Release, texts, texts, texts, st.integers(1, 1024), texts),
    st.builds(ReadBlocks, st.just("req"), texts, texts, block_lists),
    st.builds(TransportHello, texts, texts),
    st.just(GetRankInfo()),
)


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(st.lists(messages, min_size=1, max_size=8))
def test_authenticated_garbage_leaves_leases_and_server_intact(any_server, sent):
    """A peer that proved the secret but sends forged reads, releases and
    hellos (non-ASCII, duplicate, huge block lists) gets refusals or nothing:
    the real lease stays, the server keeps serving."""
    kv_server, secret = any_server
    with Session(kv_server.port, secret) as session:
        conn = session.sock
        for message in sent:
            try:
                session.send(message)
            except OSError:
                break
        conn.shutdown(socket.SHUT_WR)
        conn.settimeout(5)
        try:
            while conn.recv(1 << 16):
                pass
        except OSError:
            pass
    assert still_serves(kv_server.port, secret)
    assert len(kv_server.leases) == 1


def test_huge_read_of_a_real_lease_refused():
    for kv_server in serve(None):
        with Session(kv_server.port) as session:
            lease = make_lease("req", [1, 2], kv_server.port)
            read = ReadBlocks(
                "req", lease.token, lease.prompt_hash, list(range(MAX_READ_BLOCKS))
            )
            session.send(read)
            reply = session.recv()
        assert isinstance(reply, ReadReply) and not reply.ok
        assert "more blocks than the lease" in reply.error


def test_connection_flood_is_capped_and_recovers(server):
    flood = []
    try:
        for _ in range(MAX_CONNECTIONS_PER_PEER + 20):
            flood.append(socket.create_connection(("127.0.0.1", server.port), 5))
        # Connections beyond the cap are closed at once, without a greeting.
        refused = 0
        for conn in flood[-10:]:
            conn.settimeout(5)
            try:
                if conn.recv(64) == b"":
                    refused += 1
            except OSError:
                refused += 1
        assert refused == 10
    finally:
        for conn in flood:
            conn.close()
    eventually(
        lambda: serves_again(server.port),
        10,
        "the server to recover after the flood",
        interval=0.1,
    )


def serves_again(port: int) -> bool:
    try:
        return still_serves(port)
    except OSError:  # the flood's connections may still be closing
        return False
