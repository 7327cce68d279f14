"""A producer keeps one GPU-direct session per consumer rank: a consumer
that says hello again has its older session closed first (communicator,
staging buffer, store), and the sessions stay bounded."""

from __future__ import annotations

import threading
from types import SimpleNamespace

import pytest
import torch

from pdserve.side_channel.protocol import TransportHello
from pdserve.transport import nccl
from pdserve.transport.sessions import SessionTable


class Recorder:
    def __init__(self) -> None:
        self.events: list[str] = []

    def close(self, state: str, reason: str) -> None:
        self.events.append(f"close {state}: {reason}")


def table(limit: int = 8) -> tuple[SessionTable[str], Recorder]:
    recorder = Recorder()
    return SessionTable(recorder.close, limit), recorder


def test_hello_again_closes_the_consumers_older_session():
    sessions, recorder = table()
    sessions.add("s1", "consumer-a/0", "pair 1")
    sessions.add("s2", "consumer-a/0", "pair 2")

    assert recorder.events == ["close pair 1: consumer said hello again"]
    assert sessions.get("s1") is None and sessions.get("s2") == "pair 2"


def test_other_consumers_and_ranks_keep_their_sessions():
    sessions, recorder = table()
    sessions.add("s1", "consumer-a/0", "a0")
    sessions.add("s2", "consumer-a/1", "a1")
    sessions.add("s3", "consumer-b/0", "b0")

    assert recorder.events == []
    assert len(sessions) == 3


def test_consumers_without_an_id_never_replace_each_other():
    """Older consumers send no id: nothing tells two of them apart."""
    sessions, recorder = table()
    sessions.add("s1", "", "old 1")
    sessions.add("s2", "", "old 2")

    assert recorder.events == []
    assert sessions.get("s1") == "old 1"


def test_a_reused_session_id_closes_the_older_session():
    sessions, recorder = table()
    sessions.add("s1", "consumer-a/0", "first")
    sessions.add("s1", "consumer-b/0", "second")

    assert recorder.events == ["close first: session id reused"]
    sessions.add("s2", "consumer-a/0", "third")  # a's entry went with "first"
    assert len(recorder.events) == 1


def test_oldest_sessions_closed_beyond_the_limit():
    sessions, recorder = table(limit=2)
    for n in range(4):
        sessions.add(f"s{n}", f"consumer-{n}/0", f"pair {n}")

    assert recorder.events == [
        "close pair 0: too many sessions",
        "close pair 1: too many sessions",
    ]
    assert list(sessions) == ["s2", "s3"]


def test_closed_session_is_closed_once_and_forgets_its_consumer():
    sessions, recorder = table()
    sessions.add("s1", "consumer-a/0", "pair 1")
    sessions.close("s1", "setup failed")
    sessions.close("s1", "again")
    sessions.add("s2", "consumer-a/0", "pair 2")
    sessions.close_all("producer shutting down")

    assert recorder.events == [
        "close pair 1: setup failed",
        "close pair 2: producer shutting down",
    ]
    assert len(sessions) == 0


def test_sessions_close_outside_the_tables_lock():
    """Closing waits for the session's GPU work (from the setup thread):
    meanwhile the engine's thread must still look sessions up."""
    looked_up: list[str | None] = []
    sessions: SessionTable[str] = SessionTable(
        lambda state, reason: looked_up.append(sessions.get("s2")), 8
    )
    sessions.add("s1", "consumer-a/0", "pair 1")
    worker = threading.Thread(
        target=sessions.add, args=("s2", "consumer-a/0", "pair 2"), daemon=True
    )
    worker.start()
    worker.join(5)
    assert not worker.is_alive(), "closing held the table's lock"
    assert looked_up == ["pair 2"]


# ---- the NCCL producer, without NCCL: its store, group and session faked ----


@pytest.fixture
def events(monkeypatch) -> list[str]:
    """What the NCCL producer builds and closes, in order."""
    log: list[str] = []
    ports = iter(range(5000, 6000))

    class FakeSession:
        def __init__(self, group, store, kv, chunk_blocks) -> None:
            self.name = group
            log.append(f"build {group}")

        def close(self, reason: str) -> None:
            log.append(f"close {self.name}")

    def store(host: str):
        return SimpleNamespace(port=next(ports))

    monkeypatch.setattr(nccl, "producer_store", store)
    monkeypatch.setattr(nccl, "pair_group", lambda s, rank, dev: f"group@{s.port}")
    monkeypatch.setattr(nccl, "_Session", FakeSession)
    return log


def welcome(transport: nccl.NcclTransport, session: str, consumer_id: str) -> int:
    kv = SimpleNamespace(device=torch.device("cuda", 0), bytes_per_block=lambda: 4096)
    hello = TransportHello("nccl", session, consumer_id=consumer_id)
    reply = transport.welcome(hello, kv)
    assert reply.ok
    return reply.payload["store_port"]


def test_nccl_producer_closes_a_consumers_pair_before_building_its_new_one(events):
    transport = nccl.NcclTransport()
    first = welcome(transport, "s1", "consumer-a/0")
    welcome(transport, "s2", "consumer-b/0")
    second = welcome(transport, "s3", "consumer-a/0")

    assert events == [
        f"build group@{first}",
        "build group@5001",
        f"close group@{first}",  # before anything of the new pair exists
        f"build group@{second}",
    ]


def test_nccl_producer_forgets_a_session_whose_setup_failed(events):
    """The server closes a session whose pairing failed after the welcome;
    the consumer's next hello then replaces nothing."""
    transport = nccl.NcclTransport()
    welcome(transport, "s1", "consumer-a/0")
    transport.close_session("s1")
    welcome(transport, "s2", "consumer-a/0")

    assert events == ["build group@5000", "close group@5000", "build group@5001"]
