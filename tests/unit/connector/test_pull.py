"""A ``Pull`` on its own, against a fake peer and fake orphan releases: its
states, and each producer rank's part of the lease ending exactly once
whatever ends the pull. (Through a real consumer rank and side channel:
test_pull_releases.py.)"""

from __future__ import annotations

import pytest

from pdserve.connector.pull import WHOLE_LEASE, Pull, PullState
from pdserve.side_channel.client import Load
from pdserve.side_channel.load_spec import LoadSpec
from pdserve.transport import get_transport
from tests.unit.side_channel_fakes import FakeClock, make_lease

LEASE = make_lease("r", [4, 5], 7000)


class FakePeer:
    """A paired producer with ``ranks``; records what it is told."""

    def __init__(self, ranks=(0,), reads=(0,), num_blocks: int = 16) -> None:
        self.pairs = dict.fromkeys(ranks)
        self.reads = list(reads)
        self.num_blocks = num_blocks
        self.closed = self.gone = False
        self.released: list[int] = []
        self.copy_failures = 0

    def holds(self, block_ids):
        return max(block_ids, default=0) < self.num_blocks

    def submit(self, spec, deadline, owner):
        self.loads = {
            rank: Load(spec, get_transport("tcp"), "", deadline, producer_rank=rank)
            for rank in self.reads
        }
        return list(self.reads)

    def release(self, lease, rank: int) -> None:
        assert not self.closed
        self.released.append(rank)

    def count_copy_failure(self, load) -> None:
        self.copy_failures += 1

    def copy_succeeded(self, load) -> None:
        pass


class FakeOrphans:
    def __init__(self) -> None:
        self.released = []

    def release(self, lease) -> None:
        self.released.append(lease.request_id)


def new_pull(ended: list, spec: bool = True, clock=None) -> tuple[Pull, FakeOrphans]:
    orphans = FakeOrphans()
    load_spec = LoadSpec("c-r", LEASE, [4, 5], [1, 2]) if spec else None
    clock = clock or FakeClock()
    return Pull(LEASE, load_spec, orphans, ended.append, clock), orphans


def finish(load: Load, error: str | None = None, nbytes: int = 10) -> Load:
    load.error, load.nbytes = error, nbytes if error is None else 0
    return load


def test_a_pull_goes_through_its_states_and_releases_each_rank_once():
    ended, clock = [], FakeClock()
    pull, orphans = new_pull(ended, clock=clock)
    peer = FakePeer(ranks=(0, 1, 2), reads=(0, 1))  # rank 2: released only
    assert pull.state == PullState.PAIRING
    pull.read(peer, deadline=1.0)
    assert pull.state == PullState.READING
    pull.copying(peer.loads[0])
    assert pull.state == PullState.COPYING

    pull.ended(finish(peer.loads[0]))
    assert peer.released == [0]  # its part ends with its load
    clock.now += 0.25
    pull.ended(finish(peer.loads[1]))
    pull.ended(finish(peer.loads[1]))  # told twice: counted once

    assert pull.state == PullState.DONE and ended == [pull]
    assert sorted(peer.released) == [0, 1, 2] and pull.nbytes == 20
    assert pull.seconds == 0.25
    assert orphans.released == []


def test_a_failed_part_fails_the_pull_once_every_part_ended():
    ended = []
    pull, _ = new_pull(ended)
    peer = FakePeer(ranks=(0, 1), reads=(0, 1))
    pull.read(peer, deadline=1.0)
    pull.ended(finish(peer.loads[1], "ipc copy failed: boom"))
    assert pull.state == PullState.READING and ended == []  # rank 0 still reads
    assert peer.released == [1] and peer.copy_failures == 1
    pull.ended(finish(peer.loads[0]))
    assert pull.state == PullState.FAILED and ended == [pull]
    assert pull.error == "ipc copy failed: boom"
    assert sorted(peer.released) == [0, 1]


def test_a_pull_with_no_producer_lets_the_whole_lease_go_once():
    ended = []
    pull, orphans = new_pull(ended)
    pull.fail("producer unusable: not paired yet")
    pull.fail("again")
    assert pull.state == PullState.FAILED and ended == [pull]
    assert orphans.released == ["r"] and pull.let_go == {WHOLE_LEASE}


def test_blocks_past_the_producers_cache_fail_before_any_read():
    ended = []
    pull, _ = new_pull(ended)
    peer = FakePeer(ranks=(0, 1), num_blocks=5)
    pull.read(peer, deadline=1.0)
    assert pull.state == PullState.FAILED and "lacks" in pull.error
    assert not hasattr(peer, "loads") and sorted(peer.released) == [0, 1]


@pytest.mark.parametrize("gone", [True, False])
def test_a_peer_let_go_of_mid_pull(gone):
    """Gone: nobody to tell. Let go of while it runs (evicted): the whole
    lease over a short-lived link, once, whatever parts were left."""
    ended = []
    pull, orphans = new_pull(ended)
    peer = FakePeer(ranks=(0, 1, 2), reads=(0, 1))
    pull.read(peer, deadline=1.0)
    pull.ended(finish(peer.loads[0]))
    peer.closed, peer.gone = True, gone  # what ProducerPeer.close sets first
    pull.ended(finish(peer.loads[1], "producer gone"))

    assert pull.state == PullState.FAILED and ended == [pull]
    assert peer.released == [0]
    assert orphans.released == ([] if gone else ["r"])
    assert pull.let_go == {0, 1, 2}


def test_a_load_that_ends_after_its_pull_failed_changes_nothing():
    ended = []
    pull, _ = new_pull(ended)
    peer = FakePeer()
    pull.read(peer, deadline=1.0)
    pull.fail("unexpected error: bug")
    pull.ended(finish(peer.loads[0]))
    assert pull.state == PullState.FAILED and ended == [pull]
    assert peer.released == [0]


@pytest.mark.parametrize("paired", [True, False])
def test_a_lease_handed_back_ends_unread_at_once(paired):
    ended = []
    pull, orphans = new_pull(ended, spec=False)
    peer = FakePeer(ranks=(0, 1))
    pull.hand_back(peer if paired else None)
    assert pull.state == PullState.DONE
    assert ended == []  # no request waits for it
    assert (sorted(peer.released), orphans.released) == (
        ([0, 1], []) if paired else ([], ["r"])
    )
