"""Fakes for testing pdserve's HTTP layer without vLLM: a vLLM app that
records what reaches it, an engine client that records lease hand-backs, a
producer that answers prefills with a lease, and an ASGI request driver."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

from aiohttp import web

from pdserve.lease import NODE_KEY_ENV_VAR, Lease, new_node_key
from pdserve.settings import ENV_VAR, Settings

CONSUMER = Settings(
    role="consumer",
    model="m",
    producer_urls=["http://producer.invalid:1"],
)
PRODUCER = Settings(role="producer", model="m", kv_ports=[9000], instance_id="e1")


def make_lease(**changes: Any) -> Lease:
    fields: dict[str, Any] = {
        "request_id": "cmpl-r1-0",
        "token": "ab" * 32,
        "instance_id": "e1",
        "block_ids": [3, 4, 5],
        "prompt_hash": "cd" * 16,
        "num_prompt_tokens": 40,
        "kv_ports": [9000, 9001],
    }
    return Lease(**(fields | changes))


def use_node(monkeypatch, settings: Settings) -> bytes:
    """Environment of a node started by pdserve; returns its lease key."""
    key = new_node_key()
    monkeypatch.setenv(ENV_VAR, settings.to_json())
    monkeypatch.setenv(NODE_KEY_ENV_VAR, key)
    monkeypatch.delenv("VLLM_API_KEY", raising=False)
    return bytes.fromhex(key)


class FakeEngine:
    """vLLM's engine client: records the leases handed back to it."""

    def __init__(self) -> None:
        self.rejected: list[tuple[str, dict]] = []

    async def notify_kv_transfer_request_rejected(
        self, request_id: str, kv_transfer_params: dict[str, Any]
    ) -> None:
        self.rejected.append((request_id, kv_transfer_params))

    def leases(self) -> list[Lease | None]:
        return [Lease.from_params(params) for _, params in self.rejected]


def app_state(api_key: list[str] | None = None, engine: Any = None) -> Any:
    """What ``scope["app"]`` offers: vLLM's parsed args and engine client."""
    state = SimpleNamespace(
        args=SimpleNamespace(api_key=api_key),
        engine_client=FakeEngine() if engine is None else engine,
    )
    return SimpleNamespace(state=state)


@dataclass
class Seen:
    method: str
    path: str
    headers: dict[bytes, bytes]
    body: bytes
    header_list: list[tuple[bytes, bytes]] = field(default_factory=list)

    def count(self, name: bytes) -> int:
        return [k.lower() for k, _ in self.header_list].count(name)

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class FakeVLLM:
    """vLLM's app: records every request, answers ``status`` and ``answer``."""

    status: int = 200
    answer: Any = field(default_factory=lambda: {"ok": True})
    seen: list[Seen] = field(default_factory=list)

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        chunks = []
        while True:
            message = await receive()
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                break
        headers = dict(scope["headers"])
        body = b"".join(chunks)
        assert int(headers[b"content-length"]) == len(body)
        seen = Seen(scope["method"], scope["path"], headers, body, scope["headers"])
        self.seen.append(seen)
        data = json.dumps(self.answer).encode()
        await send(
            {
                "type": "http.response.start",
                "status": self.status,
                "headers": [(b"content-type", b"application/json")],
            }
        )
        await send({"type": "http.response.body", "body": data})


@dataclass
class Answer:
    status: int
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


async def call(
    middleware: Any,
    method: str,
    path: str,
    body: bytes = b"",
    headers: list[tuple[bytes, bytes]] | None = None,
    app: Any = None,
    root_path: str = "",
) -> Answer:
    """One HTTP request through ``middleware``; the client never leaves.

    ``path`` is the full path, root path included (as servers send it)."""
    if headers is None:
        headers = [(b"content-type", b"application/json")]
    scope = {
        "type": "http",
        "method": method,
        "path": path,
        "raw_path": path.encode(),
        "root_path": root_path,
        "query_string": b"",
        "headers": [*headers, (b"content-length", str(len(body)).encode())],
        "app": app_state() if app is None else app,
    }
    delivered = False

    async def receive() -> dict:
        nonlocal delivered
        if not delivered:
            delivered = True
            return {"type": "http.request", "body": body, "more_body": False}
        await asyncio.Event().wait()
        raise AssertionError("unreachable")

    messages: list[dict] = []

    async def send(message: dict) -> None:
        messages.append(message)

    await middleware(scope, receive, send)
    starts = [m for m in messages if m["type"] == "http.response.start"]
    assert len(starts) == 1, messages
    data = b"".join(m.get("body", b"") for m in messages[1:])
    return Answer(starts[0]["status"], data)


