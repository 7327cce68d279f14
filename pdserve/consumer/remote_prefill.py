"""Ask a producer to prefill a request and keep its KV for us.

The producer receives the user's own request body with ``max_tokens=1`` and
``do_remote_decode``, so it tokenizes exactly as the consumer will; the lease
it returns carries a fingerprint of those tokens, checked in the engine.
The lease is parsed here once, signed with this node's key and the address
of the producer that issued it (the engine acts only on signed leases, and
reads their KV there) and, if the engine will never see it, handed to the
engine to release: the HTTP layer never talks to the KV side channel.
"""

from __future__ import annotations

import asyncio
import copy
import time
import uuid
from typing import Any, NamedTuple

import aiohttp

from pdserve import metrics
from pdserve.consumer.prefill_demand import demand_of
from pdserve.consumer.producer_pool import Producer, ProducerPool
from pdserve.lease import DO_REMOTE_DECODE, Lease, node_key
from pdserve.log import init_logger
from pdserve.settings import Settings

logger = init_logger(__name__)

FORWARDED_HEADERS = ("authorization", "x-request-id")


def local_reason(path: str, payload: Any) -> str | None:
    """Why this request must be prefilled locally, or None if it can go remote."""
    if not isinstance(payload, dict):
        return "malformed"
    if payload.get("n", 1) != 1 or payload.get("best_of") not in (None, 1):
        return "multiple_choices"
    if payload.get("prompt_logprobs") is not None or (
        path.endswith("/completions") and payload.get("echo")
    ):
        return "prompt_logprobs"
    prompt = payload.get("prompt")
    if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int):
        if len(prompt) != 1:
            return "batched_prompts"
    return None


def prefill_body(path: str, payload: dict[str, Any]) -> dict[str, Any]:
    body = copy.deepcopy(payload)
    # The producer's token is the request's first: sampled under the
    # client's own rules (min_tokens 1 keeps EOS out of it if asked).
    min_tokens = payload.get("min_tokens")
    first_min = min(min_tokens, 1) if isinstance(min_tokens, int) else 0
    body.update(max_tokens=1, min_tokens=max(first_min, 0), stream=False, n=1)
    if path.endswith("/chat/completions"):
        body["max_completion_tokens"] = 1
    body.pop("stream_options", None)
    body["kv_transfer_params"] = {DO_REMOTE_DECODE: True}
    return body


class Failure(NamedTuple):
    """Why one producer gave no lease, and whose fault that was."""

    reason: str
    # The producer's (timeout, unreachable, 5xx): mark it down, try the next.
    # Otherwise the request's (4xx, no lease): prefill locally at once.
    producer_fault: bool


class RemotePrefill:
    """Asks the producers chosen by a ``ProducerPool``, in its order."""

    def __init__(self, settings: Settings, pool: ProducerPool | None = None) -> None:
        self.settings = settings
        self.pool = ProducerPool(settings) if pool is None else pool
        # Read once: a consumer started without pdserve's entrypoint has no
        # key and must fail at startup, not on its first request.
        self._key = node_key()

    async def close(self) -> None:
        await self.pool.close()

    async def producers_saturated(self, api_key: str | None = None) -> bool:
        """Whether every healthy producer is saturated (placement may then
        prefill here); ``api_key`` as for ``request_lease``."""
        await self.pool.ready(api_key)
        return self.pool.saturated()

    async def request_lease(
        self,
        path: str,
        payload: dict[str, Any],
        headers: dict[str, str],
        prompt_tokens: int | None = None,
        api_key: str | None = None,
    ) -> Lease | None:
        """A producer's lease signed by this node, or None to prefill locally.

        ``api_key``: this node's key, for the metadata of producers that join."""
        await self.pool.ready(api_key)
        demand = demand_of(payload, prompt_tokens)
        candidates = self.pool.order(demand)
        if not candidates:
            known = bool(self.pool.producers())
            return self._fallback("producer_down" if known else "no_producer")
        forwarded = {k: v for k, v in headers.items() if k in FORWARDED_HEADERS}
        body = prefill_body(path, payload)
        # One budget for all attempts: failover must not multiply the wait.
        deadline = time.monotonic() + self.settings.prefill_timeout
        for producer in candidates:
            if producer.health.down:
                continue  # another request found it down meanwhile
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            asked = time.perf_counter()
            with self.pool.sending(producer, demand):
                outcome = await self._ask(producer, path, body, forwarded, remaining)
            if isinstance(outcome, Lease):
                if self.pool.has(producer):  # a gone one's series stays gone
                    observe(producer, outcome, time.perf_counter() - asked)
                return outcome.signed(self._key, kv_host=producer.address)
            if not outcome.producer_fault:
                return self._fallback(outcome.reason)
            logger.warning("Producer %s failed: %s", producer.key, outcome.reason)
            metrics.PRODUCER_FAILOVERS.labels(reason=outcome.reason).inc()
            self.pool.mark_down(producer)
        return self._fallback("all_producers_failed")

    async def _ask(
        self,
        producer: Producer,
        path: str,
        body: dict[str, Any],
        headers: dict[str, str],
        timeout: float,
    ) -> Lease | Failure:
        try:
            async with self.pool.session.post(
                producer.url + path,
                json=body,
                headers=headers | producer.endpoint.headers(),
                timeout=aiohttp.ClientTimeout(total=timeout),
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
        params = answer.get("kv_transfer_params") if isinstance(answer, dict) else None
        lease = Lease.from_params(params)
        if lease is None:
            return Failure("producer_gave_no_kv", False)
        return lease

    @staticmethod
    def _fallback(reason: str) -> None:
        logger.warning("Prefilling locally: %s", reason)
        metrics.LOCAL_PREFILLS.labels(reason=reason).inc()
        return None


def observe(producer: Producer, lease: Lease, seconds: float) -> None:
    """Metrics of one remote prefill that gave a lease."""
    metrics.REMOTE_PREFILLS.labels(producer=producer.key).inc()
    metrics.REMOTE_PREFILL_SECONDS.observe(seconds)
    engine = lease.producer_queue_seconds + lease.producer_prefill_seconds
    metrics.TTFT_PRODUCER_CALL.observe(max(0.0, seconds - engine))
    metrics.TTFT_PRODUCER_QUEUE.observe(lease.producer_queue_seconds)
    metrics.TTFT_PRODUCER_PREFILL.observe(lease.producer_prefill_seconds)


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
