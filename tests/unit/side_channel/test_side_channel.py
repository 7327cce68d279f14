"""The KV side channel end to end in one process: a producer rank's server
and a consumer rank's link, both pumped as their engines would pump them.
Bytes arrive exactly; reads are checked before anything is pinned; a lease
never ends while it is being read; nothing waits without a deadline."""

from __future__ import annotations

import time

import pytest
import torch

from pdserve.lease import Lease
from pdserve.pairings import PairingTarget
from pdserve.side_channel.leases import LeaseTable
from pdserve.side_channel.load_spec import LoadSpec
from tests.eventually import eventually
from tests.unit.side_channel_fakes import (
    INSTANCE_ID,
    NUM_BLOCKS,
    FakeClock,
    blocks_equal,
    consumer_rank,
    empty_like,
    link_to,
    load_of,
    make_lease,
    one,
    only_pair,
    only_peer,
    paged_kv,
    pair_with,
    paired_rank,
    pump,
    run_load,
    start_server,
    steps,
)

LAYOUTS = {
    "kv_first": (2, NUM_BLOCKS, 16, 2, 8),
    "blocks_first": (NUM_BLOCKS, 2, 16, 2, 8),
    "heads_before_tokens": (2, NUM_BLOCKS, 2, 16, 8),
}
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_blocks_arrive_byte_exact(closing, layout, dtype):
    producer = paged_kv(LAYOUTS[layout], dtype=dtype)
    consumer = empty_like(producer)
    leases = LeaseTable(30)
    server = start_server(producer, leases)
    closing(server)
    remote_ids, local_ids = [30, 2, 17, 5, 36], [0, 33, 8, 9, 21]
    lease = make_lease("req-1", remote_ids + [11], server.port)
    leases.grant("req-1", lease.block_ids, lease.prompt_hash)
    link = link_to(server, consumer)
    closing(link)
    link.submit(load_of(lease, local_ids, remote_ids))

    (load,) = pump(link, server, one)

    assert load.error is None
    assert load.nbytes == producer.bytes_per_block() * len(remote_ids)
    assert blocks_equal(producer, remote_ids, consumer, local_ids)
    untouched = [i for i in range(NUM_BLOCKS) if i not in local_ids]
    assert blocks_equal(empty_like(producer), untouched, consumer, untouched)


def test_read_that_overtakes_its_grant_is_served_when_it_arrives(closing):
    producer = paged_kv()
    consumer = empty_like(producer)
    leases = LeaseTable(30)
    server = start_server(producer, leases)
    closing(server)
    lease = make_lease("late", [4, 5], server.port)
    link = link_to(server, consumer)
    closing(link)
    link.submit(load_of(lease, [1, 2]))
    # Two producer steps without the grant: the read waits, parked.
    assert pump(link, server, lambda f: leases.step >= 2) == []
    leases.grant("late", lease.block_ids, lease.prompt_hash)

    (load,) = pump(link, server, one)

    assert load.error is None
    assert blocks_equal(producer, [4, 5], consumer, [1, 2])


def test_read_whose_grant_never_comes_is_refused_after_a_few_steps(closing):
    producer = paged_kv()
    server = start_server(producer)
    closing(server)
    link = link_to(server, empty_like(producer))
    closing(link)
    link.submit(load_of(make_lease("never", [4], server.port), [1]))
    steps_before = server.leases.step

    (load,) = pump(link, server, one)

    assert "no lease" in load.error
    assert server.leases.step - steps_before <= 8


def forged(lease: Lease, **changes) -> Lease:
    import msgspec

    return msgspec.structs.replace(lease, **changes)


@pytest.mark.parametrize(
    "change, reason",
    [
        (dict(token="0" * 64), "unknown lease"),
        (dict(request_id="someone-else"), "unknown lease"),
        (dict(prompt_hash="ab" * 16), "unknown lease"),  # token binds the hash
    ],
)
def test_reads_of_unknown_leases_refused_at_once(closing, change, reason):
    producer = paged_kv()
    leases = LeaseTable(30)
    server = start_server(producer, leases)
    closing(server)
    lease = make_lease("req", [4, 5], server.port)
    leases.grant("req", lease.block_ids, lease.prompt_hash)
    link = link_to(server, empty_like(producer))
    closing(link)
    link.submit(load_of(forged(lease, **change), [1, 2], [4, 5]))
    steps_before = server.leases.step

    (load,) = pump(link, server, one)

    assert reason in load.error
    assert server.leases.step - steps_before <= 2  # answered, not parked
    assert len(leases) == 1  # the real lease is untouched


