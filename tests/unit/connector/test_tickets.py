"""Requests admitted before their lease (tickets): the engine waits for the
answer without blocking, takes the lease when it comes, prefills locally on
a refusal or at the deadline, and never keeps a lease nobody will read.
Answers reach the engine as vLLM hands it KV-transfer parameters outside a
request: a request aborted on arrival, whose request_finished runs."""

from __future__ import annotations

import msgspec
import pytest

from pdserve.connector.scheduler_role import scheduler_half
from pdserve.settings import Settings
from pdserve.ticket import Cancel, Delivery, Ticket, message_params
from tests.unit.connector.test_scheduler import (
    BLOCK,
    KEY,
    NOTHING,
    FakeBlocks,
    lease,
    request,
)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def node():
    clock = Clock()
    settings = Settings(role="consumer", model="m", prefill_timeout=60)
    return scheduler_half(settings, BLOCK, KEY, clock=clock), clock


def ticketed(clock: Clock, rid: str = "req-1", deadline: float = 60.0):
    ticket = Ticket.issue(KEY, clock.now + deadline, handed_at=clock.now)
    return ticket, request(ticket.to_params(), rid=rid)


def deliver(sched, message, key: bytes = KEY) -> None:
    """As the HTTP layer hands it over: a request aborted on arrival."""
    params = message_params(key, message)
    sched.request_finished(request(params, prompt=[0], rid="pdserve-answer"), [])


def signed_lease():
    return lease().signed(KEY, "10.0.0.1")


def test_request_waits_without_blocking_then_loads_its_lease(node):
    sched, clock = node
    ticket, req = ticketed(clock)
    assert sched.get_num_new_matched_tokens(req, 0) == (None, False)  # not yet
    deliver(sched, Delivery(ticket.id, signed_lease()))
    assert sched.get_num_new_matched_tokens(req, 0) == (50, True)
    sched.update_state_after_alloc(req, FakeBlocks([1, 2, 3, 4]), 50)
    (load,) = sched.build_connector_meta(NOTHING).loads
    assert load.lease == signed_lease()


def test_answer_may_come_before_the_request(node):
    sched, clock = node
    ticket, req = ticketed(clock)
    deliver(sched, Delivery(ticket.id, signed_lease()))
    assert sched.get_num_new_matched_tokens(req, 0) == (50, True)


def test_refusal_prefills_locally(node):
    sched, clock = node
    ticket, req = ticketed(clock)
    deliver(sched, Delivery(ticket.id, refused="producer_down"))
    assert sched.get_num_new_matched_tokens(req, 0) == (0, False)


def test_no_answer_by_the_deadline_prefills_locally(node):
    sched, clock = node
    _, req = ticketed(clock, deadline=5)
    assert sched.get_num_new_matched_tokens(req, 0) == (None, False)
    clock.now += 6
    assert sched.get_num_new_matched_tokens(req, 0) == (0, False)
    assert sched.take_stats().data["kv_tickets_expired"] == 1


def test_lease_of_a_request_that_ended_first_is_released(node):
    """The client left while the producer prefilled: vLLM ended the request;
    its lease arrives afterwards and goes straight back."""
    sched, clock = node
    ticket, req = ticketed(clock)
    assert sched.get_num_new_matched_tokens(req, 0) == (None, False)
    sched.request_finished(req, [])
    deliver(sched, Delivery(ticket.id, signed_lease()))
    assert sched.build_connector_meta(NOTHING).releases == [signed_lease()]


def test_answer_whose_request_never_comes_is_released_when_it_expires(node):
    sched, clock = node
    ticket, _ = ticketed(clock)
    deliver(sched, Delivery(ticket.id, signed_lease()))
    assert sched.build_connector_meta(NOTHING).releases == []
    clock.now += 61
    assert sched.build_connector_meta(NOTHING).releases == [signed_lease()]


def test_cancel_releases_a_delivered_lease_at_once(node):
    sched, clock = node
    ticket, _ = ticketed(clock)
    deliver(sched, Delivery(ticket.id, signed_lease()))
    deliver(sched, Cancel(ticket.id))
    assert sched.build_connector_meta(NOTHING).releases == [signed_lease()]


def test_forged_ticket_answer_or_lease_is_never_loaded(node):
    sched, clock = node
    ticket, _ = ticketed(clock)
    forged = msgspec.structs.replace(ticket, deadline=ticket.deadline + 1)
    assert sched.get_num_new_matched_tokens(request(forged.to_params()), 0) == (
        0,
        False,
    )
    ticket, req = ticketed(clock, rid="req-2")
    deliver(sched, Delivery(ticket.id, signed_lease()), key=b"not-this-node")
    assert sched.get_num_new_matched_tokens(req, 0) == (None, False)  # ignored
    deliver(sched, Delivery(ticket.id, lease()))  # the producer's, never signed
    assert sched.get_num_new_matched_tokens(req, 0) == (0, False)
