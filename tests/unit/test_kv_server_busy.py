"""What the producer's worker reads from its KV server each step. Busy: while
it serves a request, not while a read waits for the grant of its lease (that
grant comes with the worker's next step, so waiting for it would stall).
Bytes sent: each served byte is handed over exactly once."""

from __future__ import annotations

import threading
import time

from pdserve.transport import get_transport
from tests.unit.test_kv_auth import client, paged_kv, start_server


def eventually(condition, timeout: float = 5) -> bool:
    deadline = time.monotonic() + timeout
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.01)
    return condition()


def test_read_waiting_for_its_grant_is_not_busy():
    server = start_server(None)
    rank = client(server.port, None)
    result: list[int] = []
    reader = threading.Thread(
        target=lambda: result.append(
            rank.read(get_transport("tcp"), paged_kv(None), "late", "t", [3], [4])
        )
    )
    try:
        assert rank.rank_info().model == "m"
        assert not server.is_busy()
        reader.start()
        time.sleep(0.3)  # the read reached the server and waits for "late"
        assert not result
        assert not server.is_busy()
        server.leases.grant("late", [3], "t")
        reader.join(timeout=5)
        assert result == [server.kv.bytes_per_block()]
        assert eventually(lambda: not server.is_busy())
    finally:
        rank.close()
        server.close()


def test_bytes_sent_are_taken_once():
    server = start_server(None)
    rank = client(server.port, None)
    try:
        server.leases.grant("r", [1, 2, 3], "t")
        for blocks in ([1], [2, 3]):
            rank.read(
                get_transport("tcp"),
                paged_kv(None),
                "r",
                "t",
                blocks,
                [4, 5][: len(blocks)],
            )
        assert server.take_bytes_sent() == 3 * server.kv.bytes_per_block()
        assert server.take_bytes_sent() == 0
    finally:
        rank.close()
        server.close()
