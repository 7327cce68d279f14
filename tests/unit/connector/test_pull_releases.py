"""Every way a consumer rank's pull of a lease ends, through a real consumer
rank and side channel (an in-process producer rank, CPU caches, tcp), fakes
where a failure is wanted: the request is reported once, and each producer
rank's part of the lease is released exactly once (the producer gone: not at
all, there is nobody to tell)."""

from __future__ import annotations

from collections import Counter

import pytest

from pdserve.connector import producer_registry
from pdserve.side_channel.client import ProducerLink
from pdserve.side_channel.load_spec import LoadSpec
from pdserve.transport.base import Incoming
from pdserve.transport.tcp import TcpTransport
from tests.eventually import eventually
from tests.unit.side_channel_fakes import (
    consumer_rank,
    empty_like,
    make_lease,
    only_pair,
    only_peer,
    paged_kv,
    pair_with,
    paired_rank,
    run_load,
    start_server,
)


@pytest.fixture
def releases(monkeypatch) -> Counter:
    """Releases consumer links were handed: (request id, producer port,
    consumer rank) -> how many."""
    handed = Counter()
    release = ProducerLink.release

    def counting(link, lease, needed=1):
        handed[lease.request_id, link.address[1], link.consumer_id] += 1
        release(link, lease, needed)

    monkeypatch.setattr(ProducerLink, "release", counting)
    return handed


def granted(server, request_id: str, blocks: list[int]):
    lease = make_lease(request_id, blocks, server.port)
    server.leases.grant(request_id, blocks, lease.prompt_hash)
    return lease


def released_once(rank, server, releases: Counter, lease) -> None:
    """The lease ends at the producer by its release, handed to a link
    once, and the request was reported done once."""
    eventually(
        lambda: len(server.leases) == 0,
        10,
        "the release at the producer",
        step=lambda: (rank.poll(), server.step()),
    )
    for _ in range(5):  # a second release would be on its way by now
        rank.poll()
        server.step()
    assert server.leases.take_released() == 1
    assert [(rid, port) for rid, port, _ in releases.elements()] == [
        (lease.request_id, server.port)
    ]
    assert rank.take_done() == (set(), set())  # reported once, before


def start_pull(rank, lease, local: list[int]) -> str:
    request_id = "c-" + lease.request_id
    rank.start([LoadSpec(request_id, lease, lease.block_ids, local)], [], [])
    return request_id


# ---- copies that fail, by fake transports ----


class FailingCopy(Incoming):
    """tcp's receive, failing like a device copy at ``at`` (raising)."""

    def __init__(self, inner: Incoming, at: str) -> None:
        self.inner, self.at = inner, at

    def raw_view(self) -> memoryview | None:
        return self.inner.raw_view()

    def on_raw(self, nbytes: int) -> None:
        if self.at == "on_raw":  # the bytes in, scattered onto the device
            raise RuntimeError("CUDA error: an illegal memory access")
        self.inner.on_raw(nbytes)

    def poll(self) -> bool:
        if self.at == "poll":  # the device copy, polled
            raise RuntimeError("HIP error: an illegal memory access")
        return self.inner.poll()


class FailingTcp(TcpTransport):
    def __init__(self, at: str) -> None:
        self.at = at

    def receive(self, kv, remote_block_ids, local_block_ids, session, heads=None):
        if self.at == "receive":
            raise RuntimeError("out of memory")
        inner = super().receive(kv, remote_block_ids, local_block_ids, session, heads)
        return FailingCopy(inner, self.at)


# ---- the paths ----


def test_kv_in_place(closing, releases):
    _, server, rank = paired_rank(closing)
    lease = granted(server, "ok", [3, 4])
    assert run_load(rank, server, lease, [1, 2]) is None
    released_once(rank, server, releases, lease)


def test_read_refused(closing, releases):
    _, server, rank = paired_rank(closing)
    lease = make_lease("refused", [3], server.port)
    server.leases.grant("refused", [4], lease.prompt_hash)  # not block 3
    assert "outside the request's lease" in run_load(rank, server, lease, [1])
    released_once(rank, server, releases, lease)


@pytest.mark.parametrize(
    ("at", "error"),
    [
        ("poll", "tcp copy failed: HIP error"),
        # Bytes scattered as they arrive: the copy fails inside the link's
        # pump, which closes its connection.
        ("on_raw", "CUDA error"),
        ("receive", "out of memory"),
    ],
)
def test_device_copy_fails(closing, releases, at, error):
    _, server, rank = paired_rank(closing)
    only_pair(rank).transport = FailingTcp(at)
    lease = granted(server, f"copy-{at}", [5])
    assert error in run_load(rank, server, lease, [1])
    released_once(rank, server, releases, lease)


