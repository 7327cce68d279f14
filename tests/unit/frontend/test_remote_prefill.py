"""Which requests the consumer sends to the producer, and the body it sends."""

from __future__ import annotations

import copy
import json
import re
from dataclasses import dataclass
from typing import Any

import msgspec
import pytest

from pdserve import metrics
from pdserve.entrypoints.middleware import PDServeMiddleware
from pdserve.frontend.remote_prefill import (
    local_reason,
    prefill_body,
    release_lease,
)
from pdserve.lease import Lease
from pdserve.request_proof import (
    ProofRejected,
    ProofVerifier,
    body_digest,
    proof_key,
)
from pdserve.settings import ENV_VAR, KV_SECRET_ENV_VAR, kv_secret
from tests.unit.http_fakes import (
    CONSUMER,
    Answer,
    FakeEngine,
    FakeProducer,
    FakeVLLM,
    app_state,
    call,
    fake_producer,
    make_lease,
    run,
    use_node,
)

COMPLETIONS = "/v1/completions"
CHAT = "/v1/chat/completions"
MESSAGES = [{"role": "user", "content": "Hello"}]


@pytest.mark.parametrize(
    ("path", "payload"),
    [
        (COMPLETIONS, {"prompt": "Hello"}),
        (COMPLETIONS, {"prompt": "Hello", "n": 1, "best_of": 1}),
        (COMPLETIONS, {"prompt": "Hello", "best_of": None}),
        (COMPLETIONS, {"prompt": [1, 2, 3]}),  # token ids
        (COMPLETIONS, {"prompt": [[1, 2, 3]]}),  # one prompt of token ids
        (COMPLETIONS, {"prompt": ["Hello"]}),  # one prompt in a list
        (COMPLETIONS, {"prompt": "Hello", "echo": False, "prompt_logprobs": None}),
        (COMPLETIONS, {"prompt": "Hello", "logprobs": 3, "stream": True}),
        (CHAT, {"messages": MESSAGES}),
        (CHAT, {"messages": MESSAGES, "logprobs": True, "top_logprobs": 2}),
        (COMPLETIONS, {"prompt": "Hello", "use_beam_search": False}),
        (CHAT, {"messages": MESSAGES, "use_beam_search": None}),
    ],
)
def test_remote_prefill_allowed(path, payload):
    assert local_reason(path, payload) is None


@pytest.mark.parametrize(
    ("path", "payload", "reason"),
    [
        (COMPLETIONS, None, "malformed"),
        (COMPLETIONS, ["Hello"], "malformed"),
        (COMPLETIONS, "Hello", "malformed"),
        (COMPLETIONS, {"prompt": "Hi", "n": 2}, "multiple_choices"),
        (CHAT, {"messages": MESSAGES, "n": 3}, "multiple_choices"),
        (COMPLETIONS, {"prompt": "Hi", "best_of": 2}, "multiple_choices"),
        (COMPLETIONS, {"prompt": "Hi", "prompt_logprobs": 1}, "prompt_logprobs"),
        (COMPLETIONS, {"prompt": "Hi", "prompt_logprobs": -1}, "prompt_logprobs"),
        (CHAT, {"messages": MESSAGES, "prompt_logprobs": 2}, "prompt_logprobs"),
        (COMPLETIONS, {"prompt": "Hi", "echo": True}, "prompt_logprobs"),
        (COMPLETIONS, {"prompt": ["a", "b"]}, "batched_prompts"),
        (COMPLETIONS, {"prompt": [[1, 2], [3]]}, "batched_prompts"),
        (COMPLETIONS, {"prompt": "Hi", "use_beam_search": True}, "beam_search"),
        (CHAT, {"messages": MESSAGES, "use_beam_search": True}, "beam_search"),
        # vLLM's parser takes these as true too.
        (COMPLETIONS, {"prompt": "Hi", "use_beam_search": "true"}, "beam_search"),
        (COMPLETIONS, {"prompt": "Hi", "use_beam_search": 1}, "beam_search"),
    ],
)
def test_local_reason(path, payload, reason):
    assert local_reason(path, payload) == reason