@pytest.mark.parametrize(
    "remote, local, reason",
    [
        ([4, 4], [1, 2], "duplicate"),
        ([4, 9], [1, 2], "outside"),
        ([4, 5, 6], [1, 2, 3], "more blocks"),
    ],
)
def test_bad_block_lists_refused(closing, remote, local, reason):
    producer = paged_kv()
    leases = LeaseTable(30)
    server = start_server(producer, leases)
    closing(server)
    lease = make_lease("req", [4, 5], server.port)
    leases.grant("req", lease.block_ids, lease.prompt_hash)
    link = link_to(server, empty_like(producer))
    closing(link)
    link.submit(load_of(lease, local, remote))

    (load,) = pump(link, server, one)

    assert reason in load.error
    assert server.take_counters()[0] == 0  # no byte served


def test_lease_does_not_end_while_it_is_read(closing):
    """A read slowed on purpose (the consumer stops reading) past the lease's
    expiry: the blocks are not handed back to vLLM until the read is done,
    and the bytes that arrive are the lease's."""
    clock = FakeClock()
    # 10 layers x 60 blocks x 64 KiB: far more than socket buffers hold.
    producer = paged_kv((2, 64, 16, 8, 64), layers=10, num_blocks=64)
    consumer = empty_like(producer)
    leases = LeaseTable(lease_seconds=10, clock=clock)
    server = start_server(producer, leases)
    closing(server)
    blocks, local = list(range(60)), list(range(63, 3, -1))
    lease = make_lease("slow", blocks, server.port)
    leases.grant("slow", blocks, lease.prompt_hash)
    link = link_to(server, consumer)
    closing(link)
    link.submit(load_of(lease, local))
    link.pump()  # the read goes out; from now on the consumer reads nothing
    eventually(
        lambda: leases._leases["slow"].readers == 1,
        5,
        "the producer serving the read",
        step=server.step,
    )
    assert leases._leases["slow"].readers == 1
    clock.now += 60  # the lease ran out long ago
    assert leases.pop_finished() == (set(), 0)  # still pinned: not freed

    (load,) = pump(link, server, one)

    assert load.error is None
    assert blocks_equal(producer, blocks, consumer, local)
    assert leases.pop_finished() == ({"slow"}, 1)  # freed once the read ended


def test_bad_reads_do_not_hold_up_a_good_one(closing):
    """Reads of unknown or ended leases are answered at once, in order, so a
    good read queued behind many of them is served within a step or two."""
    producer = paged_kv()
    consumer = empty_like(producer)
    leases = LeaseTable(30)
    server = start_server(producer, leases)
    closing(server)
    link = link_to(server, consumer)
    closing(link)
    for i in range(50):
        bad = make_lease(f"bad-{i}", [1], server.port, node_key=b"x" * 32)
        link.submit(load_of(bad, [1]))
    good = make_lease("good", [4, 5], server.port)
    leases.grant("good", good.block_ids, good.prompt_hash)
    link.submit(load_of(good, [2, 3]))
    steps_before = leases.step

    finished = pump(link, server, lambda f: len(f) == 51)

    assert [f.error is None for f in finished].count(True) == 1
    assert leases.step - steps_before <= 5
    assert blocks_equal(producer, [4, 5], consumer, [2, 3])


def test_unanswered_read_fails_at_its_deadline(closing):
    """A producer that accepts but never answers: the read fails once its
    timeout has run from its sending (the consumer then prefills locally)."""
    producer = paged_kv()
    server = start_server(producer)
    closing(server)
    clock = FakeClock(time.monotonic())
    link = link_to(server, empty_like(producer), clock=clock, timeout=10)
    closing(link)
    # The producer's engine never steps, and its idle pump is stopped.
    server._stopped.set()
    link.submit(load_of(make_lease("r", [1], server.port), [1]))
    assert link.pump() == []  # sent

    clock.now += 9.9
    assert link.pump() == []
    clock.now += 0.2
    (load,) = link.pump()

    assert "timed out" in load.error


