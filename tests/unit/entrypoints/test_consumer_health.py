"""The consumer's ``GET /health``: vLLM's verdict, with whether prompts go to
producers. A consumer without producers is healthy (it prefills locally)."""

from __future__ import annotations

import msgspec

from pdserve.entrypoints.middleware import PDServeMiddleware
from pdserve.frontend import producer_pool
from pdserve.settings import ENV_VAR
from tests.eventually import eventually_async
from tests.unit.http_fakes import (
    CONSUMER,
    FakeVLLM,
    app_state,
    call,
    fake_producer,
    run,
    use_node,
)


def consumer_of(monkeypatch, urls: list[str], vllm: FakeVLLM) -> PDServeMiddleware:
    use_node(monkeypatch, CONSUMER)
    settings = msgspec.structs.replace(CONSUMER, producer_urls=urls)
    monkeypatch.setenv(ENV_VAR, settings.to_json())
    return PDServeMiddleware(vllm)


async def health_until(mw: PDServeMiddleware, usable: int) -> dict:
    """/health's details once ``usable`` producers are in them."""

    async def details() -> dict | None:
        answer = await call(mw, "GET", "/health", b"", [])
        assert answer.status == 200
        return answer.json() if answer.json()["producers_usable"] == usable else None

    return await eventually_async(details, 5, f"{usable} usable", interval=0.02)


def test_health_says_whether_prompts_go_to_producers(monkeypatch):
    monkeypatch.setattr(producer_pool, "RESOLVE_SECONDS", 0.05)

    async def scenario() -> None:
        async with fake_producer(lambda _: {}) as producer:
            vllm = FakeVLLM(answer=None)
            mw = consumer_of(monkeypatch, [producer.url], vllm)
            try:
                # No request needed: /health itself starts following producers.
                details = await health_until(mw, 1)
            finally:
                await mw.prefill.close()
        assert details == {
            "producers_known": 1,
            "producers_usable": 1,
            "remote_prefill": True,
        }
        assert {seen.path for seen in vllm.seen} == {"/health"}

    run(scenario())


def test_health_without_producers_is_still_200(monkeypatch):
    async def scenario() -> dict:
        mw = consumer_of(monkeypatch, ["http://127.0.0.1:9"], FakeVLLM(answer=None))
        try:
            await mw.prefill.pool.ready()
            return await health_until(mw, 0)
        finally:
            await mw.prefill.close()

    assert run(scenario()) == {
        "producers_known": 0,
        "producers_usable": 0,
        "remote_prefill": False,
    }


def test_unhealthy_vllm_answer_passes_unchanged(monkeypatch):
    vllm = FakeVLLM(status=503, answer={"error": "engine dead"})
    mw = consumer_of(monkeypatch, ["http://127.0.0.1:9"], vllm)

    async def scenario():
        try:
            return await call(mw, "GET", "/health", b"", [], app_state(["k"]))
        finally:
            await mw.prefill.close()

    answer = run(scenario())
    assert (answer.status, answer.json()) == (503, {"error": "engine dead"})
