"""Ask a producer to prefill a request and keep its KV for us.

The producer receives the user's own request body with ``max_tokens=1`` and
``do_remote_decode``, so it tokenizes exactly as the consumer will; the lease
it returns carries a fingerprint of those tokens, checked in the engine.
The lease is parsed here once, signed with this node's key and the address
of the producer that issued it (the engine acts only on signed leases, and
reads their KV there) and, if the engine will never see it, handed to the
engine to release: the HTTP layer never talks to the KV side channel.

Producers are called with this consumer's own credentials, never a
client's: its own API key, its own request id, and (with a KV secret) a
proof that the request comes from a consumer (``request_proof``). Nothing
the client chose that names the request (its ``request_id``, its headers)
reaches a producer: an id the producer cannot fit in a lease must not pin
its KV.
"""

from __future__ import annotations

import asyncio
import copy
import json
import time
import uuid
from typing import Any, NamedTuple

import aiohttp

from pdserve import metrics
from pdserve.consumer.attempt_timeout import CallTimes, attempt_timeout
from pdserve.consumer.client_body import KV_PARAMS_KEY, off_loop
from pdserve.consumer.prefill_demand import demand_of
from pdserve.consumer.producer_pool import Producer, ProducerPool
from pdserve.lease import DO_REMOTE_DECODE, REFUSED_KEY, Lease, node_key
from pdserve.log import init_logger
from pdserve.request_proof import PROOF_HEADER, body_digest, make_proof, proof_key
from pdserve.settings import Settings, kv_secret

logger = init_logger(__name__)

# A producer that will not lease this request (past its cap of leased
# blocks, inputs its fingerprint does not cover) answers 200 with
# kv_transfer_params {REFUSED_KEY: reason}: the request is prefilled here at
# once, no failover, the producer stays up. Reasons counted as
# local_prefills{reason="producer_<reason>"}; any other is
# "producer_refused", so a producer cannot grow the label set.
KNOWN_REFUSALS = frozenset(
    {"lease_cap", "multimodal", "prompt_embeds", "no_token_ids", "unleasable"}
)
# kv_transfer_params key under which vLLM (0.26+) takes a chat's prompt
# already rendered: its handler then skips templating and tokenization.
PROMPT_IDS_KEY = "prompt_token_ids"
# Reasons that describe a state (no producer at all) rather than a
# request: logged once when they start, not for every request.
STATE_REASONS = frozenset({"no_producer", "producer_down"})


def local_reason(path: str, payload: Any) -> str | None:
    """Why this request must be prefilled locally, or None if it can go remote."""
    if not isinstance(payload, dict):
        return "malformed"
    if payload.get("n", 1) != 1 or payload.get("best_of") not in (None, 1):
        return "multiple_choices"
    # Beam search prefills its own beams: a producer's lease would go unused.
    if payload.get("use_beam_search") not in (None, False):
        return "beam_search"
    if payload.get("prompt_logprobs") is not None or (
        path.endswith("/completions") and payload.get("echo")
    ):
        return "prompt_logprobs"
    prompt = payload.get("prompt")
    if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int):
        if len(prompt) != 1:
            return "batched_prompts"
    # Inputs a lease's fingerprint does not cover (the producer would fetch
    # and process them itself): never KV of other inputs on this node.
    if payload.get("prompt_embeds") is not None:
        return "prompt_embeds"
    if multimodal(payload):
        return "multimodal"
    return None


def multimodal(payload: dict[str, Any]) -> bool:
    """Whether a request carries images, audio or video (or other parts
    than text): their KV depends on more than token ids."""
    if payload.get("multi_modal_data"):
        return True
    messages = payload.get("messages")
    if isinstance(messages, list):
        for message in messages:
            content = message.get("content") if isinstance(message, dict) else None
            if isinstance(content, list) and any(
                not isinstance(part, dict) or part.get("type") not in (None, "text")
                for part in content
            ):
                return True
    return False


def prefill_body(
    path: str, payload: dict[str, Any], prompt_ids: list[int] | None = None
) -> dict[str, Any]:
    """What a producer is asked: the client's request, one token, no
    stream; ``prompt_ids``: a chat's prompt as this node rendered it (the
    producer's vLLM then skips its own rendering)."""
    body = copy.deepcopy(payload)
    # The producer's token is the request's first: sampled under the
    # client's own rules (min_tokens 1 keeps EOS out of it if asked).
    min_tokens = payload.get("min_tokens")
    first_min = min(min_tokens, 1) if isinstance(min_tokens, int) else 0
    body.update(max_tokens=1, min_tokens=max(first_min, 0), stream=False, n=1)
    if path.endswith("/chat/completions"):
        body["max_completion_tokens"] = 1
    body.pop("stream_options", None)
    # The client's id: the producer's request id is this consumer's own.
    body.pop("request_id", None)
    body[KV_PARAMS_KEY] = {DO_REMOTE_DECODE: True}
    if prompt_ids is not None and path.endswith("/chat/completions"):
        body[KV_PARAMS_KEY][PROMPT_IDS_KEY] = list(prompt_ids)
    return body