@pytest.mark.parametrize("ended_by", ["release", "expiry"])
def test_read_of_an_ended_lease_is_refused_while_the_engine_is_idle(closing, ended_by):
    """The producer's engine steps while it holds a lease, not after: a read
    of a lease that ended (a consumer rank read and released it, or it ran
    out) must be refused by the idle thread, not left for a step that never
    comes (the read then waited out the consumer's whole transfer timeout,
    and each resend again)."""
    clock = FakeClock(time.monotonic())
    leases = LeaseTable(30, clock=clock)
    producer = paged_kv()
    server = start_server(producer, leases)
    closing(server)
    lease = make_lease("gone", [1, 2], server.port)
    leases.grant("gone", [1, 2], lease.prompt_hash)
    if ended_by == "release":
        leases.release("gone", lease.prompt_hash)
    else:
        clock.now += 31
    leases.pop_finished()  # the engine's last step frees the blocks
    link = link_to(server, empty_like(producer), timeout=60)
    closing(link)
    link.submit(load_of(lease, [3, 4]))

    (load,) = pump(link, server, one, producer_steps=False)

    assert "has ended" in load.error


def test_idle_thread_leaves_a_read_waiting_for_its_grant(closing):
    """The idle thread also runs while the engine is in a long step (on two
    shared cores one took over 10 s): a read whose grant comes with the
    next step must still be there for it, not refused (a TP 2 pull failed
    so in CI when this thread refused such reads after 10 s)."""
    clock = FakeClock(time.monotonic())
    producer = paged_kv()
    server = start_server(producer, clock=clock)
    closing(server)
    consumer = empty_like(producer)
    link = link_to(server, consumer, timeout=60)
    closing(link)
    lease = make_lease("late", [4, 5], server.port)
    link.submit(load_of(lease, [2, 3]))
    eventually(lambda: _queued(server), 5, "the read queued", step=link.pump)

    clock.now += 60
    server.pump(control_only=True)  # what the idle thread does, now
    assert link.pump() == [] and _queued(server)

    server.leases.grant("late", [4, 5], lease.prompt_hash)
    (load,) = pump(link, server, one)
    assert load.error is None
    assert blocks_equal(producer, [4, 5], consumer, [2, 3])


def _queued(server) -> bool:
    return any(conn.queue for conn in server._conns.values())


def granted(server, request_id: str, blocks: list[int]) -> Lease:
    lease = make_lease(request_id, blocks, server.port)
    server.leases.grant(request_id, blocks, lease.prompt_hash)
    return lease


def test_a_read_behind_another_is_not_charged_for_its_time(closing):
    """Answers come in order: a read sent with another one before it has its
    timeout from when the answer it waits for is its own."""
    producer = paged_kv()
    server = start_server(producer)
    closing(server)
    clock = FakeClock(time.monotonic())
    consumer = empty_like(producer)
    link = link_to(server, consumer, clock=clock, timeout=10)
    closing(link)
    first = granted(server, "first", [1])
    second = make_lease("second", [2], server.port)  # granted later
    link.submit(load_of(first, [3], seconds=10))
    link.submit(load_of(second, [4], seconds=10))
    link.pump()  # both sent at once
    clock.now += 8
    server.step()  # answers the first; the second waits for its grant
    (done,) = pump(link, None, one)
    assert done.error is None

    clock.now += 8  # 16 s since the second was sent, 8 since its turn came
    assert link.pump() == []
    server.leases.grant("second", [2], second.prompt_hash)
    (late,) = pump(link, server, one)

    assert late.error is None
    assert blocks_equal(producer, [2], consumer, [4])


