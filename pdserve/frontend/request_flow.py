"""One completion on the consumer, top down.

1. **Place**: prefill here when that is cheaper (``placement``), or when the
   request is of a kind a producer cannot serve (``local_reason``).
2. **Tokens, once**: the prompt as this node's vLLM renders it; the
   producer and this node's engine both receive those token ids (a chat's
   through vLLM's ``prompt_token_ids`` reuse), and the lease's fingerprint
   is checked on them.
3. **Admit and ask at once**: the request goes to this node's vLLM now,
   carrying a ticket (``pdserve.ticket``), while a producer prefills it:
   vLLM's handler, the hop to the engine and its admission all happen
   meanwhile, nothing of this node's path waits for the producer's answer.
4. **The answer**, the lease with the producer's first token, goes to the
   engine through vLLM's own path for KV-transfer parameters outside a
   request (``pdserve.ticket``); the engine emits that token at once and
   continues from it (``connector/first_token.py``), pulling the prompt's KV
   meanwhile. No lease, no answer in time, or the producer's refusal: the
   engine prefills locally.
5. **Release**: a lease whose request will never read it (vLLM rejected
   the request, the client left, another instance answered) goes back to
   its producer through the engine, which owns every release.

Where vLLM's engine client offers no such path, step 3 waits for the lease
first, then hands the request to vLLM with the lease inline.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from pdserve import metrics
from pdserve.frontend.client_body import Body, off_loop
from pdserve.frontend.placer import Placer
from pdserve.frontend.prompt_tokens import prompt_token_ids
from pdserve.frontend.remote_prefill import (
    PROMPT_IDS_KEY,
    Answer,
    RemotePrefill,
    local_reason,
    release_lease,
)
from pdserve.lease import Lease
from pdserve.log import init_logger
from pdserve.settings import Settings
from pdserve.ticket import Cancel, Delivery, Message, Ticket, message_params
from pdserve.vllm_compat import reuses_chat_prompt_ids

logger = init_logger(__name__)

CHAT = "/chat/completions"
# (receive, send, body) -> the response status: vLLM's handler on ``body``.
Forward = Callable[[Any, Any, Body], Awaitable[int]]


@dataclass
class Call:
    """One client request on its way through the consumer."""

    scope: dict
    receive: Any
    send: Any
    body: Body
    route: str
    forward: Forward
    # When (wall clock) it reached this node's HTTP layer.
    entered_at: float = field(default_factory=time.time)
    # This node's own API key: producers are called with it, never a client's.
    api_key: str | None = None

    @property
    def payload(self) -> Any:
        return self.body.payload if self.body.is_json else None

    @property
    def engine(self) -> Any:
        state = getattr(self.scope.get("app"), "state", None)
        return getattr(state, "engine_client", None)


class RequestFlow:
    def __init__(
        self,
        settings: Settings,
        prefill: RemotePrefill,
        placer: Placer,
        node_key: bytes,
    ) -> None:
        self.settings = settings
        self.prefill = prefill
        self.placer = placer
        self._key = node_key
        # Admit requests while a producer prefills them (off: wait for the
        # lease first, then hand it inline; both paths are tested).
        self.admit_early = True

    async def serve(self, call: Call) -> None:
        payload = call.payload
        if (reason := local_reason(call.route, payload)) is not None:
            metrics.LOCAL_PREFILLS.labels(reason=reason).inc()
            await call.forward(call.receive, call.send, call.body)
            return
        with self.placer.serving():
            saturated = await self.prefill.producers_saturated(call.api_key)
            decision, ids = await self.placer.place(
                call.scope, call.route, payload, saturated
            )
            if decision is not None and decision.local:
                metrics.LOCAL_PREFILLS.labels(reason=decision.reason).inc()
                streamed = bool(payload.get("stream"))
                send = self.placer.timed_local(call.send, decision.new_tokens, streamed)
                await call.forward(call.receive, send, call.body)
                return
            if ids is None:
                ids = await prompt_token_ids(call.scope, call.route, payload)
            call.send = timed_tokens(call.send, call.entered_at, payload)
            if self.admit_early and _notify(call.engine) is not None:
                await self._admitted_while_asking(call, ids)
            else:
                await self._admitted_with_lease(call, ids)

    # ---- the request admitted while a producer prefills ----

    async def _admitted_while_asking(self, call: Call, ids: list[int] | None) -> None:
        deadline = time.time() + self.settings.prefill_timeout
        ticket = Ticket.issue(self._key, deadline, handed_at=time.time())
        asking = asyncio.ensure_future(self._ask(call, ids))
        body = await self._engine_body(call, ids, ticket.to_params())
        client = ClientWatch(call.receive)
        forwarding = asyncio.ensure_future(
            call.forward(client.receive, client.wrap_send(call.send), body)
        )
        await asyncio.wait({asking, forwarding}, return_when=asyncio.FIRST_COMPLETED)
        if forwarding.done() and not asking.done():
            # The request ended before the producer answered (vLLM rejected
            # it, its client left): the answer still goes to the engine,
            # which hands its lease back (the ticket is over).
            ended = _ended_reason(forwarding.result(), client)
            task = asyncio.create_task(self._answer(call, ticket, asking, ended))
            _BACKGROUND.add(task)
            task.add_done_callback(_BACKGROUND.discard)
            return
        answer = await self._answer(call, ticket, asking, None)
        status = await forwarding
        if status >= 400:
            await self._cancel(call, ticket, answer, "rejected")
        elif client.left_early and answer.lease is not None:
            # Gone before any of the answer: the engine aborted the request
            # and hands its lease back itself.
            metrics.LEASES_RELEASED.labels(reason="client_disconnected").inc()

    async def _answer(
        self, call: Call, ticket: Ticket, asking: asyncio.Future, ended: str | None
    ) -> Answer:
        """Hand the producer's answer for ``ticket`` to the engine; and, if
        its request already ended (``ended``: why), cancel the ticket."""
        answer: Answer = await asking
        if answer.lease is not None:
            self.placer.observe_remote(answer.seconds, answer.lease)
        delivery = Delivery(
            ticket.id, answer.lease, refused=answer.reason, sent_at=time.time()
        )
        await self._deliver(call, delivery)
        if ended is not None:
            await self._cancel(call, ticket, answer, ended)
        await self._release_strays(call)
        return answer

    async def _cancel(
        self, call: Call, ticket: Ticket, answer: Answer, reason: str
    ) -> None:
        """The ticket's request is over: its engine lets go of the lease (if
        it never saw the request, at once)."""
        if await self._deliver(call, Cancel(ticket.id)) and answer.lease is not None:
            metrics.LEASES_RELEASED.labels(reason=reason).inc()

    async def _deliver(self, call: Call, message: Message) -> bool:
        """Hand ``message`` to this node's engine (it wakes it)."""
        notify = _notify(call.engine)
        if notify is None:
            return False
        try:
            request_id = f"pdserve-answer-{uuid.uuid4().hex}"
            await notify(request_id, message_params(self._key, message))
        except Exception as exc:  # engine dead or shutting down
            logger.warning("pdserve: handing an answer to the engine failed: %r", exc)
            return False
        return True

    # ---- the request handed over once its lease is in ----

    async def _admitted_with_lease(self, call: Call, ids: list[int] | None) -> None:
        client = ClientWatch(call.receive)
        answer = await client.during(self._ask(call, ids))
        await self._release_strays(call)
        lease = answer.lease
        if lease is None:
            body = await self._engine_body(call, ids, None)
            await call.forward(client.receive, call.send, body)
            return
        self.placer.observe_remote(answer.seconds, lease)
        if client.left_early:
            # Gone while the producer prefilled: do not start the request.
            return await release_lease(call.engine, lease, "client_disconnected")
        handed = lease.signed(self._key, lease.kv_host, handed_at=time.time())
        body = await self._engine_body(call, ids, handed.to_params())
        status = await call.forward(client.receive, client.wrap_send(call.send), body)
        if client.left_early:
            # vLLM aborted the request, maybe before its engine saw the lease;
            # if the engine did, it releases too, and the second is a no-op.
            await release_lease(call.engine, handed, "client_disconnected")
        elif status >= 400:
            await release_lease(call.engine, handed, "rejected")

    # ---- shared ----

    async def _ask(self, call: Call, ids: list[int] | None) -> Answer:
        payload = call.payload
        return await self.prefill.ask(
            call.route,
            with_prompt_ids(call.route, payload, ids),
            prompt_tokens=len(ids) if ids is not None else None,
            api_key=call.api_key,
            size=len(call.body.data),
            prompt_ids=ids if call.route.endswith(CHAT) else None,
            started_at=call.entered_at,
        )

    async def _engine_body(
        self, call: Call, ids: list[int] | None, params: dict | None
    ) -> Body:
        """What this node's vLLM gets: the client's request with the prompt's
        token ids (rendered once) and the ticket's or lease's params."""
        payload = with_prompt_ids(call.route, call.payload, ids)
        if params is not None:
            params = dict(params)
            if ids is not None and call.route.endswith(CHAT):
                if reuses_chat_prompt_ids():
                    params[PROMPT_IDS_KEY] = list(ids)
            payload = dict(payload, kv_transfer_params=params)
        if payload is call.payload:
            return call.body
        return await off_loop(len(call.body.data), Body.of, payload)

    async def _release_strays(self, call: Call) -> None:
        """Leases of instances this node never paired with: handed back."""
        while self.prefill.stray_leases:
            lease: Lease = self.prefill.stray_leases.pop()
            await release_lease(call.engine, lease, "instance_changed")


