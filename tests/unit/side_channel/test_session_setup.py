"""Transport sessions are set up on the KV server's own setup thread: while a
setup waits (an NCCL pair waits up to 30 s for its consumer), engine steps
keep serving reads; its welcome leaves once made; a read of the session
waits for the setup, not the engine. GPU-direct sessions need a proven peer."""

from __future__ import annotations

import select
import threading
import time

import pytest

import pdserve.side_channel.session_setup as session_setup
from pdserve.side_channel.protocol import TransportHello, TransportWelcome
from pdserve.transport.base import Outgoing
from pdserve.transport.tcp import TcpTransport
from tests.eventually import eventually
from tests.unit.side_channel_fakes import (
    Session,
    blocks_equal,
    empty_like,
    link_to,
    make_lease,
    one,
    paged_kv,
    pump,
    start_server,
)

SECRET = b"setup-secret"


class SlowSetup(TcpTransport):
    """Moves blocks like tcp; its welcome and its finish each wait until the
    test lets them (at most 10 s, so a server that waits on them in its
    pump is slow, not hung)."""

    name = "slow"

    def __init__(self) -> None:
        self.may_welcome = threading.Event()
        self.may_finish = threading.Event()
        self.events: list[str] = []

    def welcome(self, hello, kv):
        self.events.append(f"welcome {hello.session}")
        if not self.may_welcome.wait(10):
            self.events.append("welcome waited in vain")
        return TransportWelcome(ok=True, payload={"session": hello.session})

    def after_welcome(self, session):
        self.events.append(f"finish {session}")
        self.may_finish.wait(10)

    def close_session(self, session):
        self.events.append(f"close {session}")

    def serve(self, channel, kv, block_ids, session, heads=None) -> Outgoing:
        self.events.append(f"serve {session or 'tcp'}")
        return super().serve(channel, kv, block_ids, session, heads)


@pytest.fixture
def server(closing):
    kv_server = start_server(paged_kv())
    closing(kv_server)
    kv_server.transports["slow"] = SlowSetup()
    return kv_server


def granted(server, request_id: str, blocks: list[int]):
    lease = make_lease(request_id, blocks, server.port)
    server.leases.grant(request_id, blocks, lease.prompt_hash)
    return lease


def steps_until(server, condition, what: str, seconds: float = 5) -> float:
    """Step the producer's engine until ``condition()``; the longest step."""
    took = [0.0]

    def timed_step() -> None:
        started = time.monotonic()
        server.step()
        took.append(time.monotonic() - started)

    eventually(condition, seconds, what, step=timed_step, interval=0.001)
    return max(took)


def answered(session: Session) -> bool:
    return bool(select.select([session.sock], [], [], 0)[0])


def test_engine_steps_serve_reads_while_a_session_is_set_up(server, closing):
    slow = server.transports["slow"]
    consumer = empty_like(server.kv)
    hello = Session(server.port)
    closing(hello)
    hello.send(TransportHello("slow", "s1", consumer_id="c/0"))
    longest = steps_until(server, lambda: slow.events == ["welcome s1"], "the setup")

    # Its welcome waits: a tcp read is served meanwhile, steps stay short.
    link = link_to(server, consumer)
    closing(link)
    link.submit(load_of(granted(server, "a", [1]), [2]))
    steps = []
    (load,) = pump(link, server, one, on_step=steps.append)
    assert load.error is None and blocks_equal(server.kv, [1], consumer, [2])
    assert slow.events == ["welcome s1"]  # still waiting
    assert not answered(hello)

    # A read of the session waits for its setup, welcome and finish.
    slow.may_welcome.set()
    steps_until(server, lambda: answered(hello), "the welcome")
    assert hello.recv() == TransportWelcome(ok=True, payload={"session": "s1"})
    steps_until(server, lambda: "finish s1" in slow.events, "the finish")
    on_session = link_to(server, consumer)
    closing(on_session)
    on_session.submit(
        load_of(granted(server, "b", [3]), [4], transport=slow, session="s1")
    )
    for _ in range(10):
        assert on_session.pump() == []
        server.step()
    assert "serve s1" not in slow.events

    slow.may_finish.set()
    (load,) = pump(on_session, server, one)
    assert load.error is None and blocks_equal(server.kv, [3], consumer, [4])
    assert slow.events[-1] == "serve s1"
    assert max(longest, *steps) < 1.0


def test_a_consumer_gone_before_its_welcome_has_its_session_closed(server, closing):
    slow = server.transports["slow"]
    hello = Session(server.port)
    hello.send(TransportHello("slow", "s1"))
    steps_until(server, lambda: slow.events == ["welcome s1"], "the setup")
    hello.close()
    steps_until(server, lambda: not server._conns, "the connection closed")

    slow.may_welcome.set()
    steps_until(server, lambda: not server._setting_up, "no setup left")
    assert slow.events == ["welcome s1", "close s1"]  # no finish


def test_too_many_setups_are_refused_at_once(server, closing, monkeypatch):
    monkeypatch.setattr(session_setup, "MAX_SETUPS", 1)
    slow = server.transports["slow"]
    first, second = Session(server.port), Session(server.port)
    closing(first)
    closing(second)
    first.send(TransportHello("slow", "s1"))
    steps_until(server, lambda: slow.events == ["welcome s1"], "the setup")
    second.send(TransportHello("slow", "s2"))
    steps_until(server, lambda: answered(second), "the refusal")
    assert second.recv() == TransportWelcome(
        ok=False, error="too many sessions being set up"
    )
    slow.may_welcome.set()
    slow.may_finish.set()


@pytest.mark.parametrize("name", ["ipc", "nccl"])
def test_gpu_direct_sessions_only_for_peers_that_proved_the_secret(closing, name):
    from pdserve.transport import get_transport

    for secret, error in [
        (None, f"{name} needs a KV secret"),
        (SECRET, "producer KV is not on a GPU"),  # past that check
    ]:
        server = start_server(paged_kv(), secret=secret)
        closing(server)
        server.transports[name] = get_transport(name)
        with Session(server.port, secret) as session:
            session.send(TransportHello(name, "s1"))
            steps_until(server, lambda s=session: answered(s), "the answer")
            assert session.recv() == TransportWelcome(ok=False, error=error)


def load_of(lease, local, transport=None, session=""):
    from tests.unit.side_channel_fakes import load_of as tcp_load

    load = tcp_load(lease, local)
    if transport is not None:
        load.transport, load.session = transport, session
    return load
