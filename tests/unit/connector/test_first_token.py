"""The first token from the producer, in a real vLLM scheduler (CPU, no
model): the consumer appends the lease's token as the request's first output
when it admits the request, emits it before any forward, and continues from
it; requests that cannot continue exactly keep computing it themselves."""

from __future__ import annotations

import copy
import json
import os

import msgspec
import pytest
import torch
from vllm.engine.arg_utils import EngineArgs
from vllm.sampling_params import SamplingParams
from vllm.utils.hashing import sha256
from vllm.v1.core.kv_cache_utils import get_request_block_hasher, init_none_hash
from vllm.v1.core.sched.scheduler import Scheduler
from vllm.v1.kv_cache_interface import (
    FullAttentionSpec,
    KVCacheConfig,
    KVCacheGroupSpec,
)
from vllm.v1.outputs import EMPTY_MODEL_RUNNER_OUTPUT, KVConnectorOutput
from vllm.v1.request import Request, RequestStatus
from vllm.v1.structured_output import StructuredOutputManager

from pdserve.connector.first_token import make_scheduler
from pdserve.connector.stats import PDServeStats
from pdserve.lease import NODE_KEY_ENV_VAR, FirstToken, Lease, LogprobsRow, node_key
from pdserve.settings import Settings
from pdserve.side_channel.protocol import prompt_hash
from pdserve.tiny_model import ensure_tiny_model

BLOCK = 16
init_none_hash(sha256)
HASHER = get_request_block_hasher(BLOCK, sha256)
PROMPT = list(range(100, 140))  # 40 tokens: 3 blocks
T1 = 321


@pytest.fixture(scope="module")
def model() -> str:
    return ensure_tiny_model()


@pytest.fixture(autouse=True)
def node_key_env(monkeypatch):
    monkeypatch.setenv(NODE_KEY_ENV_VAR, "ab" * 32)


def scheduler(model: str, async_scheduling: bool = False, run_dir: str = ""):
    settings = Settings(role="consumer", model=model, run_dir=run_dir)
    transfer = {
        "kv_connector": "PDServeConnector",
        "kv_connector_module_path": "pdserve.connector.connector",
        "kv_role": "kv_consumer",
        "kv_load_failure_policy": "recompute",
        "kv_connector_extra_config": {"pdserve": json.loads(settings.to_json())},
    }
    config = EngineArgs(
        model=model,
        dtype="float32",
        max_model_len=256,
        block_size=BLOCK,
        enforce_eager=True,
        kv_transfer_config=transfer,
        async_scheduling=async_scheduling,
    ).create_engine_config()
    config.cache_config.num_gpu_blocks = 64
    # vLLM's CPU platform turns asynchronous scheduling off; GPUs have it on.
    config.scheduler_config.async_scheduling = async_scheduling
    spec = FullAttentionSpec(
        block_size=BLOCK, num_kv_heads=2, head_size=16, dtype=torch.float32
    )
    kv_cache = KVCacheConfig(
        num_blocks=64,
        kv_cache_tensors=[],
        kv_cache_groups=[KVCacheGroupSpec(["model.layers.0.self_attn.attn"], spec)],
    )
    sched = make_scheduler(
        vllm_config=config,
        kv_cache_config=kv_cache,
        structured_output_manager=StructuredOutputManager(config),
        block_size=BLOCK,
        log_stats=True,
    )
    sched.test_stats = PDServeStats()
    return sched


FIRST = FirstToken(T1)


def leased_request(
    rid: str = "r1", first: FirstToken | None = FIRST, **sampling
) -> Request:
    digest = prompt_hash(PROMPT)
    lease = Lease(
        request_id="p-" + rid,
        token="t",
        instance_id="e",
        block_ids=[5, 6, 7],
        prompt_hash=digest,
        num_prompt_tokens=len(PROMPT),
        kv_ports=[7000],
        first_token=first,
    ).signed(node_key(), "10.0.0.9")
    params = SamplingParams(**({"max_tokens": 8, "temperature": 0} | sampling))
    params.update_from_generation_config({}, eos_token_id=2)
    params.extra_args = {"kv_transfer_params": lease.to_params()}
    return Request(rid, list(PROMPT), params, None, block_hasher=HASHER)