def producer_metadata(**changes: Any) -> dict[str, Any]:
    """/pdserve/metadata of a producer that suits ``CONSUMER``."""
    import vllm

    import pdserve

    return {
        "role": "producer",
        "model": "m",
        "dtype": "auto",
        "tensor_parallel_size": 1,
        "kv_ports": [9000],
        "instance_id": "e1",
        "kv_auth": False,
        "protocol_version": pdserve.PROTOCOL_VERSION,
        "pdserve_version": pdserve.__version__,
        "vllm_version": vllm.__version__,
    } | changes


@dataclass
class FakeProducer:
    """The producer's HTTP side: answers every prefill with ``answer`` (a
    dict, or a ``web.Response`` for other statuses), /pdserve/metadata with
    ``metadata`` and /health with ``health``."""

    answer: Callable[[dict], Any]
    url: str = ""
    # Each fake is its own producer instance (one instance under two
    # addresses counts once).
    metadata: dict[str, Any] = field(
        default_factory=lambda: producer_metadata(instance_id=uuid.uuid4().hex)
    )
    health: int = 200
    requests: list[tuple[str, dict, dict[str, str]]] = field(default_factory=list)
    # The exact bytes of each request's body, in the order of ``requests``.
    bodies: list[bytes] = field(default_factory=list)
    # Every GET: (path, headers).
    gets: list[tuple[str, dict[str, str]]] = field(default_factory=list)
    # Like vLLM's server (uvicorn): a connection idle this long is closed,
    # at the worst moment: as the next request on it arrives (None: kept).
    keep_alive: float | None = None
    dropped: int = 0  # requests lost that way
    # When each connection's last request came (this fake answers at once:
    # its idle time starts then).
    _last_request_at: dict[int, float] = field(default_factory=dict)

    def _closes(self, request: web.Request) -> bool:
        connection = id(request.transport)
        now = time.monotonic()
        last = self._last_request_at.get(connection)
        self._last_request_at[connection] = now
        if self.keep_alive is None or last is None or now - last < self.keep_alive:
            return False
        assert request.transport is not None
        request.transport.close()
        self.dropped += 1
        return True

    async def handle(self, request: web.Request) -> web.StreamResponse:
        if self._closes(request):
            return web.Response()  # never sent: the connection is gone
        self.bodies.append(await request.read())
        payload = await request.json()
        self.requests.append((request.path, payload, dict(request.headers)))
        answer = self.answer(payload)
        if asyncio.iscoroutine(answer):
            answer = await answer
        if isinstance(answer, web.StreamResponse):
            return answer
        return web.json_response(self._own_instance(answer))

    def _own_instance(self, answer: Any) -> Any:
        """A producer's leases carry its own instance id."""
        params = answer.get("kv_transfer_params") if isinstance(answer, dict) else None
        lease = params.get("pdserve_lease") if isinstance(params, dict) else None
        if isinstance(lease, dict) and lease.get("instance_id") == "e1":
            lease["instance_id"] = self.metadata["instance_id"]
        return answer

    async def handle_get(self, request: web.Request) -> web.Response:
        if self._closes(request):
            return web.Response()
        self.gets.append((request.path, dict(request.headers)))
        if request.path == "/pdserve/metadata":
            return web.json_response(self.metadata)
        if request.path == "/health":
            return web.Response(status=self.health)
        return web.Response(status=404)


@contextlib.asynccontextmanager
async def fake_producer(
    answer: Callable[[dict], Any], host: str = "127.0.0.1", port: int = 0
) -> AsyncIterator[FakeProducer]:
    producer = FakeProducer(answer)
    app = web.Application()
    app.router.add_post("/{tail:.*}", producer.handle)
    app.router.add_get("/{tail:.*}", producer.handle_get)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    producer.url = f"http://{host}:{port}"
    try:
        yield producer
    finally:
        await runner.cleanup()


def run(coro: Any) -> Any:
    return asyncio.run(asyncio.wait_for(coro, timeout=20))
