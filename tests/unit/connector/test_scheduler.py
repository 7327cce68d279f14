"""The connector's scheduler half with untrusted requests: only leases this
node's HTTP layer signed are loaded, anything else prefills locally, and no
input makes it raise (it runs inside vLLM's scheduler) or wait for nothing."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from vllm.v1.request import RequestStatus

from pdserve.connector.scheduler_role import scheduler_half
from pdserve.lease import DO_REMOTE_DECODE, Lease, lease_token
from pdserve.settings import Settings
from pdserve.side_channel.protocol import prompt_hash

KEY = b"consumer-key".ljust(32, b"-")
PRODUCER_KEY = b"producer-key".ljust(32, b"-")
BLOCK = 16
PROMPT = list(range(100, 150))  # 50 tokens: 4 blocks


@dataclass
class FakeRequest:
    request_id: str
    prompt_token_ids: list[int] | None
    kv_transfer_params: Any
    status: RequestStatus = RequestStatus.WAITING
    arrival_time: float = field(default_factory=time.time)
    mm_features: list = field(default_factory=list)
    prompt_embeds: Any = None
    lora_request: Any = None
    # A finished prefill has sampled its first token.
    output_token_ids: list = field(default_factory=lambda: [7])


@dataclass
class FakeLora:
    lora_name: str
    lora_path: str


@dataclass
class FakeBlocks:
    ids: list[int] = field(default_factory=list)

    def get_block_ids(self):
        return (self.ids,)


def consumer():
    settings = Settings(role="consumer", model="m")
    return scheduler_half(settings, BLOCK, KEY)


def producer(num_blocks: int = 1000, clock=time.time):
    settings = Settings(role="producer", model="m", kv_ports=[7001])
    return scheduler_half(
        settings, BLOCK, PRODUCER_KEY, num_blocks=num_blocks, clock=clock
    )


def finished_prefill(rid: str = "prod-1", **fields) -> FakeRequest:
    req = request({DO_REMOTE_DECODE: True}, rid=rid)
    req.status = RequestStatus.FINISHED_LENGTH_CAPPED
    for name, value in fields.items():
        setattr(req, name, value)
    return req


def lease(prompt=PROMPT, blocks=(11, 12, 13, 14), **changes) -> Lease:
    digest = prompt_hash(prompt)
    issued = Lease(
        request_id="prod-1",
        token=lease_token(PRODUCER_KEY, "prod-1", digest),
        instance_id="e1",
        block_ids=list(blocks),
        prompt_hash=digest,
        num_prompt_tokens=len(prompt),
        kv_ports=[7001],
    )
    return msgspec.structs.replace(issued, **changes)


def signed_params(kv_host="10.0.0.1", **changes) -> dict:
    return lease(**changes).signed(KEY, kv_host).to_params()


def request(params, prompt=PROMPT, rid="req-1") -> FakeRequest:
    return FakeRequest(rid, list(prompt), params)


def test_signed_lease_is_loaded_into_allocated_blocks():
    sched = consumer()
    req = request(signed_params())
    assert sched.get_num_new_matched_tokens(req, 0) == (50, True)
    sched.update_state_after_alloc(req, FakeBlocks([1, 2, 3, 4]), 50)
    (load,) = sched.build_connector_meta(NOTHING).loads
    assert load.remote_block_ids == [11, 12, 13, 14]
    assert load.local_block_ids == [1, 2, 3, 4]
    assert load.lease == lease().signed(KEY, "10.0.0.1")


def test_local_prefix_hit_loads_only_the_rest():
    sched = consumer()
    req = request(signed_params())
    assert sched.get_num_new_matched_tokens(req, 32) == (18, True)
    sched.update_state_after_alloc(req, FakeBlocks([7, 8, 3, 4]), 18)
    (load,) = sched.build_connector_meta(NOTHING).loads
    assert load.remote_block_ids == [13, 14]
    assert load.local_block_ids == [3, 4]


def test_repeated_matching_is_free_of_side_effects():
    sched = consumer()
    req = request(signed_params())
    for _ in range(3):  # vLLM asks again when allocation failed
        assert sched.get_num_new_matched_tokens(req, 0) == (50, True)
    assert sched.build_connector_meta(NOTHING).releases == []


def test_forged_do_remote_prefill_prefills_locally():
    """The request that used to kill the consumer's engine."""
    sched = consumer()
    req = request({"do_remote_prefill": True})
    assert sched.get_num_new_matched_tokens(req, 0) == (0, False)
    assert sched.request_finished(req, [1]) == (False, None)
    meta = sched.build_connector_meta(NOTHING)
    assert meta.loads == [] and meta.releases == []
    assert sched.take_stats().data["kv_leases_refused"] == 1