def test_client_kv_params_are_no_reason_to_prefill_locally():
    # The HTTP layer removed them before asking; they never decide anything.
    payload = {"prompt": "Hi", "kv_transfer_params": {"do_remote_prefill": True}}
    assert local_reason(COMPLETIONS, payload) is None


def test_zero_prompt_logprobs_prefills_locally():
    assert local_reason(COMPLETIONS, {"prompt": "Hi", "prompt_logprobs": 0}) == (
        "prompt_logprobs"
    )


def completion_payload() -> dict:
    return {
        "model": "m",
        "prompt": "Hello",
        "max_tokens": 200,
        "min_tokens": 10,
        "temperature": 0.7,
        "stream": True,
        "stream_options": {"include_usage": True},
        "stop": ["\n"],
        "logprobs": 2,
    }


def chat_payload() -> dict:
    return {
        "model": "m",
        "messages": copy.deepcopy(MESSAGES),
        "max_completion_tokens": 200,
        "stream": True,
        "stream_options": {"include_usage": True, "continuous_usage_stats": True},
        "response_format": {"type": "json_object"},
    }


def test_prefill_body_for_completions():
    payload = completion_payload()
    body = prefill_body(COMPLETIONS, payload)
    assert body["max_tokens"] == 1
    # The producer's token is the first output: EOS stays out of it when
    # the client asked for at least one token.
    assert body["min_tokens"] == 1
    assert body["n"] == 1
    assert body["stream"] is False
    assert "stream_options" not in body
    assert "max_completion_tokens" not in body
    assert body["kv_transfer_params"] == {"do_remote_decode": True}
    # Everything that shapes the prompt or sampling is kept.
    for key in ("model", "prompt", "temperature", "stop", "logprobs"):
        assert body[key] == payload[key]


def test_prefill_body_for_chat():
    payload = chat_payload()
    body = prefill_body(CHAT, payload)
    assert body["max_completion_tokens"] == 1
    assert body["max_tokens"] == 1
    assert body["stream"] is False
    assert "stream_options" not in body
    assert body["kv_transfer_params"] == {"do_remote_decode": True}
    assert body["messages"] == MESSAGES
    assert body["response_format"] == {"type": "json_object"}


def test_prefill_body_without_stream_fields():
    body = prefill_body(COMPLETIONS, {"prompt": [1, 2, 3]})
    assert body == {
        "prompt": [1, 2, 3],
        "max_tokens": 1,
        "min_tokens": 0,
        "stream": False,
        "n": 1,
        "kv_transfer_params": {"do_remote_decode": True},
    }


@pytest.mark.parametrize(
    ("path", "make"), [(COMPLETIONS, completion_payload), (CHAT, chat_payload)]
)
def test_prefill_body_does_not_mutate_input(path, make):
    payload = make()
    before = copy.deepcopy(payload)
    body = prefill_body(path, payload)
    assert payload == before
    # Nothing is shared: editing the body leaves the request alone.
    for value in body.values():
        if isinstance(value, list):
            value.append("x")
        elif isinstance(value, dict):
            value["x"] = 1
    if "messages" in body:
        body["messages"][0]["content"] = "changed"
    assert payload == before


# --- the lease, from the producer's answer to vLLM ----------------------------


def lease_answer(payload: dict) -> dict:
    return {"choices": [{"text": "x"}], "kv_transfer_params": make_lease().to_params()}


@dataclass
class Flow:
    key: bytes
    producer: FakeProducer
    vllm: FakeVLLM
    engine: Any
    answer: Answer

    def forwarded(self) -> dict:
        [seen] = self.vllm.seen
        return seen.json()


