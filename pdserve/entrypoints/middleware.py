"""ASGI middleware that vLLM's OpenAI server loads through ``--middleware``.

On both nodes it serves ``GET /pdserve/metadata`` (the startup handshake) and
the legacy ``POST /generate``, behind vLLM's ``--api-key``. On the consumer
it removes every client-supplied ``kv_transfer_params`` from every request
body, and puts the producer in front of every completion: the producer
prefills and leases the KV, the request then goes to vLLM's own handlers
carrying the lease, signed by this node, in ``kv_transfer_params``. A lease
the engine will not read (request rejected, client gone) is handed to the
engine to release at once instead of waiting for it to expire on the
producer.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable
from typing import Any, TypeVar

import vllm

import pdserve
from pdserve.consumer import client_body
from pdserve.consumer.client_body import Body, BodyTooDeep
from pdserve.consumer.placer import Placer
from pdserve.consumer.remote_prefill import RemotePrefill, local_reason, release_lease
from pdserve.entrypoints.auth import UNAUTHORIZED, accepted_keys, authorized
from pdserve.entrypoints.legacy_generate import (
    BufferedReply,
    StreamingReply,
    send_json,
    to_completion_request,
)
from pdserve.handshake import METADATA_PATH
from pdserve.lease import Lease
from pdserve.metrics import LOCAL_PREFILLS
from pdserve.settings import Settings, kv_secret

COMPLETION_PATHS = ("/v1/completions", "/v1/chat/completions")
LEGACY_PATH = "/generate"
OWN_ROUTES = ((METADATA_PATH, "GET"), (LEGACY_PATH, "POST"))
# Methods whose body vLLM may read: the consumer inspects them all.
BODY_METHODS = ("POST", "PUT", "PATCH")
# Headers that describe the client's body, not the one forwarded.
BODY_HEADERS = (b"content-length", b"transfer-encoding")
JSON_TYPE = (b"content-type", b"application/json")
T = TypeVar("T")


def node_metadata(settings: Settings) -> dict[str, Any]:
    return {
        "role": settings.role,
        "model": settings.model,
        "dtype": settings.dtype,
        "tensor_parallel_size": settings.tensor_parallel_size,
        "max_model_len": settings.max_model_len,
        "kv_ports": settings.kv_ports,
        # A restarted producer has a new id (the epoch its leases carry).
        "instance_id": settings.instance_id,
        "transport": settings.transport,
        # Whether the KV ports require the shared secret (never the secret).
        "kv_auth": kv_secret() is not None,
        "pdserve_version": pdserve.__version__,
        "protocol_version": pdserve.PROTOCOL_VERSION,
        "vllm_version": vllm.__version__,
    }


async def read_body(receive: Any) -> bytes:
    chunks = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ConnectionAbortedError("client disconnected")
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(chunks)


def route_of(scope: dict) -> str:
    """The request's path without the server's root path, as vLLM matches it."""
    return scope["path"].removeprefix(scope.get("root_path", ""))


def with_body(
    scope: dict,
    receive: Any,
    body: Body,
    route: str | None = None,
):
    """A scope and receive that replay ``body``, then pass disconnects through.

    A body pdserve wrote itself is JSON whatever the client declared."""
    drop = (*BODY_HEADERS, b"content-type") if body.rewritten else BODY_HEADERS
    headers = [(k, v) for k, v in scope["headers"] if k.lower() not in drop]
    headers.append((b"content-length", str(len(body.data)).encode()))
    if body.rewritten:
        headers.append(JSON_TYPE)
    new_scope = dict(scope, headers=headers)
    if route is not None:
        # Keep whatever root path prefix the server put in front of the route.
        path = scope["path"].removesuffix(route_of(scope)) + route
        new_scope.update(path=path, raw_path=path.encode())
    replayed = False

    async def replay() -> dict:
        nonlocal replayed
        if not replayed:
            replayed = True
            return {"type": "http.request", "body": body.data, "more_body": False}
        return await receive()

    return new_scope, replay


class ClientWatch:
    """Stands between the client and the app, noting whether the client went
    away before any response body reached it."""

    def __init__(self, receive: Any) -> None:
        self._receive = receive
        self._pending: asyncio.Future | None = None
        self.body_sent = False
        # The client left before receiving a byte of the answer: whatever
        # happened inside vLLM, nobody will use this request's KV.
        self.left_early = False

    async def receive(self) -> dict:
        if self._pending is not None:
            pending, self._pending = self._pending, None
            message = await pending
        else:
            message = await self._receive()
        self._note(message)
        return message

    def _note(self, message: dict) -> None:
        if message["type"] == "http.disconnect" and not self.body_sent:
            self.left_early = True

    async def during(self, work: Awaitable[T]) -> T:
        """Await ``work`` while listening for the client leaving meanwhile.

        The message listened for is kept for the app's next receive."""
        if self._pending is None:
            self._pending = asyncio.ensure_future(self._receive())
        result = await work
        if self._pending.done() and not self._pending.cancelled():
            self._note(self._pending.result())
        return result

    def wrap_send(self, send: Any) -> Any:
        async def watched(message: dict) -> None:
            if message["type"] == "http.response.body" and message.get("body"):
                self.body_sent = True
            await send(message)

        return watched