@pytest.mark.parametrize(
    "params",
    [
        lease().to_params(),  # unsigned: as the producer answered it
        lease().signed(b"another-node-key".ljust(32, b"-"), "10.0.0.1").to_params(),
        {
            **signed_params(),
            "pdserve_lease": {
                **signed_params()["pdserve_lease"],
                "block_ids": [1, 2, 3, 4],
            },
        },
    ],
    ids=["unsigned", "other-key", "tampered"],
)
def test_leases_not_signed_here_are_never_loaded_or_released(params):
    sched = consumer()
    req = request(params)
    assert sched.get_num_new_matched_tokens(req, 0) == (0, False)
    meta = sched.build_connector_meta(NOTHING)
    assert meta.loads == [] and meta.releases == []


def test_lease_for_other_tokens_is_released_not_loaded():
    sched = consumer()
    other = list(range(200, 250))
    req = request(signed_params(prompt=other), prompt=PROMPT)
    assert sched.get_num_new_matched_tokens(req, 0) == (0, False)
    assert sched.build_connector_meta(NOTHING).releases == [
        lease(prompt=other).signed(KEY, "10.0.0.1")
    ]
    assert sched.take_stats().data["kv_prompt_mismatches"] == 1


@pytest.mark.parametrize(
    "changes",
    [dict(blocks=(11, 12, 13)), dict(num_prompt_tokens=49), dict(kv_host="")],
)
def test_inconsistent_signed_lease_is_released(changes):
    sched = consumer()
    req = request(signed_params(**changes))
    assert sched.get_num_new_matched_tokens(req, 0) == (0, False)
    assert len(sched.build_connector_meta(NOTHING).releases) == 1


def test_nothing_left_to_load_never_waits():
    sched = consumer()
    req = request(signed_params())
    assert sched.get_num_new_matched_tokens(req, 50) == (0, False)
    assert len(sched.build_connector_meta(NOTHING).releases) == 1
    assert sched.get_num_new_matched_tokens(request(None, prompt=[]), 0) == (0, False)


def test_zero_external_tokens_after_alloc_releases():
    sched = consumer()
    req = request(signed_params())
    sched.get_num_new_matched_tokens(req, 0)
    sched.update_state_after_alloc(req, FakeBlocks([1, 2, 3, 4]), 0)
    meta = sched.build_connector_meta(NOTHING)
    assert meta.loads == [] and len(meta.releases) == 1


def test_blocks_that_do_not_fit_fail_the_load_instead_of_hanging():
    sched = consumer()
    req = request(signed_params())
    sched.get_num_new_matched_tokens(req, 0)
    sched.update_state_after_alloc(req, FakeBlocks([1, 2]), 50)
    meta = sched.build_connector_meta(NOTHING)
    assert meta.loads == []
    assert meta.failed_loads == [("req-1", [1, 2])]


def test_request_ending_before_its_pull_releases():
    sched = consumer()
    req = request(signed_params())
    sched.get_num_new_matched_tokens(req, 0)
    sched.request_finished(req, [])
    assert len(sched.build_connector_meta(NOTHING).releases) == 1


def test_lease_handed_back_by_the_frontend_is_released_once():
    """vLLM submits a pre-aborted request carrying the lease (a request it
    rejected, a client that left): only request_finished runs."""
    sched = consumer()
    params = signed_params()
    sched.request_finished(request(params, prompt=[0], rid="hand-back"), [])
    assert sched.build_connector_meta(NOTHING).releases == [
        lease().signed(KEY, "10.0.0.1")
    ]
    sched.request_finished(request(params, prompt=[0], rid="hand-back"), [])
    assert sched.build_connector_meta(NOTHING).releases == []  # params now spent


def test_consumer_ignores_do_remote_decode():
    sched = consumer()
    req = request({DO_REMOTE_DECODE: True})
    req.status = RequestStatus.FINISHED_LENGTH_CAPPED
    assert sched.request_finished(req, [1, 2]) == (False, None)


def test_producer_leases_finished_prefills():
    sched = producer()
    req = request({DO_REMOTE_DECODE: True}, rid="prod-1")
    req.status = RequestStatus.FINISHED_LENGTH_CAPPED
    delay, params = sched.request_finished(req, [11, 12, 13, 14])
    assert delay is True
    issued = Lease.from_params(params)
    assert issued is not None
    assert issued.block_ids == [11, 12, 13, 14]
    assert issued.prompt_hash == prompt_hash(PROMPT)
    assert issued.token == lease_token(PRODUCER_KEY, "prod-1", prompt_hash(PROMPT))
    assert issued.instance_id == sched.settings.instance_id
    (grant,) = sched.build_connector_meta(NOTHING).grants
    assert grant.block_ids == [11, 12, 13, 14]