def test_a_timed_out_read_fails_alone_and_nothing_else_is_lost(closing, monkeypatch):
    """A read that times out mid-payload closes its connection: only that
    read fails; the read sent after it goes again on a new connection, and a
    release the producer never read on the old one is sent again."""
    import pdserve.side_channel.server as kv_server

    # The producer reads no request while its answers wait to be taken:
    # the release below stays unread in the old connection.
    monkeypatch.setattr(kv_server, "MAX_PENDING_OUT_BYTES", 0)
    # 10 layers x 60 blocks x 64 KiB: far more than socket buffers hold.
    producer = paged_kv((2, 64, 16, 8, 64), layers=10, num_blocks=64)
    consumer = empty_like(producer)
    server = start_server(producer)
    closing(server)
    clock = FakeClock(time.monotonic())
    link = link_to(server, consumer, clock=clock, timeout=10)
    closing(link)
    big, small = granted(server, "big", list(range(60))), granted(server, "s", [61])
    other = granted(server, "other", [62])
    link.submit(load_of(big, list(range(60)), seconds=10, releasing_on=link))
    link.submit(load_of(small, [63], seconds=10, releasing_on=link))
    pump(link, server, lambda _: link._inflight and link._inflight[0].incoming)
    link.release(other)
    link.pump()  # the release goes out; the consumer reads nothing more
    for _ in range(5):
        server.step()
    assert len(server.leases) == 3  # the release was not read

    clock.now += 11
    failed = link.pump()
    assert [load.spec.lease.request_id for load in failed] == ["big"]
    assert "timed out" in failed[0].error
    (again,) = pump(link, server, one)

    assert again.error is None and again.resends == 1
    assert blocks_equal(producer, [61], consumer, [63])
    # Released: "other" (sent again), "s" (read) and "big" (given up).
    pump(link, server, lambda _: len(server.leases) == 0)
    assert server.leases.take_released() == 3


def test_idle_connection_closed_by_the_producer_is_opened_again(closing):
    """Without a secret idle connections close soon; the consumer's next
    read opens a new one."""
    import pdserve.side_channel.server as kv_server

    producer = paged_kv()
    server_clock = FakeClock(time.monotonic())
    server = start_server(producer, clock=server_clock)
    closing(server)
    consumer = empty_like(producer)
    link = link_to(server, consumer)
    closing(link)
    server_clock.now += kv_server.OPEN_IDLE_CONNECTION_SECONDS + 1
    server.step()
    assert not server._conns  # closed as idle

    link.submit(load_of(granted(server, "r", [5]), [6]))
    (load,) = pump(link, server, one)

    assert load.error is None and load.resends == 0
    assert blocks_equal(producer, [5], consumer, [6])


def test_read_racing_an_idle_close_goes_again(closing):
    """The producer closes an idle connection just as a read goes out on it,
    unread: the read goes again on a new connection."""
    producer = paged_kv()
    server_clock = FakeClock(time.monotonic())
    server = start_server(producer, clock=server_clock)
    closing(server)
    consumer = empty_like(producer)
    link = link_to(server, consumer)
    closing(link)
    link.submit(load_of(granted(server, "r", [5]), [6]))
    link.pump()  # sent
    server_clock.now += 3600
    with server._lock:
        server._progress()  # the idle check, before the read is read
    assert not server._conns

    (load,) = pump(link, server, one)

    assert load.error is None and load.resends == 1
    assert blocks_equal(producer, [5], consumer, [6])


def test_restarted_producer_is_a_new_producer(closing):
    """A producer killed and restarted on the same port: leases of the old
    instance are refused, the consumer rank pairs with the new instance when
    its first lease arrives and reads from it."""
    producer = paged_kv()
    consumer = empty_like(producer)
    old = start_server(producer, instance_id="old", node_key=b"1" * 32)
    port = old.port
    rank = consumer_rank(consumer, port)
    closing(rank)
    rank.connect()
    assert only_peer(rank).instance_id == "old"
    old_lease = make_lease("a", [4], port, node_key=b"1" * 32, instance_id="old")
    old.leases.grant("a", [4], old_lease.prompt_hash)
    assert run_load(rank, old, old_lease, [1]) is None
    old.close()

    new = start_server(
        paged_kv(seed=7), instance_id="new", node_key=b"2" * 32, port=port
    )
    closing(new)
    assert "unknown lease" in run_load(rank, new, old_lease, [2])
    assert (
        only_peer(rank).instance_id == "old"
    )  # a dead instance's lease changes nothing

    # The new instance's first lease is not waited for: recomputed, and the
    # pairing starts in the background.
    first = make_lease("b", [6, 7], port, node_key=b"2" * 32, instance_id="new")
    new.leases.grant("b", [6, 7], first.prompt_hash)
    assert "not paired yet" in run_load(rank, new, first, [3, 4])
    eventually(
        lambda: only_peer(rank).instance_id == "new",
        10,
        "pairing with the new instance",
        step=lambda: rank.start([], [], []),
    )
    new_lease = make_lease("c", [6, 7], port, node_key=b"2" * 32, instance_id="new")
    new.leases.grant("c", [6, 7], new_lease.prompt_hash)
    assert run_load(rank, new, new_lease, [3, 4]) is None
    assert only_peer(rank).instance_id == "new"
    assert rank.stats.data["kv_pairings"] == {"tcp": 2}  # old, then new
    assert blocks_equal(new.kv, [6, 7], consumer, [3, 4])