def test_copy_that_cannot_start(closing, releases):
    """A GPU-direct read with no session: no bytes on the channel."""
    from pdserve.transport.ipc import IpcTransport

    class SessionGone(TcpTransport):
        name = "ipc"
        payload_on_channel = False

        def receive(self, *args, **kwargs):
            raise ConnectionError("ipc session is unknown")

    _, server, rank = paired_rank(closing)
    server.transports["ipc"] = IpcTransport()  # answers, sends no bytes
    only_pair(rank).transport = SessionGone()
    lease = granted(server, "no-session", [6])
    assert "ipc copy failed" in run_load(rank, server, lease, [1])
    released_once(rank, server, releases, lease)


def test_producer_gone_mid_pull(closing, releases):
    """The watch finds the producer gone while a read waits on it: the pull
    fails once; no release, there is nobody to take it."""
    _, server, rank = paired_rank(closing)
    lease = granted(server, "gone", [7])
    request_id = start_pull(rank, lease, [1])
    rank.poll()  # the read goes out; the producer never answers
    server.close()
    eventually(lambda: not rank.producers.peers, 10, "the watch to drop it")
    assert rank.take_done() == ({request_id}, {1})
    assert "producer gone" in rank.last_error
    assert not releases


def test_producer_let_go_of_mid_pull(closing, releases, monkeypatch):
    """A producer evicted while a read waits on it (room for one paired
    producer, another paired with): it still runs, so the lease goes back
    to it over a short-lived link, once."""
    monkeypatch.setattr(producer_registry, "MAX_PEERS", 1)
    producer, a, rank = paired_rank(closing)
    b = start_server(paged_kv(seed=3), instance_id="b")
    closing(b)
    lease = granted(a, "evicted", [8])
    request_id = start_pull(rank, lease, [1])
    rank.poll()  # the read goes out, unanswered
    pair_with(rank, b.port, "b")
    assert only_peer(rank).instance_id == "b"
    assert rank.take_done() == ({request_id}, {1})
    assert "too many producers" in rank.last_error
    released_once(rank, a, releases, lease)


def test_producer_never_paired(closing, releases):
    """The lease names another instance than the one serving: nothing to
    read through, the whole lease goes back over a short-lived link."""
    _, server, rank = paired_rank(closing)
    lease = make_lease("orphan", [2, 3], server.port, instance_id="not-this-one")
    server.leases.grant("orphan", [2, 3], lease.prompt_hash)
    assert "producer unusable" in run_load(rank, server, lease, [1, 2])
    released_once(rank, server, releases, lease)


def test_lease_handed_back_unread(closing, releases):
    """The engine will not read it (a request aborted before its pull)."""
    _, server, rank = paired_rank(closing)
    lease = granted(server, "aborted", [9])
    rank.start([], [lease], [])
    released_once(rank, server, releases, lease)


def test_lease_handed_back_while_its_pull_runs(closing, releases):
    """The same lease handed back while a pull of it runs: the pull ends
    it, once, when its read is done."""
    _, server, rank = paired_rank(closing)
    lease = granted(server, "twice", [10])
    request_id = start_pull(rank, lease, [1])
    rank.start([], [lease], [])
    eventually(
        lambda: rank.take_done()[0] == {request_id},
        10,
        "the pull to end",
        step=lambda: (rank.poll(), server.step()),
    )
    assert rank.stats.data["kv_loads"] == 1
    released_once(rank, server, releases, lease)


@pytest.mark.parametrize(("producer_tp", "consumer_tp"), [(4, 1), (4, 2), (1, 2)])
def test_each_consumer_rank_lets_go_of_each_producer_rank_once(
    closing, releases, producer_tp, consumer_tp
):
    """Ranks read from and ranks only released on (two KV heads over more
    producer ranks): one release per consumer rank and producer rank."""
    from tests.unit.connector.test_hetero_tp import (
        consumer,
        full_kv,
        grant,
        producer,
        pull,
    )

    servers = producer(full_kv(heads=2), producer_tp, closing, heads=2)
    ranks = consumer(consumer_tp, [s.port for s in servers], closing, heads=2)
    lease = grant(servers, [2, 5])
    pull(ranks, servers, lease, [7, 8])
    eventually(
        lambda: not any(len(s.leases) for s in servers),
        10,
        "every producer rank to let go",
        step=lambda: [r.poll() for r in ranks] + [s.step() for s in servers],
    )
    assert set(releases.values()) == {1}
    released = Counter(port for _, port, _ in releases)
    assert set(released) == {s.port for s in servers}


def test_unpaired_rank_gets_its_first_lease_recomputed(closing, releases):
    """A rank that never paired (its producer was down at startup): the
    lease goes back whole, once."""
    producer = paged_kv()
    server = start_server(producer)
    closing(server)
    rank = consumer_rank(empty_like(producer), server.port)
    closing(rank)
    lease = granted(server, "first", [4])
    assert "not paired yet" in run_load(rank, server, lease, [1])
    released_once(rank, server, releases, lease)
