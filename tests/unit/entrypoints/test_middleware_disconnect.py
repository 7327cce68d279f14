"""The consumer's HTTP layer hands a lease nobody will read to its engine to
release as soon as it knows: the client left while the producer prefilled
(the request never starts), or left before any of the answer reached it."""

from __future__ import annotations

import asyncio
import json

import msgspec
import pytest

from pdserve import metrics
from pdserve.entrypoints.middleware import PDServeMiddleware
from pdserve.frontend.remote_prefill import Answer
from pdserve.lease import Lease
from tests.eventually import eventually_async
from tests.unit.http_fakes import CONSUMER, FakeEngine, app_state, make_lease, use_node

BODY = json.dumps({"prompt": "Hello", "max_tokens": 4, "stream": True}).encode()


class FakePrefill:
    """The producer: answers with a signed lease once ``answer`` is set."""

    def __init__(self, key: bytes) -> None:
        self.answer = asyncio.Event()
        self.asked = asyncio.Event()
        self.key = key
        self.lease = make_lease().signed(key, kv_host="10.0.0.1")
        self.engine = FakeEngine()
        self._counts = {reason: count(reason) for reason in REASONS}

    async def producers_saturated(self, api_key=None) -> bool:
        return False

    stray_leases: list = []

    async def ask(self, path, payload, **kwargs) -> Answer:
        self.asked.set()
        await self.answer.wait()
        return Answer(self.lease, "", 0.01)

    @property
    def released(self) -> list[tuple[str, str]]:
        """(producer request id, reason) of each lease handed to the engine."""
        leases = self.engine.leases()
        assert all(same_lease(lease, self.lease, self.key) for lease in leases)
        reasons = [
            reason
            for reason in REASONS
            for _ in range(int(count(reason) - self._counts[reason]))
        ]
        assert len(reasons) == len(leases)
        return [(lease.request_id, r) for lease, r in zip(leases, reasons, strict=True)]


REASONS = ("client_disconnected", "rejected")


def same_lease(given: Lease, issued: Lease, key: bytes) -> bool:
    """``given`` is ``issued``, signed by this node (with when it was handed
    to vLLM, or not)."""
    unsigned = msgspec.structs.replace(given, handed_at=0.0, mac="")
    return given.verified(key) and unsigned == msgspec.structs.replace(issued, mac="")


def count(reason: str) -> float:
    return metrics.LEASES_RELEASED.labels(reason=reason)._value.get()


class Client:
    """An ASGI client: sends BODY, then disconnects when told to."""

    def __init__(self) -> None:
        self.gone = asyncio.Event()
        # The server took the disconnect (its receive returned it).
        self.left = asyncio.Event()
        self.sent_body = False
        self.received: list[dict] = []

    async def receive(self) -> dict:
        if not self.sent_body:
            self.sent_body = True
            return {"type": "http.request", "body": BODY, "more_body": False}
        await self.gone.wait()
        self.left.set()
        return {"type": "http.disconnect"}

    def got(self, kind: str, body: bytes | None = None) -> bool:
        """Whether a message of ``kind`` (with ``body``) reached the client."""
        return any(
            m["type"] == kind and (body is None or m.get("body") == body)
            for m in self.received
        )

    async def send(self, message: dict) -> None:
        self.received.append(message)


class FakeVLLM:
    """vLLM's app: records the body, then plays ``script``."""

    def __init__(self, script) -> None:
        self.script = script
        self.bodies: list[dict] = []

    async def __call__(self, scope, receive, send) -> None:
        first = await receive()
        self.bodies.append(json.loads(first["body"]))
        await self.script(receive, send)


@pytest.fixture
def middleware(monkeypatch):
    key = use_node(monkeypatch, CONSUMER)

    def build(script) -> tuple[PDServeMiddleware, FakeVLLM, FakePrefill]:
        app = FakeVLLM(script)
        mw = PDServeMiddleware(app)
        mw.prefill = mw.flow.prefill = FakePrefill(key)
        mw.flow.admit_early = False  # the lease inline (tickets: test_request_flow)
        return mw, app, mw.prefill

    return build


def scope(prefill: FakePrefill) -> dict:
    return {
        "type": "http",
        "method": "POST",
        "path": "/v1/completions",
        "raw_path": b"/v1/completions",
        "headers": [(b"content-type", b"application/json")],
        "app": app_state(engine=prefill.engine),
    }