def prefill_bytes(
    path: str, payload: dict[str, Any], prompt_ids: list[int] | None = None
) -> tuple[bytes, str]:
    """The exact bytes sent to producers, and their SHA-256 (for the proof)."""
    data = json.dumps(prefill_body(path, payload, prompt_ids)).encode()
    return data, body_digest(data)


def refusal_reason(value: Any) -> str:
    """The local_prefills reason of a producer's refusal (bounded labels)."""
    if isinstance(value, str) and value in KNOWN_REFUSALS:
        return f"producer_{value}"
    return "producer_refused"


class Answer(NamedTuple):
    """The producers' answer for one request: a lease signed by this node,
    or why there is none (the request is prefilled locally, counted)."""

    lease: Lease | None
    reason: str = ""
    # The call that gave the lease (for placement's cost model).
    seconds: float = 0.0


class Failure(NamedTuple):
    """Why one producer gave no lease, and whose fault that was."""

    reason: str
    # The producer's (timeout, unreachable, 5xx): mark it down, try the next.
    # Otherwise the request's (4xx, no lease) or a refusal: prefill locally at
    # once.
    producer_fault: bool


class RemotePrefill:
    """Asks the producers chosen by a ``ProducerPool``, in its order."""

    def __init__(self, settings: Settings, pool: ProducerPool | None = None) -> None:
        self.settings = settings
        self.pool = ProducerPool(settings) if pool is None else pool
        # Read once: a consumer started without pdserve's entrypoint has no
        # key and must fail at startup, not on its first request.
        self._key = node_key()
        secret = kv_secret()
        self._proof_key = proof_key(secret) if secret is not None else None
        self.calls = CallTimes()
        self._last_fallback: str | None = None
        # Leases from an instance this node never paired with (released by
        # the HTTP layer, which reaches the engine).
        self.stray_leases: list[Lease] = []

    async def close(self) -> None:
        await self.pool.close()

    async def producers_saturated(self, api_key: str | None = None) -> bool:
        """Whether every healthy producer is saturated (placement may then
        prefill here); ``api_key`` as for ``ask``."""
        await self.pool.ready(api_key)
        return self.pool.saturated()

    async def ask(
        self,
        path: str,
        payload: dict[str, Any],
        prompt_tokens: int | None = None,
        api_key: str | None = None,
        size: int = 0,
        prompt_ids: list[int] | None = None,
        started_at: float = 0.0,
    ) -> Answer:
        """The producers' answer: a lease signed by this node, or why not.

        ``api_key``: this node's own key, which producers are called with;
        ``size``: the client body's size (a large one is encoded off the
        event loop); ``prompt_ids``: the prompt as this node rendered it;
        ``started_at``: when (wall clock) the request reached this node."""
        await self.pool.ready(api_key)
        demand = demand_of(payload, prompt_tokens)
        candidates = self.pool.order(demand)
        if not candidates:
            known = bool(self.pool.producers())
            return self._fallback("producer_down" if known else "no_producer")
        data, digest = await off_loop(size, prefill_bytes, path, payload, prompt_ids)
        if started_at:
            metrics.TTFT_HTTP_IN.observe(max(0.0, time.time() - started_at))
        # One budget for all attempts: failover must not multiply the wait.
        budget = self.settings.prefill_timeout
        deadline = time.monotonic() + budget
        for index, producer in enumerate(candidates):
            if producer.health.down:
                continue  # another request found it down meanwhile
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            left = 1 + sum(not p.health.down for p in candidates[index + 1 :])
            # Work the producer does before answering: ours and what this
            # consumer already queued there.
            work = demand.work + producer.outstanding_work
            timeout = attempt_timeout(remaining, left, budget, self.calls.bound(work))
            asked = time.perf_counter()
            with self.pool.sending(producer, demand):
                outcome = await self._ask(producer, path, data, digest, timeout)
            if (
                isinstance(outcome, Lease)
                and outcome.instance_id != producer.instance_id
            ):
                # Another instance answered at this address: it restarted, or
                # the address is load-balanced over several (never paired).
                self.pool.instance_changed(producer, outcome.instance_id)
                self.stray_leases.append(outcome.signed(self._key, producer.address))
                outcome = Failure("instance_changed", False)
            if isinstance(outcome, Lease):
                seconds = time.perf_counter() - asked
                self.calls.add(seconds, work)
                if self.pool.has(producer):  # a gone one's series stays gone
                    observe(producer, outcome, seconds)
                self._last_fallback = None
                lease = outcome.signed(self._key, kv_host=producer.address)
                return Answer(lease, "", seconds)
            if outcome.reason == "instance_changed":
                continue  # the next producer, if any
            if not outcome.producer_fault:
                return self._fallback(outcome.reason)
            logger.warning("Producer %s failed: %s", producer.key, outcome.reason)
            metrics.PRODUCER_FAILOVERS.labels(reason=outcome.reason).inc()
            self.pool.mark_down(producer, hung=outcome.reason == "timeout")
        return self._fallback("all_producers_failed")

    def _headers(self, path: str, digest: str) -> dict[str, str]:
        """This node's own: its key, a request id of its own, its proof."""
        headers = self.pool.headers
        headers["Content-Type"] = "application/json"
        headers["X-Request-Id"] = f"pdserve-{uuid.uuid4().hex}"
        if self._proof_key is not None:
            headers[PROOF_HEADER] = make_proof(self._proof_key, "POST", path, digest)
        return headers

    async def _ask(
        self,
        producer: Producer,
        path: str,
        data: bytes,
        digest: str,
        timeout: float,
    ) -> Lease | Failure:
        try:
            async with self.pool.session.post(
                producer.url + path,
                data=data,
                headers=self._headers(path, digest) | producer.endpoint.headers(),
                timeout=aiohttp.ClientTimeout(total=timeout),
                # This node's key goes to this producer only.
                allow_redirects=False,
            ) as response:
                if response.status >= 500:
                    return Failure("http_5xx", True)
                if response.status != 200:
                    # Bounded labels: the class of status, not the code.
                    return Failure(f"producer_http_{response.status // 100}xx", False)
                answer = await response.json()
        except asyncio.TimeoutError:
            return Failure("timeout", True)
        except (aiohttp.ClientError, OSError):
            return Failure("unreachable", True)
        except ValueError:
            return Failure("bad_answer", True)
        params = answer.get(KV_PARAMS_KEY) if isinstance(answer, dict) else None
        if isinstance(params, dict) and REFUSED_KEY in params:
            return Failure(refusal_reason(params[REFUSED_KEY]), False)
        lease = Lease.from_params(params)
        if lease is None:
            return Failure("producer_gave_no_kv", False)
        return lease

    def _fallback(self, reason: str) -> Answer:
        if reason not in STATE_REASONS or reason != self._last_fallback:
            logger.warning("Prefilling locally: %s", reason)
        self._last_fallback = reason
        metrics.LOCAL_PREFILLS.labels(reason=reason).inc()
        return Answer(None, reason)