def test_leased_blocks_are_capped_and_freed_when_leases_end():
    """Anyone reaching a producer must not pin all its KV: past the cap a
    prefill is answered without a lease (the consumer prefills locally)."""
    sched = producer(num_blocks=16)  # cap: 8 blocks
    assert sched.request_finished(finished_prefill("a"), [1, 2, 3, 4])[0]
    assert sched.request_finished(finished_prefill("b"), [5, 6, 7, 8])[0]
    assert sched.request_finished(finished_prefill("c"), [9]) == (
        False,
        {"pdserve_refused": "lease_cap"},
    )

    sched.update_connector_output(Output(set(), finished_sending={"a"}))
    assert sched.request_finished(finished_prefill("c"), [9])[0]


def test_no_lease_is_issued_that_its_consumer_could_not_take():
    """A 300-character request id (a client's X-Request-Id on a producer
    called directly) would give a lease the consumer cannot parse, pinned
    until it expired: none is issued, the blocks are freed at once."""
    sched = producer()
    assert sched.request_finished(finished_prefill("x" * 300), [1, 2]) == (
        False,
        {"pdserve_refused": "unleasable"},
    )
    assert sched.build_connector_meta(NOTHING).grants == []
    assert sched.request_finished(finished_prefill("ok"), [1, 2])[0]


def test_multimodal_prefills_are_never_leased():
    """Placeholder ids are the same for any image of a size: the token ids
    cannot tell whose KV it is."""
    sched = producer()
    assert sched.request_finished(finished_prefill(mm_features=[object()]), [1]) == (
        False,
        {"pdserve_refused": "multimodal"},
    )


def test_consumer_refuses_leases_for_inputs_the_fingerprint_does_not_cover():
    sched = consumer()
    req = request(signed_params())
    req.mm_features = [object()]
    assert sched.get_num_new_matched_tokens(req, 0) == (0, False)
    assert sched.build_connector_meta(NOTHING).releases == [
        lease().signed(KEY, "10.0.0.1")
    ]


def test_lease_covers_the_lora_adapter():
    """The same tokens under another adapter have other KV: refused."""
    sched = producer()
    lora = FakeLora("sql", "/adapters/sql")
    _, params = sched.request_finished(finished_prefill(lora_request=lora), [1, 2])
    issued = Lease.from_params(params)
    assert issued.prompt_hash == prompt_hash(PROMPT, "sql\0/adapters/sql")
    assert issued.prompt_hash != prompt_hash(PROMPT)

    sched = consumer()
    other = FakeLora("sql", "/elsewhere/sql")
    signed = lease(prompt_hash=issued.prompt_hash).signed(KEY, "10.0.0.1")
    req = request(signed.to_params())
    req.lora_request = other
    assert sched.get_num_new_matched_tokens(req, 0) == (0, False)
    req = request(signed.to_params(), rid="req-2")
    req.lora_request = lora
    assert sched.get_num_new_matched_tokens(req, 0) == (50, True)


@pytest.mark.parametrize(
    "params", [{"do_remote_decode": "yes"}, {"do_remote_decode": 1}, None, [], "x"]
)
def test_producer_leases_only_on_an_exact_request(params):
    sched = producer()
    req = request(params)
    req.status = RequestStatus.FINISHED_LENGTH_CAPPED
    assert sched.request_finished(req, [1]) == (False, None)


def test_producer_never_loads():
    sched = producer()
    assert sched.get_num_new_matched_tokens(request(signed_params()), 0) == (0, False)


def test_aborted_prefill_gets_no_lease():
    sched = producer()
    req = request({DO_REMOTE_DECODE: True})
    req.status = RequestStatus.FINISHED_ABORTED
    assert sched.request_finished(req, [1]) == (False, None)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(st.text(max_size=12), inner, max_size=4)
    ),
    max_leaves=20,
)
lease_like = st.fixed_dictionaries(
    {}, optional={k: json_values for k in Lease.__struct_fields__}
)


@settings(max_examples=300, deadline=None)
@given(
    params=st.one_of(
        json_values,
        st.dictionaries(
            st.sampled_from(["do_remote_prefill", "do_remote_decode", "pdserve_lease"]),
            json_values,
        ),
        st.builds(
            lambda lease_: {"do_remote_prefill": True, "pdserve_lease": lease_},
            lease_like,
        ),
    ),
    role=st.sampled_from(["consumer", "producer"]),
    computed=st.integers(0, 60),
)
def test_no_params_make_it_raise_or_load(params, role, computed):
    sched = consumer() if role == "consumer" else producer()
    req = request(params)
    tokens, load = sched.get_num_new_matched_tokens(req, computed)
    assert (tokens, load) == (0, False)
    sched.update_state_after_alloc(req, FakeBlocks([1, 2, 3, 4]), 0)
    req.status = RequestStatus.FINISHED_STOPPED
    sched.request_finished(req, [1, 2])
    meta = sched.build_connector_meta(NOTHING)
    assert meta.loads == [] and meta.releases == []
    stats = sched.take_stats()
    assert stats is None or stats.data["kv_connector_errors"] == 0