class PDServeMiddleware:
    def __init__(self, app: Any) -> None:
        self.app = app
        settings = Settings.from_env()
        if settings is None:
            raise RuntimeError("PDServeMiddleware needs the pdserve entrypoint")
        self.settings = settings
        self.metadata = node_metadata(settings)
        self.prefill = RemotePrefill(settings) if settings.role == "consumer" else None
        self.placer = Placer(settings) if settings.role == "consumer" else None

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        route, method = route_of(scope), scope["method"]
        if self._guarded(route, method) and not authorized(scope):
            return await send_json(send, 401, UNAUTHORIZED)
        if (route, method) == (METADATA_PATH, "GET"):
            return await send_json(send, 200, self._metadata())
        if (route, method) == (LEGACY_PATH, "POST") or self._inspects(method):
            return await self._with_body(scope, receive, send, route)
        # The producer serves its own requests (from this consumer) as is.
        await self.app(scope, receive, send)

    def _metadata(self) -> dict[str, Any]:
        if self.prefill is None:
            return self.metadata
        # The consumer's producers as it sees them now (for debugging).
        return dict(self.metadata, producers=self.prefill.pool.describe())

    def _guarded(self, route: str, method: str) -> bool:
        """Routes whose key is checked here: vLLM's own check runs later, too
        late for requests sent on to the producer, and does not cover
        pdserve's routes."""
        if (route, method) in OWN_ROUTES:
            return True
        return self._remote(route, method)

    def _remote(self, route: str, method: str) -> bool:
        return (
            self.prefill is not None and method == "POST" and route in COMPLETION_PATHS
        )

    def _inspects(self, method: str) -> bool:
        """The consumer reads every body vLLM may read, for kv_transfer_params."""
        return self.prefill is not None and method in BODY_METHODS

    async def _with_body(
        self, scope: dict, receive: Any, send: Any, route: str
    ) -> None:
        try:
            body = await self._client_body(receive, route)
        except ConnectionAbortedError:
            return
        except BodyTooDeep as exc:
            return await send_json(send, 400, {"error": f"invalid request: {exc}"})
        if (route, scope["method"]) == (LEGACY_PATH, "POST"):
            return await self._legacy_generate(scope, receive, send, body)
        if self._remote(route, scope["method"]):
            return await self._completion(scope, receive, send, body, route)
        await self._forward(scope, receive, send, body)

    async def _client_body(self, receive: Any, route: str) -> Body:
        """The request body; on the consumer without kv_transfer_params."""
        data = await read_body(receive)
        if self.prefill is None:
            return Body(data)
        return client_body.from_client(data, route)

    async def _completion(
        self, scope: dict, receive: Any, send: Any, body: Body, route: str
    ) -> None:
        payload = body.payload if body.is_json else None
        if (reason := local_reason(route, payload)) is not None:
            LOCAL_PREFILLS.labels(reason=reason).inc()
            return await self._forward(scope, receive, send, body, route)
        assert self.prefill is not None and self.placer is not None
        with self.placer.serving():
            await self._placed(scope, receive, send, body, route, payload)

    async def _placed(
        self,
        scope: dict,
        receive: Any,
        send: Any,
        body: Body,
        route: str,
        payload: dict[str, Any],
    ) -> None:
        """Prefill here if that is cheaper (placement), else on a producer."""
        assert self.prefill is not None and self.placer is not None
        # This node's key: producers that join are asked for their metadata
        # with it, as at startup.
        api_key = next(iter(accepted_keys(scope)), None)
        saturated = await self.prefill.producers_saturated(api_key)
        decision, ids = await self.placer.place(scope, route, payload, saturated)
        if decision is not None and decision.local:
            LOCAL_PREFILLS.labels(reason=decision.reason).inc()
            streamed = bool(payload.get("stream"))
            timed = self.placer.timed_local(send, decision.new_tokens, streamed)
            return await self._forward(scope, receive, timed, body, route)
        headers = {
            k.decode("latin-1").lower(): v.decode("latin-1")
            for k, v in scope["headers"]
        }
        client = ClientWatch(receive)
        asking = self.prefill.request_lease(
            route,
            payload,
            headers,
            prompt_tokens=len(ids) if ids is not None else None,
            api_key=api_key,
        )
        started = time.perf_counter()
        lease = await client.during(asking)
        if lease is None:
            return await self._forward(scope, client.receive, send, body, route)
        self.placer.observe_remote(time.perf_counter() - started, lease)
        if client.left_early:
            # Gone while the producer prefilled: do not start the request.
            return await self._release(scope, lease, "client_disconnected")
        leased = Body.of(dict(payload, kv_transfer_params=lease.to_params()))
        status = await self._forward(
            scope, client.receive, client.wrap_send(send), leased, route
        )
        if client.left_early:
            # vLLM aborted the request, maybe before its engine saw the lease;
            # if the engine did, it releases too, and the second is a no-op.
            await self._release(scope, lease, "client_disconnected")
        elif status >= 400:
            await self._release(scope, lease, "rejected")

    @staticmethod
    async def _release(scope: dict, lease: Lease, reason: str) -> None:
        state = getattr(scope.get("app"), "state", None)
        await release_lease(getattr(state, "engine_client", None), lease, reason)

    async def _forward(
        self,
        scope: dict,
        receive: Any,
        send: Any,
        body: Body,
        route: str | None = None,
    ) -> int:
        """Run vLLM's handler on ``body``; returns the response status."""
        new_scope, replay = with_body(scope, receive, body, route)
        status = 500

        async def record(message: dict) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        await self.app(new_scope, replay, record)
        return status

    async def _legacy_generate(
        self, scope: dict, receive: Any, send: Any, body: Body
    ) -> None:
        # Parsed whatever the content type: vLLM's retired server did too.
        try:
            payload = body.payload if body.is_json else json.loads(body.data)
            request = to_completion_request(payload)
            translated = Body.of(request)
        except (ValueError, RecursionError) as exc:
            return await send_json(send, 400, {"error": f"invalid request: {exc}"})
        reply = StreamingReply if request["stream"] else BufferedReply
        target = COMPLETION_PATHS[0]
        reply_send = reply(request["prompt"], send)
        if self.prefill is None:
            await self._forward(scope, receive, reply_send, translated, target)
            return
        await self._completion(scope, receive, reply_send, translated, target)
