"""ASGI middleware that vLLM's OpenAI server loads through ``--middleware``.

On both nodes it serves ``GET /pdserve/metadata`` (the startup handshake) and
the legacy ``POST /generate``, behind vLLM's ``--api-key``, and reads every
request body (POST/PUT/PATCH) itself: only after the key was checked, only up
to ``--max-request-body-bytes`` (413 beyond), parsing large ones off the
event loop. Every client-supplied ``kv_transfer_params`` is removed from
every body.

On the consumer it puts a producer in front of every completion: the
producer prefills and leases the KV, the request then goes to vLLM's own
handlers carrying the lease, signed by this node, in ``kv_transfer_params``.
A lease the engine will not read (request rejected, client gone) is handed
to the engine to release at once instead of waiting for it to expire on the
producer. Its ``GET /health`` says whether prompts go to producers.

On the producer every route but ``GET /health`` and ``GET /metrics`` is
behind the key (vLLM's own check covers only some prefixes, and it always
serves ``/invocations``, which runs completions), and ``do_remote_decode``
(a lease: pinned KV) is put back only for a request that asked for it and
may have it: with a KV secret, one that proves it comes from a consumer
(``request_proof``); without one, any request that passed the key.
"""

from __future__ import annotations

import json
import time
from typing import Any, TypeVar

import vllm

import pdserve
from pdserve.consumer import client_body
from pdserve.consumer.client_body import Body, BodyTooDeep, off_loop
from pdserve.consumer.placer import Placer
from pdserve.consumer.remote_prefill import RemotePrefill
from pdserve.consumer.request_flow import Call, RequestFlow
from pdserve.entrypoints.auth import (
    UNAUTHORIZED,
    accepted_keys,
    authorized,
    header_value,
)
from pdserve.entrypoints.legacy_generate import (
    BufferedReply,
    StreamingReply,
    send_json,
    to_completion_request,
)
from pdserve.handshake import METADATA_PATH
from pdserve.lease import node_key
from pdserve.log import init_logger
from pdserve.request_proof import (
    PROOF_HEADER,
    ProofRejected,
    ProofVerifier,
    body_digest,
    proof_key,
)
from pdserve.settings import Settings, kv_secret

logger = init_logger(__name__)

COMPLETION_PATHS = ("/v1/completions", "/v1/chat/completions")
LEGACY_PATH = "/generate"
HEALTH = ("/health", "GET")
OWN_ROUTES = ((METADATA_PATH, "GET"), (LEGACY_PATH, "POST"))
# The producer's only routes without its key, as in vLLM: kubelet probes and
# Prometheus call them without one, and neither can pin KV.
OPEN_ROUTES = (HEALTH, ("/metrics", "GET"))
# Methods whose body vLLM may read: pdserve reads them all, on both nodes.
BODY_METHODS = ("POST", "PUT", "PATCH")
# WebSocket close code for a policy violation (here: no valid key).
WS_POLICY_VIOLATION = 1008
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
        # A restarted producer has a new id (its leases carry it).
        "instance_id": settings.instance_id,
        "transport": settings.transport,
        # Whether the KV ports require the shared secret (never the secret).
        "kv_auth": kv_secret() is not None,
        "pdserve_version": pdserve.__version__,
        "protocol_version": pdserve.PROTOCOL_VERSION,
        "vllm_version": vllm.__version__,
        "serving_identity": settings.serving_identity,
    }


class BodyTooLarge(ValueError):
    """The request body is larger than --max-request-body-bytes."""


def declared_length(scope: dict) -> int | None:
    """The Content-Length the client declared, if a valid one."""
    value = header_value(scope, b"content-length")
    if value is None or not value.strip().isdigit():
        return None
    return int(value)


async def read_body(receive: Any, limit: int) -> bytes:
    """The whole body, counted as it arrives (a chunked one declares no
    length): BodyTooLarge as soon as it passes ``limit`` bytes."""
    chunks = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ConnectionAbortedError("client disconnected")
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise BodyTooLarge(size)
        chunks.append(chunk)
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


def own_key(scope: dict) -> str | None:
    """This node's own API key (its first), the one it calls producers with."""
    return next(iter(accepted_keys(scope)), None)


def too_large(limit: int) -> dict[str, str]:
    return {
        "error": f"request body larger than {limit} bytes "
        "(the server's --max-request-body-bytes)"
    }


