"""A producer TP rank's step on CPU: when it sleeps to give the cores back."""

from __future__ import annotations

import pytest

from pdserve.connector import producer_rank
from pdserve.connector.metadata import LeaseGrant
from pdserve.connector.producer_rank import ProducerRank
from pdserve.settings import Settings
from tests.unit.side_channel_fakes import NODE_KEY, paged_kv, rank_info_for


@pytest.fixture
def paces(monkeypatch) -> list[float]:
    """The sleeps the rank's steps take."""
    slept: list[float] = []
    monkeypatch.setattr(producer_rank, "pace", lambda _device, s: slept.append(s))
    return slept


def producer(closing) -> ProducerRank:
    kv = paged_kv()
    settings = Settings(role="producer", model="m", kv_host="127.0.0.1", kv_ports=[0])
    rank = ProducerRank(settings, kv, rank_info_for(kv), 0, NODE_KEY, None)
    closing(rank.server)
    return rank


def test_a_rank_holding_no_lease_paces_when_the_engine_steps_only_for_leases(
    closing, paces
):
    """Any rank's lease keeps the whole engine stepping. Only the ranks that
    held one used to pace; a rank without one spun through those steps and
    starved the consumer's engine on its core until the other ranks' leases
    expired (two TP 2 nodes on two cores, test_tensor_parallel)."""
    rank = producer(closing)
    rank.start([], forward=False)
    rank.finished()
    assert len(paces) == 1


def test_steps_that_compute_are_not_slowed(closing, paces):
    rank = producer(closing)
    rank.start([LeaseGrant("r", [1], "h")], forward=True)
    rank.finished()
    assert paces == []  # its prefill step, leases held or not


def test_a_rank_paces_while_it_holds_a_lease_nobody_reads(closing, paces):
    rank = producer(closing)
    rank.start([LeaseGrant("r", [1], "h")], forward=False)
    rank.finished()
    assert len(paces) == 1