def _ended_reason(status: int, client: ClientWatch) -> str:
    """Why a request ended before its producer answered."""
    return (
        "rejected"
        if status >= 400 and not client.left_early
        else ("client_disconnected")
    )


def _notify(engine: Any) -> Any:
    """vLLM's way of handing its engine KV-transfer parameters outside a
    request (a request aborted on arrival), if this engine client has it."""
    return getattr(engine, "notify_kv_transfer_request_rejected", None)


# Answers still being handed to the engine after their response ended.
_BACKGROUND: set[asyncio.Task] = set()


def with_prompt_ids(route: str, payload: dict, ids: list[int] | None) -> dict:
    """A completion's text prompt as its token ids (already rendered: vLLM
    then skips tokenizing it again). Chats keep their messages: their ids
    travel in kv_transfer_params."""
    if ids is None or route.endswith(CHAT):
        return payload
    prompt = payload.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, str):
        return payload  # already token ids
    return dict(payload, prompt=list(ids))


def timed_tokens(send: Any, entered_at: float, payload: dict) -> Any:
    """``send`` that times a streamed answer's first two tokens as this node
    sends them: time to first token, and the gap to the second."""
    if not payload.get("stream"):
        return send
    events = 0
    first_at = 0.0

    async def timed(message: dict) -> None:
        nonlocal events, first_at
        body = message.get("body") if message["type"] == "http.response.body" else b""
        if body and events < 2:
            for _ in range(body.count(b"data: ") - body.count(b"data: [DONE]")):
                events += 1
                now = time.time()
                if events == 1:
                    first_at = now
                    metrics.TTFT_HTTP.observe(max(0.0, now - entered_at))
                elif events == 2:
                    metrics.SECOND_TOKEN.observe(max(0.0, now - first_at))
        await send(message)

    return timed


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

    async def during(self, work: Awaitable[Any]) -> Any:
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