def test_release_goes_out_in_the_step_the_load_finishes(closing):
    """The consumer's engine may not step again after a request's last pull
    (nothing else waits): the release must leave in that same step."""
    producer = paged_kv()
    leases = LeaseTable(30)
    server = start_server(producer, leases)
    closing(server)
    lease = make_lease("r", [4], server.port)
    leases.grant("r", [4], lease.prompt_hash)
    link = link_to(server, empty_like(producer))
    closing(link)
    link.submit(load_of(lease, [1], releasing_on=link))

    pump(link, server, one)
    # No more consumer pumps from here: only the producer steps.
    released = eventually(
        leases.take_released, 5, "the release at the producer", step=server.step
    )

    assert released == 1


def test_consumer_lets_go_of_a_dead_producer_while_idle(closing):
    """A dead producer's memory stays allocated while we map it: the watch
    drops sessions and mappings without any engine step, and the next lease
    pairs again before reading."""
    producer = paged_kv()
    server = start_server(producer)
    rank = consumer_rank(empty_like(producer), server.port, watch_seconds=0.05)
    closing(rank)
    dropped = []
    rank.connect()
    only_pair(rank).transport.drop_sessions = lambda: dropped.append(True)
    assert only_peer(rank).instance_id == INSTANCE_ID
    port = server.port
    server.close()

    # Nobody calls the rank: the engine is idle.
    eventually(lambda: not rank.producers.peers, 10, "the watch to drop the producer")
    assert dropped

    # Back on the same port (same instance, here): paired again, then read.
    again = start_server(producer, port=port)
    closing(again)
    pair_with(rank, port)
    lease = make_lease("a", [3, 5], port)
    again.leases.grant("a", [3, 5], lease.prompt_hash)
    consumer = rank.kv
    assert run_load(rank, again, lease, [1, 2]) is None
    assert only_peer(rank).instance_id == INSTANCE_ID
    assert blocks_equal(producer, [3, 5], consumer, [1, 2])


def test_consumer_keeps_a_producer_that_is_only_slow(closing):
    """A producer that does not answer in time (busy, suspended) is kept."""
    _, server, rank = paired_rank(closing, watch_seconds=0.05, watch_timeout=0.2)
    server.pump = lambda timeout=0.0: None  # accepts, never answers
    server._stopped.set()
    verdicts = []
    registry = rank.producers
    alive = registry._producer_alive
    registry._producer_alive = lambda peer: verdicts.append(alive(peer)) or verdicts[-1]
    # Two checks in a row ran out of patience waiting for its answer.
    eventually(lambda: len(verdicts) >= 2, 5, "two checks by the watch")
    assert verdicts[:2] == [True, True]
    assert only_peer(rank).instance_id == INSTANCE_ID


def test_unexpected_error_in_a_link_fails_its_loads_not_the_engine(closing):
    """Anything a link raises stays in the connector: the load is recomputed
    and counted, vLLM's worker sees no exception."""
    _, server, rank = paired_rank(closing)
    lease = make_lease("x", [3], server.port)
    server.leases.grant("x", [3], lease.prompt_hash)

    def broken(*_):
        raise RuntimeError("out of memory")

    only_pair(rank).transport.receive = broken
    error = run_load(rank, server, lease, [1])
    assert error is not None and "out of memory" in error
    assert rank.stats.data["kv_connector_errors"] == 1


