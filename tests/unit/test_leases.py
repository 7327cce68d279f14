"""The producer's lease table: every lease ends exactly once, by release or
expiry, and only its token opens it."""

from __future__ import annotations

import threading
import time

import pytest

from pdserve.connector.leases import LeaseTable


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
    table.grant("r1", [3, 1, 2], "tok")
    assert len(table) == 1
    assert table.pop_finished() == (set(), 0)  # still leased
    assert table.release("r1", "tok") is True
    assert len(table) == 0
    assert table.pop_finished() == ({"r1"}, 0)
    assert table.pop_finished() == (set(), 0)  # handed back once
    assert table.release("r1", "tok") is False


def test_wait_for_returns_the_lease(table):
    blocks = [7, 5, 9]
    table.grant("r1", blocks, "tok")
    blocks.append(100)  # the table keeps its own copy
    lease = table.wait_for("r1", "tok", timeout=1.0)
    assert lease.block_ids == [7, 5, 9]
    assert lease.token == "tok"


def test_leases_are_independent(table):
    table.grant("a", [1], "ta")
    table.grant("b", [2], "tb")
    assert table.release("a", "ta") is True
    assert table.pop_finished() == ({"a"}, 0)
    assert table.wait_for("b", "tb", timeout=1.0).block_ids == [2]
    assert len(table) == 1


def test_expiry_after_lease_seconds(table, clock):
    table.grant("r1", [1], "tok")
    clock.advance(9.999)
    assert table.pop_finished() == (set(), 0)
    assert len(table) == 1
    clock.advance(0.001)
    assert table.pop_finished() == ({"r1"}, 1)
    assert len(table) == 0
    assert table.pop_finished() == (set(), 0)


def test_expiry_counts_only_expired_leases(table, clock):
    table.grant("old", [1], "t")
    clock.advance(5)
    table.grant("young", [2], "t")
    table.grant("released", [3], "t")
    table.release("released", "t")
    clock.advance(5)
    assert table.pop_finished() == ({"old", "released"}, 1)
    assert len(table) == 1
    clock.advance(5)
    assert table.pop_finished() == ({"young"}, 1)


def test_release_after_expiry_is_refused(table, clock):
    table.grant("r1", [1], "tok")
    clock.advance(10)
    assert table.pop_finished() == ({"r1"}, 1)
    assert table.release("r1", "tok") is False
    with pytest.raises(LookupError):
        table.wait_for("r1", "tok", timeout=0)
    assert table.pop_finished() == (set(), 0)


def test_lease_past_expiry_ends_once(table, clock):
    # Expiry happens in pop_finished; until then the blocks are still held,
    # so a late release ends the lease, and it is not counted as expired.
    table.grant("r1", [1], "tok")
    clock.advance(10)
    assert table.release("r1", "tok") is True
    assert table.pop_finished() == ({"r1"}, 0)
    assert table.pop_finished() == (set(), 0)


def test_wrong_token_on_release(table):
    table.grant("r1", [1], "right")
    with pytest.raises(PermissionError):
        table.release("r1", "wrong")
    # The lease survives a wrong token.
    assert len(table) == 1
    assert table.pop_finished() == (set(), 0)
    assert table.release("r1", "right") is True


def test_wrong_token_on_wait_for(table):
    table.grant("r1", [1], "right")
    with pytest.raises(PermissionError):
        table.wait_for("r1", "wrong", timeout=1.0)
    with pytest.raises(PermissionError):
        table.wait_for("r1", "", timeout=1.0)
    assert table.wait_for("r1", "right", timeout=1.0).block_ids == [1]


def test_early_release_finishes_the_later_grant(table):
    assert table.release("r1", "tok") is False
    assert table.pop_finished() == (set(), 0)
    table.grant("r1", [4, 5], "tok")
    assert len(table) == 0
    assert table.pop_finished() == ({"r1"}, 0)
    assert table.pop_finished() == (set(), 0)


def test_early_release_with_wrong_token_does_not_end_the_lease(table):
    table.release("r1", "forged")
    table.grant("r1", [4], "tok")
    assert len(table) == 1
    assert table.pop_finished() == (set(), 0)
    assert table.wait_for("r1", "tok", timeout=1.0).block_ids == [4]


def test_early_release_is_forgotten_after_lease_seconds(table, clock):
    table.release("r1", "tok")
    clock.advance(10)
    assert table.pop_finished() == (set(), 0)
    table.grant("r1", [4], "tok")
    assert len(table) == 1  # a normal lease again
    assert table.pop_finished() == (set(), 0)


def test_wait_for_blocks_until_granted():
    table = LeaseTable(lease_seconds=30.0)
    granted_at: list[float] = []

    def grant_later() -> None:
        time.sleep(0.1)
        granted_at.append(time.monotonic())
        table.grant("r1", [8, 9], "tok")

    thread = threading.Thread(target=grant_later)
    start = time.monotonic()
    thread.start()
    lease = table.wait_for("r1", "tok", timeout=5.0)
    returned = time.monotonic()
    thread.join()
    assert lease.block_ids == [8, 9]
    assert granted_at and returned >= granted_at[0]
    assert returned - start < 2.0


def test_wait_for_times_out_without_grant():
    table = LeaseTable(lease_seconds=30.0)
    start = time.monotonic()
    with pytest.raises(LookupError):
        table.wait_for("missing", "tok", timeout=0.2)
    elapsed = time.monotonic() - start
    assert 0.19 <= elapsed < 2.0


def test_wait_for_finished_request_fails_fast():
    table = LeaseTable(lease_seconds=30.0)
    table.grant("r1", [1], "tok")
    table.release("r1", "tok")
    start = time.monotonic()
    with pytest.raises(LookupError):
        table.wait_for("r1", "tok", timeout=5.0)
    assert time.monotonic() - start < 1.0


def test_read_of_an_ended_lease_fails_fast_in_later_steps():
    # The consumer's engine and its HTTP layer may both end a lease (the
    # client went away); a read arriving after that must not wait for a grant.
    table = LeaseTable(lease_seconds=30.0)
    table.grant("r1", [1], "tok")
    table.release("r1", "tok")
    assert table.pop_finished() == ({"r1"}, 0)
    start = time.monotonic()
    with pytest.raises(LookupError):
        table.wait_for("r1", "tok", timeout=5.0)
    assert time.monotonic() - start < 1.0


def test_second_release_is_a_no_op(table, clock):
    table.grant("r1", [1], "tok")
    assert table.release("r1", "tok") is True
    assert table.pop_finished() == ({"r1"}, 0)
    assert table.release("r1", "tok") is False
    assert table.pop_finished() == (set(), 0)
    assert table.take_released() == 1
    # Not kept as an early release: a grant would not be ended by it.
    table.grant("r1", [2], "tok")
    assert len(table) == 1


def test_ended_leases_are_forgotten_after_lease_seconds(table, clock):
    table.grant("r1", [1], "tok")
    clock.advance(10)
    assert table.pop_finished() == ({"r1"}, 1)
    clock.advance(10)
    table.pop_finished()
    # Forgotten: a release is remembered as an early one again.
    assert table.release("r1", "tok") is False
    table.grant("r1", [2], "tok")
    assert len(table) == 0


def test_released_counts_releases_not_expiries(table, clock):
    table.grant("a", [1], "t")
    table.grant("b", [2], "t")
    table.release("early", "t")
    table.grant("early", [3], "t")
    assert table.release("a", "t") is True
    clock.advance(10)
    assert table.pop_finished() == ({"a", "b", "early"}, 1)
    assert table.take_released() == 2
    assert table.take_released() == 0