def observe(producer: Producer, lease: Lease, seconds: float) -> None:
    """Metrics of one remote prefill that gave a lease: the call's hops.
    The way back is timed from the producer's wall clock (the same host's,
    or NTP-close: clamped at 0); the call out is what is left."""
    metrics.REMOTE_PREFILLS.labels(producer=producer.key).inc()
    metrics.REMOTE_PREFILL_SECONDS.observe(seconds)
    back = max(0.0, time.time() - lease.issued_at) if lease.issued_at else 0.0
    back = min(back, seconds)
    engine = lease.producer_queue_seconds + lease.producer_prefill_seconds
    metrics.TTFT_PRODUCER_CALL.observe(max(0.0, seconds - engine - back))
    metrics.TTFT_PRODUCER_QUEUE.observe(lease.producer_queue_seconds)
    metrics.TTFT_PRODUCER_PREFILL.observe(lease.producer_prefill_seconds)
    metrics.TTFT_ANSWER_BACK.observe(back)


async def release_lease(engine_client: Any, lease: Lease, reason: str) -> None:
    """Hand a lease the engine will not otherwise see (request rejected,
    client gone) to the engine, whose connector releases it on the producer.

    vLLM submits it as a request aborted on arrival, so the connector's
    request_finished runs; releasing a lease twice is harmless there."""
    notify = getattr(engine_client, "notify_kv_transfer_request_rejected", None)
    if notify is None:
        logger.warning(
            "This vLLM cannot hand back a lease (%s); it expires on the producer",
            reason,
        )
        return
    request_id = f"pdserve-release-{uuid.uuid4().hex}"
    try:
        await notify(request_id, lease.to_params())
    except Exception as exc:  # engine dead or shutting down: the lease expires
        logger.warning("Handing back a lease (%s) failed: %r", reason, exc)
        return
    metrics.LEASES_RELEASED.labels(reason=reason).inc()