class Exploding(FakeBlocks):
    def get_block_ids(self):
        if getattr(self, "calls", 0):
            return super().get_block_ids()
        self.calls = 1
        raise RuntimeError("a bug")


def test_error_while_scheduling_a_pull_fails_it_instead_of_hanging():
    sched = consumer()
    req = request(signed_params())
    sched.get_num_new_matched_tokens(req, 0)
    sched.update_state_after_alloc(req, Exploding([1, 2, 3, 4]), 50)
    meta = sched.build_connector_meta(NOTHING)
    assert meta.loads == []
    assert meta.failed_loads == [("req-1", [1, 2, 3, 4])]
    assert len(meta.releases) == 1
    assert sched.take_stats().data["kv_connector_errors"] == 1


def test_ttft_phases_are_measured():
    """Producer: queue and prefill ride in the lease. Consumer: queue, and
    the first-token step after the pull."""
    now = [1000.0]
    prod = producer(clock=lambda: now[0])
    req = request({DO_REMOTE_DECODE: True}, rid="prod-1")
    req.arrival_time = 999.5
    prod.build_connector_meta(Scheduled({"prod-1": 50}))
    now[0] += 0.05  # the prefill's forward
    req.status = RequestStatus.FINISHED_LENGTH_CAPPED
    issued = Lease.from_params(prod.request_finished(req, [11, 12, 13, 14])[1])
    assert issued.producer_queue_seconds == pytest.approx(0.5)
    assert issued.producer_prefill_seconds == pytest.approx(0.05)

    cons = consumer()
    creq = request(signed_params())
    creq.arrival_time = time.time() - 0.2
    cons.get_num_new_matched_tokens(creq, 0)
    cons.update_state_after_alloc(creq, FakeBlocks([1, 2, 3, 4]), 50)
    (load,) = cons.build_connector_meta(Scheduled({})).loads
    assert abs(load.scheduled_at - time.time()) < 0.1
    cons.update_connector_output(Output({"req-1"}))
    cons.build_connector_meta(Scheduled({"req-1": 1}))  # its first-token step
    cons.build_connector_meta(Scheduled({"req-1": 1}))  # ... has run
    data = cons.take_stats().data
    assert len(data["ttft_consumer_queue_seconds"]) == 1
    assert data["ttft_consumer_queue_seconds"][0] >= 0.2
    assert len(data["ttft_first_token_seconds"]) == 1


def test_requests_aborted_during_their_pull_leave_no_phase_behind(monkeypatch):
    """Each request aborted while its KV was pulled used to leave an entry:
    once the table was full, no first-token phase was recorded again."""
    from pdserve.connector import phases

    monkeypatch.setattr(phases, "MAX_TRACKED", 4)
    cons = consumer()
    for i in range(6):
        req = request(signed_params(), rid=f"gone-{i}")
        cons.get_num_new_matched_tokens(req, 0)
        cons.update_state_after_alloc(req, FakeBlocks([1, 2, 3, 4]), 50)
        cons.build_connector_meta(Scheduled({}))
        cons.request_finished(req, [1, 2, 3, 4])  # aborted mid-pull
        cons.update_connector_output(Output({f"gone-{i}"}))  # its pull ends
    req = request(signed_params(), rid="kept")
    cons.get_num_new_matched_tokens(req, 0)
    cons.update_state_after_alloc(req, FakeBlocks([1, 2, 3, 4]), 50)
    cons.build_connector_meta(Scheduled({}))
    cons.update_connector_output(Output({"kept"}))
    cons.build_connector_meta(Scheduled({"kept": 1}))
    cons.build_connector_meta(Scheduled({"kept": 1}))
    assert len(cons.take_stats().data["ttft_first_token_seconds"]) == 1


@dataclass
class Scheduled:
    """The parts of vLLM's SchedulerOutput the connector reads."""

    num_scheduled_tokens: dict = field(default_factory=dict)

    @property
    def total_num_scheduled_tokens(self) -> int:
        return sum(self.num_scheduled_tokens.values())


# A step that schedules nothing (the connector's own work only).
NOTHING = Scheduled()


@dataclass
class Output:
    finished_recving: set
    finished_sending: set = field(default_factory=set)


def test_each_step_tells_the_workers_whether_it_computes():
    """Producer ranks pace on CPU in steps that compute nothing."""
    from types import SimpleNamespace

    sched = producer()
    idle = SimpleNamespace(total_num_scheduled_tokens=0)
    busy = SimpleNamespace(total_num_scheduled_tokens=7)
    assert sched.build_connector_meta(idle).forward is False
    assert sched.build_connector_meta(busy).forward is True