def flow(
    monkeypatch,
    body: dict,
    answer=lease_answer,
    status: int = 200,
    headers: list[tuple[bytes, bytes]] | None = None,
    engine: Any = None,
    keys: list[str] | None = None,
) -> Flow:
    """One completion through a consumer whose producer answers ``answer``
    (and requires a KV secret when the consumer has one)."""
    key = use_node(monkeypatch, CONSUMER)

    async def scenario() -> Flow:
        async with fake_producer(answer) as producer:
            producer.metadata["kv_auth"] = kv_secret() is not None
            settings = msgspec.structs.replace(CONSUMER, producer_urls=[producer.url])
            monkeypatch.setenv(ENV_VAR, settings.to_json())
            vllm = FakeVLLM(status=status)
            mw = PDServeMiddleware(vllm)
            mw.flow.admit_early = False  # the lease inline (tickets: test_request_flow)
            state = app_state(api_key=keys, engine=engine)
            try:
                got = await call(
                    mw, "POST", COMPLETIONS, json.dumps(body).encode(), headers, state
                )
            finally:
                await mw.prefill.close()
            return Flow(key, producer, vllm, state.state.engine_client, got)

    return run(scenario())


def local_prefills(reason: str) -> float:
    return metrics.LOCAL_PREFILLS.labels(reason=reason)._value.get()


def remote_prefills() -> float:
    return sum(
        sample.value
        for family in metrics.REMOTE_PREFILLS.collect()
        for sample in family.samples
        if sample.name.endswith("_total")
    )


def released(reason: str) -> float:
    return metrics.LEASES_RELEASED.labels(reason=reason)._value.get()


FORGED = {"do_remote_prefill": True, "pdserve_lease": {"request_id": "x", "mac": "0"}}


def test_forwarded_body_carries_exactly_the_signed_lease(monkeypatch):
    remote_before = remote_prefills()
    body = {
        "prompt": "Hello",
        "max_tokens": 5,
        "kv_transfer_params": FORGED,
        "vllm_xargs": {"kv_transfer_params": [1]},
    }
    done = flow(monkeypatch, body)
    forwarded = done.forwarded()
    params = forwarded.pop("kv_transfer_params")
    assert forwarded == {"prompt": "Hello", "max_tokens": 5, "vllm_xargs": {}}
    lease = Lease.from_params(params)
    assert lease is not None and lease.verified(done.key)
    assert not lease.verified(b"another node's key")
    # Signed for the producer's address: the engine reads the KV there.
    issued = make_lease(instance_id=done.producer.metadata["instance_id"])
    expected = issued.signed(done.key, kv_host="127.0.0.1", handed_at=lease.handed_at)
    assert lease.handed_at > 0  # when it was handed to vLLM (its TTFT split)
    assert params == expected.to_params()
    assert done.vllm.seen[0].headers[b"content-type"] == b"application/json"
    # The producer got the request without the client's params, asked to lease.
    [(path, asked, _)] = done.producer.requests
    assert path == COMPLETIONS
    assert asked["kv_transfer_params"] == {"do_remote_decode": True}
    assert asked["vllm_xargs"] == {}
    assert remote_prefills() == remote_before + 1
    assert done.engine.rejected == []


def test_a_mac_from_the_producer_is_replaced_by_ours(monkeypatch):
    def answer(payload: dict) -> dict:
        return {"kv_transfer_params": make_lease(mac="ff" * 32).to_params()}

    done = flow(monkeypatch, {"prompt": "Hello"}, answer)
    lease = Lease.from_params(done.forwarded()["kv_transfer_params"])
    assert lease is not None and lease.verified(done.key)