def step(sched, connector_output: KVConnectorOutput | None = None):
    """One engine step that runs no forward; (scheduler output, outputs)."""
    output = sched.schedule()
    runner = copy.copy(EMPTY_MODEL_RUNNER_OUTPUT)
    runner.kv_connector_output = connector_output
    outputs = sched.update_from_output(output, runner)
    # The connector's stats leave with each step's scheduler stats.
    for batch in outputs.values():
        stats = getattr(batch.scheduler_stats, "kv_connector_stats", None)
        if stats:
            PDServeStats(data=sched.test_stats.data).aggregate(PDServeStats(data=stats))
    return output, outputs


def emitted(outputs) -> list:
    return [o for batch in outputs.values() for o in batch.outputs]


def stats_of(sched) -> dict:
    return sched.test_stats.data


def test_first_token_goes_out_when_the_request_is_admitted(model):
    sched = scheduler(model)
    request = leased_request()
    sched.add_request(request)
    output, outputs = step(sched)

    assert request.status == RequestStatus.WAITING_FOR_REMOTE_KVS
    assert list(request.output_token_ids) == [T1]
    (first,) = emitted(outputs)
    assert first.new_token_ids == [T1] and first.finish_reason is None
    (load,) = output.kv_connector_metadata.loads
    assert load.request_id == "r1"
    assert stats_of(sched)["first_tokens_from_producer"] == 1


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_after_the_pull_only_the_first_token_is_computed(model, async_scheduling):
    """The loaded prompt is not recomputed: the request's next step computes
    the producer's token at position len(prompt) and samples token 2."""
    sched = scheduler(model, async_scheduling)
    request = leased_request(min_tokens=3)
    sched.add_request(request)
    step(sched)
    step(sched, KVConnectorOutput(finished_recving={"r1"}))
    output = sched.schedule()  # its forward is the worker's

    assert output.num_scheduled_tokens == {"r1": 1}
    assert request.num_computed_tokens == len(PROMPT) + 1
    (new,) = output.scheduled_new_reqs
    # The V1 runner (this CPU build) gets the token as its last prompt token.
    assert new.prompt_token_ids == [*PROMPT, T1]
    assert new.sampling_params.min_tokens == 2
    assert request.prompt_token_ids == PROMPT  # the scheduler's own copy
    assert request.sampling_params.min_tokens == 3


def test_a_first_token_that_ends_the_request_needs_no_forward(model):
    """max_tokens=1: finished at admission, nothing pulled, lease released."""
    sched = scheduler(model)
    request = leased_request(max_tokens=1)
    sched.add_request(request)
    output, outputs = step(sched)

    (first,) = emitted(outputs)
    assert first.new_token_ids == [T1] and first.finish_reason is not None
    assert request.status == RequestStatus.FINISHED_LENGTH_CAPPED
    assert output.num_scheduled_tokens == {}
    meta = output.kv_connector_metadata
    assert meta.loads == [] and [lease.request_id for lease in meta.releases] == [
        "p-r1"
    ]
    assert not sched.has_requests()


def test_eos_as_first_token_stops_the_request(model):
    sched = scheduler(model)
    request = leased_request(first=FirstToken(2))  # 2 is EOS here
    sched.add_request(request)
    _, outputs = step(sched)
    (first,) = emitted(outputs)
    assert first.new_token_ids == [2]
    assert request.status == RequestStatus.FINISHED_STOPPED


def test_logprobs_of_the_first_token_come_from_the_lease(model):
    row = LogprobsRow.of([T1, 5, 9], [-0.25, -1.5, float("-inf")], 0)
    sched = scheduler(model)
    sched.add_request(leased_request(first=FirstToken(T1, row), logprobs=2))
    _, outputs = step(sched)
    (first,) = emitted(outputs)
    assert first.new_logprobs.logprob_token_ids.tolist() == [[T1, 5, 9]]
    assert first.new_logprobs.logprobs.tolist() == [[-0.25, -1.5, float("-inf")]]


