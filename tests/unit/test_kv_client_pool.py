"""Pooled side-channel connections: one the producer closed while it sat
idle (its idle timeout, a restart) is never used for the next request."""

from __future__ import annotations

import socket
import time

from tests.unit.test_kv_auth import SECRET, client, start_server


def close_server_side(server) -> None:
    for conn in list(server._conns):
        conn.shutdown(socket.SHUT_RDWR)


def wait_until_no_connections(server, timeout: float = 5) -> None:
    deadline = time.monotonic() + timeout
    while server._conns and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not server._conns


def test_connection_closed_by_producer_is_replaced():
    server = start_server(SECRET)
    rank = client(server.port, SECRET)
    try:
        assert rank.rank_info().model == "m"
        close_server_side(server)
        wait_until_no_connections(server)
        assert rank.rank_info().model == "m"
        assert rank.release("req", "token") is True
    finally:
        rank.close()
        server.close()
