"""The producer's lease table: every lease ends exactly once, by release or
expiry, never while a read of it is in progress, and only reads that fit it
(prompt hash, block ids) are let in."""

from __future__ import annotations

import pytest

from pdserve.side_channel.leases import (
    MAX_EARLY_RELEASES,
    LeaseTable,
    ReadRefused,
    Verdict,
)

H = "hash-1"


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def table(clock) -> LeaseTable:
    return LeaseTable(lease_seconds=10.0, clock=clock)


def test_nothing_finished_initially(table):
    assert table.pop_finished() == (set(), 0)
    assert len(table) == 0


def test_grant_then_release(table):
    table.grant("r1", [3, 1, 2], H)
    assert len(table) == 1
    assert table.pop_finished() == (set(), 0)  # still leased
    assert table.release("r1", H) is True
    assert table.pop_finished() == ({"r1"}, 0)
    assert table.pop_finished() == (set(), 0)  # handed back once
    assert table.release("r1", H) is False
    assert table.take_released() == 1


def test_table_keeps_its_own_block_list(table):
    blocks = [7, 5, 9]
    table.grant("r1", blocks, H)
    blocks.append(100)
    with pytest.raises(ReadRefused, match="outside"):
        table.open_read("r1", H, [100])


def test_expiry_after_lease_seconds(table, clock):
    table.grant("r1", [1], H)
    clock.advance(9.999)
    assert table.pop_finished() == (set(), 0)
    clock.advance(0.001)
    assert table.pop_finished() == ({"r1"}, 1)
    assert len(table) == 0


def test_read_pins_the_lease_past_its_expiry(table, clock):
    table.grant("r1", [1, 2], H)
    assert table.open_read("r1", H, [2]) is Verdict.READY
    clock.advance(60)
    assert table.pop_finished() == (set(), 0)
    table.close_read("r1")
    assert table.pop_finished() == ({"r1"}, 1)


def test_release_waits_for_the_read_in_progress(table):
    table.grant("r1", [1, 2], H)
    table.open_read("r1", H, [1, 2])
    assert table.release("r1", H) is True
    assert table.pop_finished() == (set(), 0)  # still being read
    table.close_read("r1")
    assert table.pop_finished() == ({"r1"}, 0)


def test_hold_keeps_blocks_until_release_or_its_end(table, clock):
    table.grant("r1", [1], H)
    table.open_read("r1", H, [1])
    table.hold("r1", 30)  # the consumer copies by itself
    table.close_read("r1")
    clock.advance(20)  # lease expired, hold not
    assert table.pop_finished() == (set(), 0)
    clock.advance(11)
    assert table.pop_finished() == ({"r1"}, 1)


def test_release_ends_a_hold(table, clock):
    table.grant("r1", [1], H)
    table.open_read("r1", H, [1])
    table.hold("r1", 30)
    table.close_read("r1")
    assert table.release("r1", H) is True
    assert table.pop_finished() == ({"r1"}, 0)


@pytest.mark.parametrize(
    "blocks, reason",
    [([1, 1], "duplicate"), ([1, 9], "outside"), ([1, 2, 3], "more blocks")],
)
def test_reads_that_do_not_fit_the_lease_are_refused(table, blocks, reason):
    table.grant("r1", [1, 2], H)
    with pytest.raises(ReadRefused, match=reason):
        table.open_read("r1", H, blocks)
    table.release("r1", H)
    assert table.pop_finished() == ({"r1"}, 0)  # nothing pinned by the refusal


def test_read_with_another_prompt_hash_refused(table):
    table.grant("r1", [1], H)
    with pytest.raises(ReadRefused, match="prompt hash"):
        table.open_read("r1", "other", [1])


def test_read_before_grant_waits_after_end_refused(table):
    assert table.open_read("r1", H, [1]) is Verdict.NOT_YET_GRANTED
    table.grant("r1", [1], H)
    table.release("r1", H)
    table.pop_finished()
    with pytest.raises(ReadRefused, match="ended"):
        table.open_read("r1", H, [1])


def test_read_of_released_lease_refused(table):
    table.grant("r1", [1], H)
    table.open_read("r1", H, [1])
    table.release("r1", H)
    with pytest.raises(ReadRefused, match="released"):
        table.open_read("r1", H, [1])


def test_release_with_other_prompt_hash_ignored(table):
    table.grant("r1", [1], H)
    assert table.release("r1", "other") is False
    assert len(table) == 1


def test_early_release_finishes_the_later_grant(table):
    assert table.release("r1", H) is False
    table.grant("r1", [4, 5], H)
    assert len(table) == 0
    assert table.pop_finished() == ({"r1"}, 0)


def test_early_releases_are_bounded(table):
    for i in range(MAX_EARLY_RELEASES + 100):
        table.release(f"r{i}", H)
    assert len(table._early_releases) == MAX_EARLY_RELEASES
    table.grant("r0", [1], H)  # the oldest was forgotten: a normal lease
    assert len(table) == 1


def test_early_release_is_forgotten_after_lease_seconds(table, clock):
    table.release("r1", H)
    clock.advance(10)
    table.pop_finished()
    table.grant("r1", [4], H)
    assert len(table) == 1


def test_duplicate_grant_changes_nothing(table):
    table.grant("r1", [1], H)
    table.grant("r1", [2], "other")
    table.open_read("r1", H, [1])
    table.close_read("r1")
    table.release("r1", H)
    assert table.pop_finished() == ({"r1"}, 0)
    table.grant("r1", [3], H)  # after its end
    assert len(table) == 0


def test_ended_leases_are_forgotten_after_lease_seconds(table, clock):
    table.grant("r1", [1], H)
    clock.advance(10)
    assert table.pop_finished() == ({"r1"}, 1)
    clock.advance(10)
    table.pop_finished()
    assert table.open_read("r1", H, [1]) is Verdict.NOT_YET_GRANTED


def test_close_read_without_a_read_is_harmless(table):
    table.close_read("nobody")
    table.grant("r1", [1], H)
    table.close_read("r1")
    assert len(table) == 1


def test_steps_are_counted(table):
    table.tick()
    table.tick()
    assert table.step == 2


def test_lease_read_by_several_consumer_ranks_ends_with_the_last_release(table):
    """TP 1 producer, TP 2 consumer: both consumer ranks read and release."""
    table.grant("r", [1, 2], H)
    assert table.release("r", H, needed=2, consumer="c/0")
    assert table.pop_finished() == (set(), 0)
    assert table.open_read("r", H, [1, 2]) is Verdict.READY  # the second rank
    table.close_read("r")
    table.release("r", H, needed=2, consumer="c/1")
    assert table.pop_finished() == ({"r"}, 0)


def test_early_releases_of_several_ranks_count_when_the_grant_comes(table):
    table.release("r", H, needed=2, consumer="c/0")
    table.grant("r", [1], H)
    assert table.pop_finished() == (set(), 0)
    table.release("r", H, needed=2, consumer="c/1")
    assert table.pop_finished() == ({"r"}, 0)


@pytest.mark.parametrize("early", [False, True], ids=["granted", "early"])
def test_a_release_sent_again_counts_once(table, early):
    """A consumer rank sends its release again after its connection broke
    (it may have arrived): the lease still waits for the other rank."""
    if not early:
        table.grant("r", [1], H)
    for _ in range(3):
        table.release("r", H, needed=2, consumer="c/0")
    if early:
        table.grant("r", [1], H)
    assert table.pop_finished() == (set(), 0)
    assert len(table) == 1
    table.release("r", H, needed=2, consumer="c/1")
    assert table.pop_finished() == ({"r"}, 0)
