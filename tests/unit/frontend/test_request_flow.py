"""The consumer's request flow with tickets: vLLM gets the request before
the producer has answered, the answer follows through the engine client, and
whatever happens to the request, its lease is handed to the engine to
release."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import msgspec

from pdserve import metrics
from pdserve.entrypoints.middleware import PDServeMiddleware
from pdserve.settings import ENV_VAR
from pdserve.ticket import (
    ANSWER_KEY,
    TICKET_KEY,
    Cancel,
    Delivery,
    Message,
    Ticket,
    message_from_params,
)
from tests.eventually import eventually_async
from tests.unit.http_fakes import (
    CONSUMER,
    FakeEngine,
    FakeVLLM,
    app_state,
    call,
    fake_producer,
    make_lease,
    run,
    use_node,
)

COMPLETIONS = "/v1/completions"


class Engine(FakeEngine):
    """Records what the HTTP layer hands over, and when vLLM had the request."""

    def __init__(self, vllm: FakeVLLM) -> None:
        super().__init__()
        self.vllm = vllm
        self.handed_before_answer: bool | None = None
        self.answered = asyncio.Event()

    async def notify_kv_transfer_request_rejected(self, request_id, params) -> None:
        if self.handed_before_answer is None and ANSWER_KEY in params:
            self.handed_before_answer = bool(self.vllm.seen)
        await super().notify_kv_transfer_request_rejected(request_id, params)
        self.answered.set()

    def messages(self, key: bytes) -> list[Message]:
        return [message_from_params(p, key) for _, p in self.rejected]


class VLLM(FakeVLLM):
    """vLLM's app: a request it accepts is answered once its engine has the
    producer's answer (the engine waits for it); a rejection comes at once."""

    engine: Engine | None = None

    def __init__(self, status: int) -> None:
        super().__init__(status=status)
        # Set once the request is in (waiting for the answer) or rejected.
        self.has_request = asyncio.Event()

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if self.status < 400 and self.engine is not None:

            async def after_the_answer(message: dict) -> None:
                self.has_request.set()
                await self.engine.answered.wait()
                await send(message)

            return await super().__call__(scope, receive, after_the_answer)
        await super().__call__(scope, receive, send)
        self.has_request.set()


def released(reason: str) -> float:
    return metrics.LEASES_RELEASED.labels(reason=reason)._value.get()


def scenario(monkeypatch, answer, status: int = 200, handed: int = 1):
    """One completion through a consumer with tickets on; (key, vLLM,
    engine, the producer's requests) once ``handed`` messages reached the
    engine (some are sent after the response ended). ``answer(vllm)``: the
    producer's answer to a prefill."""
    key = use_node(monkeypatch, CONSUMER)

    async def go():
        vllm = VLLM(status=status)
        async with fake_producer(answer(vllm)) as producer:
            settings = msgspec.structs.replace(CONSUMER, producer_urls=[producer.url])
            monkeypatch.setenv(ENV_VAR, settings.to_json())
            engine = vllm.engine = Engine(vllm)
            mw = PDServeMiddleware(vllm)
            body = json.dumps({"prompt": [5, 6, 7], "max_tokens": 4}).encode()
            try:
                await call(
                    mw, "POST", COMPLETIONS, body, None, app_state(engine=engine)
                )
                # Answers may follow the response.
                await eventually_async(
                    lambda: len(engine.rejected) >= handed,
                    5,
                    f"{handed} message(s) at the engine",
                )
            finally:
                await mw.prefill.close()
            return key, vllm, engine, producer

    return run(go())


def lease_once_vllm_has_it(vllm: VLLM) -> Any:
    """A producer that answers with a lease once vLLM has the request."""

    async def answer(payload: dict) -> dict:
        await vllm.has_request.wait()
        return {"kv_transfer_params": make_lease().to_params()}

    return answer


def test_request_reaches_vllm_with_a_ticket_before_the_lease(monkeypatch):
    key, vllm, engine, producer = scenario(monkeypatch, lease_once_vllm_has_it)
    [seen] = vllm.seen
    params = seen.json()["kv_transfer_params"]
    ticket = Ticket.from_params(params)
    assert ticket is not None and ticket.verified(key)
    assert "pdserve_lease" not in params  # no lease yet: the ticket stands in
    assert engine.handed_before_answer is True
    [answer] = engine.messages(key)
    assert isinstance(answer, Delivery) and answer.ticket_id == ticket.id
    assert answer.lease.verified(key)  # signed by this node
    assert answer.lease.kv_host == "127.0.0.1" and answer.sent_at > 0
    # The producer got the prompt's token ids and no client params.
    [(_, asked, _)] = producer.requests
    assert asked["prompt"] == [5, 6, 7] and asked["max_tokens"] == 1


def test_producer_without_a_lease_answers_the_ticket_with_why(monkeypatch):
    def refuses(payload: dict) -> dict:
        return {"kv_transfer_params": {"pdserve_refused": "lease_cap"}}

    key, vllm, engine, _ = scenario(monkeypatch, lambda _: refuses)
    [answer] = engine.messages(key)
    assert answer.lease is None and answer.refused == "producer_lease_cap"
    assert TICKET_KEY in vllm.seen[0].json()["kv_transfer_params"]


def test_rejected_request_cancels_its_ticket_and_counts_the_release(monkeypatch):
    """vLLM refused the request (e.g. too long for this node): the engine
    never saw it, its lease goes back at once."""
    before = released("rejected")
    key, _, engine, _ = scenario(
        monkeypatch, lease_once_vllm_has_it, status=400, handed=2
    )
    messages = engine.messages(key)
    assert [type(m) for m in messages] == [Delivery, Cancel]
    assert messages[0].ticket_id == messages[1].ticket_id
    assert released("rejected") == before + 1


def test_forged_answers_are_refused_by_the_engine():
    """What the engine accepts as an answer is signed by this node."""
    from pdserve.ticket import message_params

    params = message_params(b"k" * 32, Cancel("ab" * 16))
    assert message_from_params(params, b"k" * 32) == Cancel(
        "ab" * 16, mac=params[ANSWER_KEY]["mac"]
    )
    assert message_from_params(params, b"x" * 32) is None
    params[ANSWER_KEY]["ticket_id"] = "cd" * 16
    assert message_from_params(params, b"k" * 32) is None