class PDServeMiddleware:
    def __init__(self, app: Any) -> None:
        self.app = app
        settings = Settings.from_env()
        if settings is None:
            raise RuntimeError("PDServeMiddleware needs the pdserve entrypoint")
        self.settings = settings
        self.metadata = node_metadata(settings)
        self.prefill = RemotePrefill(settings) if settings.role == "consumer" else None
        self.flow = (
            RequestFlow(settings, self.prefill, Placer(settings), node_key())
            if self.prefill is not None
            else None
        )
        secret = kv_secret() if settings.role == "producer" else None
        self.proofs = ProofVerifier(proof_key(secret)) if secret is not None else None

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan" and self.prefill is not None:
            # Follow the producers from the start, requests or not: one that
            # comes up later is picked up (and logged) as it does.
            self.prefill.pool.start(own_key(scope))
        if scope["type"] == "websocket" and self._guarded_socket(scope):
            await receive()  # websocket.connect
            return await send({"type": "websocket.close", "code": WS_POLICY_VIOLATION})
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        route, method = route_of(scope), scope["method"]
        if self._guarded(route, method) and not authorized(scope):
            return await send_json(send, 401, UNAUTHORIZED)
        if (route, method) == (METADATA_PATH, "GET"):
            return await send_json(send, 200, self._metadata())
        if (route, method) == HEALTH and self.prefill is not None:
            return await self._health(scope, receive, send)
        if (route, method) == (LEGACY_PATH, "POST") or method in BODY_METHODS:
            return await self._with_body(scope, receive, send, route)
        await self.app(scope, receive, send)

    def _metadata(self) -> dict[str, Any]:
        if self.prefill is None:
            return self.metadata
        # The consumer's producers as it sees them now (for debugging).
        return dict(self.metadata, producers=self.prefill.pool.describe())

    def _guarded(self, route: str, method: str) -> bool:
        """Routes whose key is checked here, before anything else: vLLM's own
        check runs later (too late for bodies pdserve reads and requests sent
        on to a producer) and covers only some prefixes.

        Producer: every route but OPEN_ROUTES. Consumer: pdserve's own
        routes and every route whose body pdserve reads."""
        if self.prefill is None:
            return (route, method) not in OPEN_ROUTES
        return (route, method) in OWN_ROUTES or method in BODY_METHODS

    def _guarded_socket(self, scope: dict) -> bool:
        """A producer's WebSockets need its key too (the consumer's are
        vLLM's business)."""
        return self.prefill is None and not authorized(scope)

    def _remote(self, route: str, method: str) -> bool:
        return (
            self.prefill is not None and method == "POST" and route in COMPLETION_PATHS
        )

    async def _with_body(
        self, scope: dict, receive: Any, send: Any, route: str
    ) -> None:
        entered_at = time.time()  # TTFT as this node sees it starts here
        limit = self.settings.max_request_body_bytes
        declared = declared_length(scope)
        if declared is not None and declared > limit:
            # Refused before a byte of it is read.
            return await send_json(send, 413, too_large(limit))
        try:
            data = await read_body(receive, limit)
            body = await self._parsed(scope, data, route)
        except ConnectionAbortedError:
            return
        except BodyTooLarge:
            return await send_json(send, 413, too_large(limit))
        except ProofRejected as exc:
            logger.warning("Refused a request on %s: proof %s", route, exc)
            return await send_json(send, 403, {"error": f"pdserve proof: {exc}"})
        except BodyTooDeep as exc:
            return await send_json(send, 400, {"error": f"invalid request: {exc}"})
        if (route, scope["method"]) == (LEGACY_PATH, "POST"):
            return await self._legacy_generate(scope, receive, send, body, entered_at)
        if self._remote(route, scope["method"]):
            return await self._completion(scope, receive, send, body, route, entered_at)
        await self._forward(scope, receive, send, body)

    async def _parsed(self, scope: dict, data: bytes, route: str) -> Body:
        """The request body without the client's kv_transfer_params."""
        if self.prefill is not None:
            return await off_loop(len(data), client_body.from_client, data, route)
        may_lease = await self._may_lease(scope, data, route)
        return await off_loop(len(data), client_body.for_producer, data, may_lease)

    async def _may_lease(self, scope: dict, data: bytes, route: str) -> bool:
        """Producer: whether this request may have ``do_remote_decode``.

        With a KV secret only with a consumer's proof (a proof that does not
        hold raises ProofRejected); without one, any request that got here
        passed the key, if there is one."""
        if self.proofs is None:
            return True
        proof = header_value(scope, PROOF_HEADER.encode())
        if proof is None:
            return False
        digest = await off_loop(len(data), body_digest, data)
        self.proofs.verify(proof, scope["method"], route, digest)
        return True

    async def _health(self, scope: dict, receive: Any, send: Any) -> None:
        """Consumer: vLLM's answer, with whether prompts go to producers
        when it is 200 (a consumer without producers serves: it prefills
        locally)."""
        assert self.prefill is not None
        self.prefill.pool.start(own_key(scope))
        messages: list[dict] = []

        async def keep(message: dict) -> None:
            messages.append(message)

        await self.app(scope, receive, keep)
        starts = [m for m in messages if m["type"] == "http.response.start"]
        if starts and starts[0]["status"] == 200:
            return await send_json(send, 200, self.prefill.pool.state())
        for message in messages:
            await send(message)

    async def _completion(
        self,
        scope: dict,
        receive: Any,
        send: Any,
        body: Body,
        route: str,
        entered_at: float | None = None,
    ) -> None:
        """A completion on the consumer: its whole flow is ``RequestFlow``."""
        assert self.flow is not None

        async def forward(receive: Any, send: Any, body: Body) -> int:
            return await self._forward(scope, receive, send, body, route)

        call = Call(scope, receive, send, body, route, forward, api_key=own_key(scope))
        if entered_at is not None:
            call.entered_at = entered_at
        await self.flow.serve(call)

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
        self,
        scope: dict,
        receive: Any,
        send: Any,
        body: Body,
        entered_at: float | None = None,
    ) -> None:
        # Parsed whatever the content type: vLLM's retired server did too.
        try:
            payload = body.payload if body.is_json else json.loads(body.data)
            request = to_completion_request(payload)
            translated = await off_loop(len(body.data), Body.of, request)
        except (ValueError, RecursionError) as exc:
            return await send_json(send, 400, {"error": f"invalid request: {exc}"})
        reply = StreamingReply if request["stream"] else BufferedReply
        target = COMPLETION_PATHS[0]
        reply_send = reply(request["prompt"], send)
        if self.prefill is None:
            await self._forward(scope, receive, reply_send, translated, target)
            return
        await self._completion(
            scope, receive, reply_send, translated, target, entered_at
        )
