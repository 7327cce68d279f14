"""ASGI middleware that vLLM's OpenAI server loads through ``--middleware``.

On both nodes it serves ``GET /pdserve/metadata`` (the startup handshake) and
the legacy ``POST /generate``. On the consumer it puts the producer in front
of every completion: the producer prefills and leases the KV, the request
then goes to vLLM's own handlers carrying the lease in ``kv_transfer_params``.
A lease the engine will not read (request rejected, client gone) is released
here at once instead of waiting for it to expire on the producer.
"""

from __future__ import annotations

import asyncio
import hmac
import json
from collections.abc import Awaitable
from typing import Any, TypeVar

import vllm

import pdserve
from pdserve.consumer.remote_prefill import RemotePrefill, local_reason
from pdserve.entrypoints.legacy_generate import (
    BufferedReply,
    StreamingReply,
    send_json,
    to_completion_request,
)
from pdserve.handshake import METADATA_PATH
from pdserve.metrics import LOCAL_PREFILLS
from pdserve.settings import Settings, kv_secret

COMPLETION_PATHS = ("/v1/completions", "/v1/chat/completions")
T = TypeVar("T")


def node_metadata(settings: Settings) -> dict[str, Any]:
    return {
        "role": settings.role,
        "model": settings.model,
        "dtype": settings.dtype,
        "tensor_parallel_size": settings.tensor_parallel_size,
        "max_model_len": settings.max_model_len,
        "kv_ports": settings.kv_ports,
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


def with_body(scope: dict, receive: Any, body: bytes, path: str | None = None):
    """A scope and receive that replay ``body``, then pass disconnects through."""
    headers = [(k, v) for k, v in scope["headers"] if k != b"content-length"]
    headers.append((b"content-length", str(len(body)).encode()))
    new_scope = dict(scope, headers=headers)
    if path is not None:
        new_scope.update(path=path, raw_path=path.encode())
    replayed = False

    async def replay() -> dict:
        nonlocal replayed
        if not replayed:
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}
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

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path, method = scope["path"], scope["method"]
        if path == METADATA_PATH and method == "GET":
            return await send_json(send, 200, self.metadata)
        if method == "POST" and path in (*COMPLETION_PATHS, "/generate"):
            if not self._authorized(scope):
                return await send_json(send, 401, {"error": "Unauthorized"})
            try:
                body = await read_body(receive)
            except ConnectionAbortedError:
                return
            if path == "/generate":
                return await self._legacy_generate(scope, receive, send, body)
            return await self._completion(scope, receive, send, body)
        return await self.app(scope, receive, send)

    def _authorized(self, scope: dict) -> bool:
        # vLLM checks --api-key in an inner middleware; check it here too so
        # unauthenticated requests never reach the producer.
        if not self.settings.api_keys:
            return True
        headers = dict(scope["headers"])
        given = headers.get(b"authorization", b"").decode()
        return any(
            hmac.compare_digest(given, f"Bearer {key}")
            for key in self.settings.api_keys
        )

    async def _completion(
        self, scope: dict, receive: Any, send: Any, body: bytes, path: str | None = None
    ) -> None:
        path = path or scope["path"]
        if self.prefill is None:
            return await self._forward(scope, receive, send, body, path)
        try:
            payload = json.loads(body)
        except ValueError:
            payload = None
        if (reason := local_reason(path, payload)) is not None:
            LOCAL_PREFILLS.labels(reason=reason).inc()
            return await self._forward(scope, receive, send, body, path)
        headers = {k.decode().lower(): v.decode() for k, v in scope["headers"]}
        client = ClientWatch(receive)
        lease = await client.during(self.prefill.request_lease(path, payload, headers))
        if lease is not None and client.left_early:
            # Gone while the producer prefilled: do not start the request.
            return await self.prefill.release(lease, "client_disconnected")
        if lease is not None:
            body = json.dumps(dict(payload, kv_transfer_params=lease)).encode()
        status = await self._forward(
            scope, client.receive, client.wrap_send(send), body, path
        )
        if lease is None:
            return
        if client.left_early:
            # vLLM aborted the request, maybe before its engine saw the lease;
            # if the engine did, it releases too, and the second is a no-op.
            await self.prefill.release(lease, "client_disconnected")
        elif status >= 400:
            await self.prefill.release(lease, "rejected")

    async def _forward(
        self, scope: dict, receive: Any, send: Any, body: bytes, path: str
    ) -> int:
        """Run vLLM's handler on ``body``; returns the response status."""
        new_scope, replay = with_body(scope, receive, body, path)
        status = 500

        async def record(message: dict) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        await self.app(new_scope, replay, record)
        return status

    async def _legacy_generate(
        self, scope: dict, receive: Any, send: Any, body: bytes
    ) -> None:
        try:
            request = to_completion_request(json.loads(body))
        except (ValueError, TypeError, AttributeError) as exc:
            return await send_json(send, 400, {"error": f"invalid request: {exc}"})
        prompt = request["prompt"]
        reply = StreamingReply if request["stream"] else BufferedReply
        await self._completion(
            scope,
            receive,
            reply(prompt, send),
            json.dumps(request).encode(),
            path="/v1/completions",
        )