def streaming(chunks: list[bytes], wait_for_client: bool):
    """A streaming answer; with ``wait_for_client`` it then waits for the
    client to leave (as Starlette's disconnect listener does)."""

    async def script(receive, send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        for chunk in chunks:
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
        if wait_for_client:
            assert (await receive())["type"] == "http.disconnect"
            return
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    return script


async def rejected(receive, send) -> None:
    await send({"type": "http.response.start", "status": 400, "headers": []})
    await send({"type": "http.response.body", "body": b"{}", "more_body": False})


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, timeout=10))


def test_client_gone_during_prefill_releases_and_skips_vllm(middleware):
    async def scenario():
        mw, app, prefill = middleware(streaming([b"data: x\n\n"], False))
        client = Client()
        task = asyncio.create_task(mw(scope(prefill), client.receive, client.send))
        await prefill.asked.wait()
        client.gone.set()
        await client.left.wait()  # the disconnect arrives before the answer
        prefill.answer.set()
        await task
        return app, prefill, client

    app, prefill, client = run(scenario())
    assert prefill.released == [("cmpl-r1-0", "client_disconnected")]
    assert app.bodies == []
    assert client.received == []


def test_client_staying_gets_the_lease_forwarded(middleware):
    async def scenario():
        mw, app, prefill = middleware(streaming([b"data: x\n\n"], False))
        client = Client()
        prefill.answer.set()
        await mw(scope(prefill), client.receive, client.send)
        client.gone.set()
        return app, prefill, client

    app, prefill, client = run(scenario())
    assert prefill.released == []
    forwarded = Lease.from_params(app.bodies[0]["kv_transfer_params"])
    # The producer's lease, signed again with when it was handed to vLLM.
    assert forwarded.verified(prefill.key) and forwarded.handed_at > 0
    unsigned = msgspec.structs.replace(forwarded, handed_at=0.0, mac="")
    assert unsigned == msgspec.structs.replace(prefill.lease, mac="")
    assert [m.get("body") for m in client.received[1:]] == [b"data: x\n\n", b""]


def test_client_gone_before_any_answer_releases(middleware):
    # vLLM started the response but the client left before the first token:
    # the engine may never have seen the lease.
    async def scenario():
        mw, app, prefill = middleware(streaming([], wait_for_client=True))
        client = Client()
        prefill.answer.set()
        task = asyncio.create_task(mw(scope(prefill), client.receive, client.send))
        started = "http.response.start"
        await eventually_async(lambda: client.got(started), 5, "the response start")
        client.gone.set()
        await task
        return app, prefill

    app, prefill = run(scenario())
    assert len(app.bodies) == 1
    assert prefill.released == [("cmpl-r1-0", "client_disconnected")]


def test_client_gone_after_tokens_leaves_release_to_the_engine(middleware):
    # A token was sent, so the KV was read and the engine released it.
    async def scenario():
        mw, app, prefill = middleware(streaming([b"data: x\n\n"], True))
        client = Client()
        prefill.answer.set()
        task = asyncio.create_task(mw(scope(prefill), client.receive, client.send))
        token = ("http.response.body", b"data: x\n\n")
        await eventually_async(lambda: client.got(*token), 5, "the first token")
        client.gone.set()
        await task
        return prefill

    assert run(scenario()).released == []


def test_disconnect_after_a_complete_answer_releases_nothing(middleware):
    async def script(receive, send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"{}", "more_body": False})
        await receive()  # the server reports the finished connection

    async def scenario():
        mw, app, prefill = middleware(script)
        client = Client()
        prefill.answer.set()

        async def send_then_leave(message: dict) -> None:
            if message["type"] == "http.response.body" and not message["more_body"]:
                client.gone.set()

        await mw(scope(prefill), client.receive, send_then_leave)
        return prefill

    assert run(scenario()).released == []


def test_rejected_request_releases(middleware):
    async def scenario():
        mw, app, prefill = middleware(rejected)
        client = Client()
        prefill.answer.set()
        await mw(scope(prefill), client.receive, client.send)
        return prefill

    assert run(scenario()).released == [("cmpl-r1-0", "rejected")]
