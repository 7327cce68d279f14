"""Hostile bytes on a producer rank's KV port close that connection only;
the server keeps serving well-formed clients."""

from __future__ import annotations

import socket
import struct

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pdserve.connector.kv_client import ProducerRankClient
from pdserve.connector.leases import LeaseTable
from pdserve.kv_cache import PagedKVCache
from pdserve.protocol import MAX_FRAME_BYTES, ServerHello, recv_message
from tests.unit.kv_server_helpers import start_tcp_server

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
    leases = LeaseTable(30)
    leases.grant("req", [1, 2], "token")
    kv_server = start_tcp_server(kv, leases, secret)
    yield kv_server
    kv_server.close()


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
    client = ProducerRankClient("127.0.0.1", port, timeout=5, secret=secret)
    try:
        return client.rank_info().model == "m" and client.release("x", "y") is False
    finally:
        client.close()


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
    from pdserve.protocol import Ack, encode_frame

    assert send_raw(server.port, encode_frame(Ack(ok=True))) == b""
    assert still_serves(server.port)