@pytest.mark.parametrize(
    "params",
    [
        None,
        {},
        {"do_remote_prefill": True},
        {"do_remote_prefill": True, "pdserve_lease": {"request_id": "r"}},
        {"pdserve_lease": dict(make_lease().to_params()["pdserve_lease"], x=1)},
        {"pdserve_lease": dict(make_lease().to_params()["pdserve_lease"], kv_ports=[])},
        ["not", "a", "dict"],
    ],
)
def test_producer_without_a_valid_lease_means_local_prefill(monkeypatch, params):
    before = local_prefills("producer_gave_no_kv")
    done = flow(
        monkeypatch, {"prompt": "Hello"}, lambda _: {"kv_transfer_params": params}
    )
    assert "kv_transfer_params" not in done.forwarded()
    assert local_prefills("producer_gave_no_kv") == before + 1


def test_client_params_do_not_force_a_local_prefill(monkeypatch):
    before = local_prefills("client_kv_params")
    done = flow(monkeypatch, {"prompt": "Hello", "kv_transfer_params": FORGED})
    assert len(done.producer.requests) == 1
    assert Lease.from_params(done.forwarded()["kv_transfer_params"]) is not None
    assert local_prefills("client_kv_params") == before


CLIENT_HEADERS = [
    (b"content-type", b"application/json"),
    (b"authorization", b"Bearer client-key"),
    (b"x-request-id", ("r" * 300).encode()),
    (b"cookie", b"session=1"),
    (b"x-forwarded-for", b"10.9.9.9"),
]


def sent_headers(done: Flow) -> dict[str, str]:
    [(_, _, headers)] = done.producer.requests
    return {k.lower(): v for k, v in headers.items()}


def test_no_client_header_reaches_the_producer(monkeypatch):
    done = flow(monkeypatch, {"prompt": "Hello"}, headers=CLIENT_HEADERS)
    sent = sent_headers(done)
    # No key on this node: no Authorization at all, not the client's.
    assert "authorization" not in sent
    assert "cookie" not in sent and "x-forwarded-for" not in sent
    assert re.fullmatch(r"pdserve-[0-9a-f]{32}", sent["x-request-id"])
    # The consumer's own vLLM gets the client's request as the client sent it.
    [seen] = done.vllm.seen
    assert seen.headers[b"x-request-id"] == b"r" * 300
    assert seen.headers[b"authorization"] == b"Bearer client-key"


def test_client_request_id_stays_on_the_consumer(monkeypatch):
    body = {"prompt": "Hello", "request_id": "c" * 300}
    done = flow(monkeypatch, body, headers=CLIENT_HEADERS)
    [(_, asked, _)] = done.producer.requests
    assert "request_id" not in asked
    assert "c" * 300 not in json.dumps(asked)
    assert done.forwarded()["request_id"] == "c" * 300


def test_each_prefill_has_its_own_request_id(monkeypatch):
    ids = set()
    for _ in range(2):
        ids.add(sent_headers(flow(monkeypatch, {"prompt": "Hello"}))["x-request-id"])
    assert len(ids) == 2


def test_prefill_body_drops_the_client_request_id():
    body = prefill_body(COMPLETIONS, {"prompt": "Hi", "request_id": "mine"})
    assert "request_id" not in body


@pytest.mark.parametrize("status", [400, 404, 422, 500])
def test_rejected_request_hands_the_lease_to_the_engine(monkeypatch, status):
    before = released("rejected")
    done = flow(monkeypatch, {"prompt": "Hello"}, status=status)
    assert done.answer.status == status
    [(request_id, params)] = done.engine.rejected
    assert request_id.startswith("pdserve-release-")
    # The very lease vLLM was given, signed, so the connector will act on it.
    assert params == done.forwarded()["kv_transfer_params"]
    lease = Lease.from_params(params)
    assert lease is not None and lease.verified(done.key)
    assert released("rejected") == before + 1


def test_accepted_request_keeps_its_lease(monkeypatch):
    before = released("rejected")
    done = flow(monkeypatch, {"prompt": "Hello"}, status=200)
    assert done.engine.rejected == []
    assert released("rejected") == before