def test_rank_reads_from_each_producer_its_leases_name(closing):
    """Two producers: each lease is read from the producer it names, the
    second paired with on its first lease; one dying leaves the other."""
    first, second = paged_kv(seed=1), paged_kv(seed=2)
    a = start_server(first, instance_id="a")
    b = start_server(second, instance_id="b")
    closing(b)
    rank = consumer_rank(empty_like(first), a.port, watch_seconds=0.05)
    closing(rank)
    rank.connect()  # only producer a is known at startup
    assert [peer.instance_id for peer in rank.producers.peers.values()] == ["a"]

    lease_a = make_lease("x", [2, 3], a.port, instance_id="a")
    lease_b = make_lease("y", [4, 5], b.port, instance_id="b")
    a.leases.grant("x", [2, 3], lease_a.prompt_hash)
    b.leases.grant("y", [4, 5], lease_b.prompt_hash)
    assert run_load(rank, a, lease_a, [10, 11]) is None
    pair_with(rank, b.port, "b")
    assert run_load(rank, b, lease_b, [12, 13]) is None
    assert sorted(peer.instance_id for peer in rank.producers.peers.values()) == [
        "a",
        "b",
    ]
    assert blocks_equal(first, [2, 3], rank.kv, [10, 11])
    assert blocks_equal(second, [4, 5], rank.kv, [12, 13])

    a.close()
    eventually(lambda: len(rank.producers.peers) <= 1, 10, "the watch to let go of a")
    assert only_peer(rank).instance_id == "b"  # of a only
    again = make_lease("z", [6], b.port, instance_id="b")
    b.leases.grant("z", [6], again.prompt_hash)
    assert run_load(rank, b, again, [14]) is None


def test_producer_that_is_down_fails_fast_and_is_not_retried_at_once(closing):
    """A lease naming a producer nobody answers for: the load fails at once
    (the pairing runs in the background and fails), and after that failure
    the next one fails at once without a new attempt (backoff)."""
    import socket

    _, server, rank = paired_rank(closing)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead_port = s.getsockname()[1]
    lease = make_lease("d", [1], dead_port, instance_id="gone")
    target = PairingTarget("127.0.0.1", (dead_port,), "gone")
    assert "not paired yet" in run_load(rank, server, lease, [1])
    eventually(
        lambda: rank.producers.pairer.failed_recently(target), 5, "the attempt to fail"
    )
    assert "failed recently" in run_load(rank, server, lease, [2])
    assert not rank.producers.pairer.want(target)  # still backing off
    assert len(rank.producers.peers) == 1


def test_pairing_never_holds_the_engine_thread(closing):
    """A producer that accepts connections and never answers (hung, or a
    slow NCCL setup): leases naming it cost the engine's step nothing, each
    one is recomputed at once while the pairing waits on its own thread."""
    import socket

    _, server, rank = paired_rank(closing)
    hung = socket.create_server(("127.0.0.1", 0))
    closing(hung)
    port = hung.getsockname()[1]
    for i in range(3):
        lease = make_lease(f"h{i}", [1], port, instance_id="hung")
        started = time.monotonic()
        rank.start([LoadSpec(f"c-h{i}", lease, [1], [i + 1])], [], [])
        assert time.monotonic() - started < 0.1
        done, failed = rank.take_done()
        assert done == {f"c-h{i}"} and failed == {i + 1}
    assert "not paired yet" in rank.last_error
    assert rank.stats.data["kv_load_failures"] == 3


def test_lease_of_a_producer_that_cannot_be_paired_is_released(closing):
    """Pairing fails (here: the lease names another instance than the one
    serving): the pull fails at once, and the producer's blocks are let go
    now, not when the lease expires."""
    _, server, rank = paired_rank(closing)
    lease = make_lease("o", [2, 3], server.port, instance_id="not-this-one")
    server.leases.grant("o", [2, 3], lease.prompt_hash)
    assert "producer unusable" in run_load(rank, server, lease, [1, 2])
    eventually(
        lambda: len(server.leases) == 0,
        5,
        "the release (not the lease's expiry)",
        step=lambda: steps(rank, server),
    )
    assert server.leases.take_released() == 1


def test_lease_handed_back_by_an_idle_engine_reaches_its_producer(closing):
    """The engine steps once (the lease handed back: a rejected request, a
    client gone) and then no more: the release still reaches the producer,
    over a connection the watch thread opens and proves by itself."""
    secret = b"s" * 16
    producer = paged_kv()
    leases = LeaseTable(30)
    server = start_server(producer, leases, secret=secret)
    closing(server)
    rank = consumer_rank(empty_like(producer), server.port, secret, watch_seconds=0.05)
    closing(rank)
    rank.connect()
    lease = make_lease("idle", [4, 5], server.port)
    leases.grant("idle", [4, 5], lease.prompt_hash)
    only_pair(rank).link.close("closed while idle")  # no connection open now
    rank.start([], [lease], [])  # the engine's one step; none follows
    eventually(lambda: len(leases) == 0, 10, "the release at the producer")
    assert leases.take_released() == 1
