"""A consumer rank's TP plan for a producer: which producer ranks it reads
(and how), which it only releases on, computed once per pairing."""

from __future__ import annotations

import pytest

from pdserve.connector import producer_peer
from pdserve.connector.tp_mapping import (
    HeadSlice,
    RankRole,
    UnsupportedMapping,
    tp_plan,
)
from tests.unit.side_channel_fakes import make_lease, paired_rank, run_load


def test_equal_tp_sizes_read_whole_blocks_from_the_same_rank():
    plan = tp_plan(0, 2, 2, 1, local_heads=4)  # heads unknown: not needed
    assert plan.slices == [HeadSlice(1, 0, 0, 4)]
    assert plan.roles == {1: RankRole(read=True, readers=1, whole=True, heads=None)}


def test_more_producer_ranks_each_read_for_its_heads():
    plan = tp_plan(4, 2, 1, 0, local_heads=4)
    assert plan.slices == [HeadSlice(0, 0, 0, 2), HeadSlice(1, 0, 2, 2)]
    assert plan.roles == {
        0: RankRole(read=True, readers=1, whole=False, heads=2),
        1: RankRole(read=True, readers=1, whole=False, heads=2),
    }


def test_ranks_nobody_reads_are_released_by_one_consumer_rank_each():
    """Two KV heads over TP 4: ranks 0,1 hold head 0, ranks 2,3 head 1. A
    TP 2 consumer reads ranks 0 and 3; rank 2 is released by consumer rank
    0 (2 % 2), rank 1 by consumer rank 1."""
    first, second = (tp_plan(2, 4, 2, rank, local_heads=1) for rank in (0, 1))
    assert [s.producer_rank for s in first.slices + second.slices] == [0, 3]
    assert {p: r.read for p, r in first.roles.items()} == {0: True, 2: False}
    assert {p: r.read for p, r in second.roles.items()} == {1: False, 3: True}
    assert {r.readers for plan in (first, second) for r in plan.roles.values()} == {1}


def test_one_producer_rank_read_by_several_consumer_ranks_counts_them():
    plans = [tp_plan(4, 1, 2, rank, local_heads=2) for rank in (0, 1)]
    assert [plan.roles[0].readers for plan in plans] == [2, 2]
    assert [plan.slices for plan in plans] == [
        [HeadSlice(0, 0, 0, 2)],
        [HeadSlice(0, 2, 0, 2)],
    ]


def test_heads_that_do_not_map_are_refused():
    with pytest.raises(UnsupportedMapping):
        tp_plan(3, 2, 1, 0, local_heads=3)


def test_the_plan_is_computed_once_per_pairing(closing, monkeypatch):
    planned = []
    plan = producer_peer.tp_plan
    monkeypatch.setattr(
        producer_peer, "tp_plan", lambda *args: planned.append(args) or plan(*args)
    )
    _, server, rank = paired_rank(closing)
    for block in (3, 4, 5):
        lease = make_lease(f"r{block}", [block], server.port)
        server.leases.grant(lease.request_id, [block], lease.prompt_hash)
        assert run_load(rank, server, lease, [block]) is None
    assert len(planned) == 1