def test_each_hand_back_is_a_fresh_request():
    engine = FakeEngine()
    lease = make_lease(mac="ab" * 32)

    async def twice() -> None:
        await release_lease(engine, lease, "rejected")
        await release_lease(engine, lease, "rejected")

    run(twice())
    ids = [request_id for request_id, _ in engine.rejected]
    assert len(set(ids)) == 2
    assert engine.leases() == [lease, lease]


def test_engine_without_hand_back_leaves_lease_to_expire(pdserve_log):
    before = released("client_disconnected")
    run(release_lease(object(), make_lease(), "client_disconnected"))
    assert released("client_disconnected") == before
    assert "expires on the producer" in pdserve_log.text


def test_failing_hand_back_is_logged_not_raised(pdserve_log):
    class DeadEngine:
        async def notify_kv_transfer_request_rejected(self, *args, **kwargs):
            raise RuntimeError("engine dead")

    before = released("rejected")
    run(release_lease(DeadEngine(), make_lease(), "rejected"))
    assert released("rejected") == before
    assert "engine dead" in pdserve_log.text


def test_beam_search_is_prefilled_here_without_asking(monkeypatch):
    before = local_prefills("beam_search")
    body = {"prompt": "Hello", "use_beam_search": True, "max_tokens": 3}
    done = flow(monkeypatch, body)
    assert done.producer.requests == []
    assert "kv_transfer_params" not in done.forwarded()
    assert local_prefills("beam_search") == before + 1


# --- a producer that will not lease ------------------------------------------


def refusing(reason: Any):
    return lambda payload: {"kv_transfer_params": {"pdserve_refused": reason}}


@pytest.mark.parametrize(
    ("reason", "counted"),
    [
        ("lease_cap", "producer_lease_cap"),
        ("draining", "producer_refused"),
        ("x" * 500, "producer_refused"),
        ({"nested": 1}, "producer_refused"),
        (None, "producer_refused"),
    ],
)
def test_refusal_means_local_prefill_counted_by_reason(monkeypatch, reason, counted):
    before = local_prefills(counted)
    failovers = metrics.PRODUCER_FAILOVERS.labels(reason="timeout")._value.get()
    done = flow(monkeypatch, {"prompt": "Hello"}, refusing(reason))
    assert done.answer.status == 200
    assert "kv_transfer_params" not in done.forwarded()
    assert local_prefills(counted) == before + 1
    assert metrics.PRODUCER_FAILOVERS.labels(reason="timeout")._value.get() == failovers


# --- proof of a consumer -------------------------------------------------------


def test_prefills_carry_a_proof_the_producer_accepts(monkeypatch):
    monkeypatch.setenv(KV_SECRET_ENV_VAR, "shared-secret")
    done = flow(monkeypatch, {"prompt": "Hello"})
    sent = sent_headers(done)
    [data] = done.producer.bodies
    verifier = ProofVerifier(proof_key(b"shared-secret"))
    verifier.verify(sent["x-pdserve-proof"], "POST", COMPLETIONS, body_digest(data))
    # Bound to that body and route; once only.
    with pytest.raises(ProofRejected):
        verifier.verify(sent["x-pdserve-proof"], "POST", COMPLETIONS, body_digest(data))
    other = ProofVerifier(proof_key(b"shared-secret"))
    with pytest.raises(ProofRejected, match="MAC"):
        other.verify(sent["x-pdserve-proof"], "POST", CHAT, body_digest(data))
    with pytest.raises(ProofRejected, match="MAC"):
        other.verify(sent["x-pdserve-proof"], "POST", COMPLETIONS, body_digest(b"{}"))
    assert "shared-secret" not in json.dumps(sent)


def test_no_proof_without_a_secret(monkeypatch):
    monkeypatch.delenv(KV_SECRET_ENV_VAR, raising=False)
    done = flow(monkeypatch, {"prompt": "Hello"})
    assert "x-pdserve-proof" not in sent_headers(done)
