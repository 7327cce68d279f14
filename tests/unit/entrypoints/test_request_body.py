"""Request bodies pdserve reads (every POST/PUT/PATCH, on both nodes): at
most ``max_request_body_bytes`` of them, refused with a 413 before reading
when the declared length says so, and as soon as a chunked one passes it;
large ones parsed off the event loop."""

from __future__ import annotations

import json
import threading

import msgspec
import pytest

from pdserve.entrypoints.middleware import PDServeMiddleware
from pdserve.frontend import client_body
from pdserve.settings import ENV_VAR
from tests.unit.http_fakes import (
    CONSUMER,
    PRODUCER,
    FakeVLLM,
    app_state,
    call,
    run,
    use_node,
)

LIMIT = 1000


@pytest.fixture(params=["producer", "consumer"])
def node(request, monkeypatch):
    settings = PRODUCER if request.param == "producer" else CONSUMER
    use_node(monkeypatch, settings)
    limited = msgspec.structs.replace(settings, max_request_body_bytes=LIMIT)
    monkeypatch.setenv(ENV_VAR, limited.to_json())
    app = FakeVLLM()
    return PDServeMiddleware(app), app


class Chunks:
    """A client sending its body in chunks (no length declared)."""

    def __init__(self, chunks: list[bytes]) -> None:
        self.chunks = list(chunks)
        self.read = 0

    async def __call__(self) -> dict:
        chunk = self.chunks[self.read]
        self.read += 1
        more = self.read < len(self.chunks)
        return {"type": "http.request", "body": chunk, "more_body": more}


async def send_chunked(mw, chunks: Chunks, length: int | None = None) -> tuple:
    headers = [(b"content-type", b"application/json")]
    if length is not None:
        headers.append((b"content-length", str(length).encode()))
    scope = {
        "type": "http",
        "method": "POST",
        "path": "/tokenize",
        "raw_path": b"/tokenize",
        "root_path": "",
        "query_string": b"",
        "headers": headers,
        "app": app_state(),
    }
    messages: list[dict] = []

    async def send(message: dict) -> None:
        messages.append(message)

    await mw(scope, chunks, send)
    status = messages[0]["status"]
    body = b"".join(m.get("body", b"") for m in messages[1:])
    return status, json.loads(body) if body else None


def test_declared_length_over_the_limit_is_refused_unread(node):
    mw, app = node
    chunks = Chunks([b"x"])
    status, answer = run(send_chunked(mw, chunks, length=LIMIT + 1))
    assert status == 413
    assert "1000 bytes" in answer["error"]
    assert "--max-request-body-bytes" in answer["error"]
    assert chunks.read == 0 and app.seen == []


def test_chunked_body_is_counted_and_cut_off(node):
    mw, app = node
    chunks = Chunks([b" " * 400] * 10)  # 4000 bytes, no length declared
    status, _ = run(send_chunked(mw, chunks))
    assert status == 413
    # Stopped reading at the chunk that passed the limit.
    assert chunks.read == 3 and app.seen == []


def test_body_at_the_limit_passes(node):
    mw, app = node
    body = json.dumps({"prompt": "x" * (LIMIT - 20)}).encode().ljust(LIMIT)
    assert len(body) == LIMIT
    chunks = Chunks([body[:500], body[500:]])
    status, _ = run(send_chunked(mw, chunks, length=LIMIT))
    assert status == 200
    assert app.seen[0].body == body


def test_default_limit_leaves_room_for_images():
    assert CONSUMER.max_request_body_bytes == 64 * 1024 * 1024


@pytest.mark.parametrize(
    ("size", "off_loop"), [(1000, False), (client_body.OFF_LOOP_BYTES + 1, True)]
)
@pytest.mark.parametrize("role", ["producer", "consumer"])
def test_large_bodies_are_parsed_off_the_event_loop(monkeypatch, size, off_loop, role):
    use_node(monkeypatch, PRODUCER if role == "producer" else CONSUMER)
    threads: list[int] = []
    for name in ("from_client", "for_producer"):
        original = getattr(client_body, name)

        def traced(*args, _original=original):
            threads.append(threading.get_ident())
            return _original(*args)

        monkeypatch.setattr(client_body, name, traced)
    app = FakeVLLM()
    mw = PDServeMiddleware(app)
    body = json.dumps({"input": "x" * size}).encode()

    async def scenario() -> int:
        loop_thread = threading.get_ident()
        answer = await call(mw, "POST", "/tokenize", body)
        assert answer.status == 200
        return loop_thread

    loop_thread = run(scenario())
    assert len(threads) == 1
    assert (threads[0] != loop_thread) is off_loop
    assert app.seen[0].body == body
