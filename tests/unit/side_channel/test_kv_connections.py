"""How many connections a KV server holds, and for how long. Connections
that have not proven the KV secret have their own small budget and a short
deadline, so no flood of them takes a consumer's place; each peer address
may hold only so many; without a secret idle connections close soon."""

from __future__ import annotations

import select
import socket

import pytest

import pdserve.side_channel.server as kv_server
from pdserve.side_channel.protocol import (
    GetRankInfo,
    RankInfo,
    ServerHello,
    recv_message,
)
from tests.unit.side_channel_fakes import (
    FakeClock,
    Session,
    blocks_equal,
    empty_like,
    link_to,
    load_of,
    make_lease,
    paged_kv,
    pump,
    start_server,
)

SECRET = b"budget-secret"


def connect(port: int, source: str) -> socket.socket:
    """A connection from ``source`` (any 127.x address is this host)."""
    return socket.create_connection(
        ("127.0.0.1", port), timeout=5, source_address=(source, 0)
    )


def greeted(conn: socket.socket) -> bool:
    """The server greeted it (False: closed without a word)."""
    try:
        return isinstance(recv_message(conn), ServerHello)
    except OSError:
        return False


def closed(conn: socket.socket) -> bool:
    """The server closed it (it sends nothing unasked)."""
    if not select.select([conn], [], [], 2)[0]:
        return False
    try:
        return conn.recv(1) == b""
    except OSError:
        return True


def gone(conn: socket.socket) -> bool:
    """Closed by the server, greeted first or not."""
    while select.select([conn], [], [], 2)[0]:
        try:
            if not conn.recv(1 << 16):
                return True
        except OSError:
            return True
    return False


def serves(session: Session) -> bool:
    session.send(GetRankInfo())
    return isinstance(session.recv(), RankInfo)


def test_unproven_connections_never_take_a_consumers_place(closing, monkeypatch):
    monkeypatch.setattr(kv_server, "MAX_CONNECTIONS", 4)
    monkeypatch.setattr(kv_server, "MAX_UNPROVEN_CONNECTIONS", 6)
    monkeypatch.setattr(kv_server, "MAX_UNPROVEN_PER_PEER", 3)
    server = start_server(paged_kv(), secret=SECRET)
    closing(server)
    consumers = [Session(server.port, SECRET, f"127.0.0.{10 + i}") for i in range(3)]
    for session in consumers:
        closing(session)

    # Eight that never prove, from three addresses: the oldest give way.
    flood = [connect(server.port, f"127.0.0.{2 + i // 3}") for i in range(8)]
    for conn in flood:
        closing(conn)
    assert gone(flood[0]) and gone(flood[1])
    assert greeted(flood[-1])
    with server._lock:
        assert sum(not c.proven for c in server._conns.values()) == 6

    # A consumer still gets in, up to the proven budget, and all serve.
    late = Session(server.port, SECRET, "127.0.0.20")
    closing(late)
    assert all(serves(session) for session in [*consumers, late])
    with pytest.raises(ConnectionError, match="too many connections") as refused:
        Session(server.port, SECRET, "127.0.0.21")
    # Busy, not gone: a consumer's watch must not drop this producer.
    assert not isinstance(refused.value, ConnectionRefusedError)


def test_one_address_holds_only_so_many_unproven_connections(closing, monkeypatch):
    monkeypatch.setattr(kv_server, "MAX_UNPROVEN_PER_PEER", 2)
    server = start_server(paged_kv(), secret=SECRET)
    closing(server)
    mine = [connect(server.port, "127.0.0.2") for _ in range(3)]
    for conn in mine:
        closing(conn)
    assert [greeted(conn) for conn in mine] == [True, True, False]
    other = Session(server.port, SECRET, "127.0.0.3")
    closing(other)
    assert serves(other)


def test_without_a_secret_one_address_holds_only_so_many(closing, monkeypatch):
    monkeypatch.setattr(kv_server, "MAX_CONNECTIONS_PER_PEER", 3)
    server = start_server(paged_kv())
    closing(server)
    mine = [connect(server.port, "127.0.0.2") for _ in range(4)]
    for conn in mine:
        closing(conn)
    assert [greeted(conn) for conn in mine] == [True, True, True, False]
    other = Session(server.port, None, "127.0.0.3")
    closing(other)
    assert serves(other)


@pytest.mark.parametrize("secret", [None, SECRET], ids=["open", "secret"])
def test_idle_connections_close_soon_unless_proven(closing, secret):
    clock = FakeClock()
    server = start_server(paged_kv(), secret=secret, clock=clock)
    closing(server)
    session = Session(server.port, secret)
    closing(session)
    assert serves(session)

    clock.now += kv_server.OPEN_IDLE_CONNECTION_SECONDS + 1
    server.step()
    assert bool(server._conns) == (secret is not None)
    if secret is not None:
        clock.now += kv_server.IDLE_CONNECTION_SECONDS
        server.step()
        assert not server._conns
    assert closed(session.sock)
    assert kv_server.OPEN_IDLE_CONNECTION_SECONDS <= 30


def long_read(closing):
    """A producer (on a fake clock) and a consumer link with a read of more
    than socket buffers hold, its answer started: 10 layers x 60 blocks x
    64 KiB."""
    producer = paged_kv((2, 64, 16, 8, 64), layers=10, num_blocks=64)
    consumer = empty_like(producer)
    clock = FakeClock()
    server = start_server(producer, clock=clock)
    closing(server)
    lease = make_lease("slow", list(range(60)), server.port)
    server.leases.grant("slow", lease.block_ids, lease.prompt_hash)
    link = link_to(server, consumer)
    closing(link)
    link.submit(load_of(lease, list(range(60))))
    pump(link, server, lambda _: link._inflight and link._inflight[0].incoming)
    return producer, consumer, server, clock, link


def test_a_payload_taken_slowly_keeps_its_connection(closing):
    """It takes longer than the idle deadline, and its bytes keep moving."""
    producer, consumer, server, clock, link = long_read(closing)

    def slowly(_) -> bool:
        clock.now += kv_server.OPEN_IDLE_CONNECTION_SECONDS / 4
        return not link._inflight

    (load,) = pump(link, server, slowly)
    assert clock.now > 1000 + kv_server.OPEN_IDLE_CONNECTION_SECONDS
    assert load.error is None and load.resends == 0
    assert blocks_equal(producer, list(range(60)), consumer, list(range(60)))


def test_a_peer_that_stops_taking_its_answers_is_dropped(closing):
    """Unread answers hold the producer's memory: past the idle deadline
    without a byte taken, the connection closes, mid-payload or not."""
    _, _, server, clock, link = long_read(closing)
    for _ in range(3):  # the consumer takes nothing any more
        server.step()
    clock.now += kv_server.OPEN_IDLE_CONNECTION_SECONDS - 1
    server.step()
    assert server._conns
    clock.now += 2
    server.step()
    assert not server._conns