@pytest.mark.parametrize(
    ("sampling", "reason"),
    [
        ({"frequency_penalty": 0.5}, "v1_runner_penalties"),
        ({"presence_penalty": 0.5}, "v1_runner_penalties"),
        ({"bad_words": ["x"]}, "v1_runner_bad_words"),
        ({"temperature": 1.0, "seed": 7}, "v1_runner_seeded_sampling"),
        ({"logprobs": 2}, "no_logprobs_in_lease"),
    ],
)
def test_what_the_v1_runner_cannot_continue_exactly_computes_its_own(
    model, sampling, reason
):
    sched = scheduler(model)
    request = leased_request(**sampling)
    sched.add_request(request)
    _, outputs = step(sched)
    assert emitted(outputs) == []
    assert list(request.output_token_ids) == []
    assert stats_of(sched)["first_token_fallbacks"] == {reason: 1}


def test_a_lease_without_a_first_token_is_counted(model):
    sched = scheduler(model)
    sched.add_request(leased_request(first=None))
    _, outputs = step(sched)
    assert emitted(outputs) == []
    assert stats_of(sched)["first_token_fallbacks"] == {"no_first_token": 1}


def test_a_forged_first_token_is_never_emitted(model):
    """The token rides in the lease, under this node's MAC: a client's
    kv_transfer_params cannot choose what the consumer emits."""
    sched = scheduler(model)
    request = leased_request()
    params = request.kv_transfer_params
    params["pdserve_lease"]["first_token"]["token_id"] = 999
    sched.add_request(request)
    output = sched.schedule()  # prefilled here: the forward is the worker's
    assert output.num_scheduled_tokens == {"r1": len(PROMPT)}
    assert list(request.output_token_ids) == []
    stats = sched.connector.get_kv_connector_stats().data
    assert stats["first_token_fallbacks"] == {"lease_refused": 1}


def test_scheduler_is_the_one_vllm_would_have_used(model):
    assert isinstance(scheduler(model, async_scheduling=False), Scheduler)
    from vllm.v1.core.sched.async_scheduler import AsyncScheduler

    assert isinstance(scheduler(model, async_scheduling=True), AsyncScheduler)
    assert os.environ[NODE_KEY_ENV_VAR]


def test_request_admitted_before_its_lease_emits_the_first_token_on_arrival(
    model,
):
    """The HTTP layer hands the request over with a ticket while the producer
    prefills: the engine does not step for it (nothing to do) until the lease,
    and its first token, arrive; then the token goes out at once."""
    import time

    from pdserve.ticket import Delivery, Ticket, message_params

    sched = scheduler(model)
    ticket = Ticket.issue(node_key(), time.time() + 60, handed_at=time.time())
    params = SamplingParams(max_tokens=8, temperature=0)
    params.update_from_generation_config({}, eos_token_id=2)
    params.extra_args = {"kv_transfer_params": ticket.to_params()}
    request = Request("r1", list(PROMPT), params, None, block_hasher=HASHER)
    sched.add_request(request)
    assert not sched.has_requests()  # the engine sleeps on its input queue

    lease = leased_request().kv_transfer_params["pdserve_lease"]
    delivery = Delivery(ticket.id, msgspec.convert(lease, type=Lease))
    # As vLLM's engine client hands it over: a request aborted on arrival.
    carrier = SamplingParams(max_tokens=1)
    carrier.extra_args = {"kv_transfer_params": message_params(node_key(), delivery)}
    sched.add_request(Request("answer", [0], carrier, None, abort_immediately=True))
    sched.finish_requests("answer", RequestStatus.FINISHED_ABORTED)
    assert sched.has_requests()

    _, outputs = step(sched)
    (first,) = emitted(outputs)
    assert first.new_token_ids == [T1]
    assert request.status == RequestStatus.WAITING_FOR_REMOTE_KVS
