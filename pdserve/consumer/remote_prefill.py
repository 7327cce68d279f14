"""Ask the producer to prefill a request and keep its KV for us.

The producer receives the user's own request body with ``max_tokens=1`` and
``do_remote_decode``, so it tokenizes exactly as the consumer will; the lease
it returns carries a fingerprint of those tokens, checked in the engine.
The lease is parsed here once, signed with this node's key (the engine acts
only on signed leases) and, if the engine will never see it, handed to the
engine to release: the HTTP layer never talks to the KV side channel.
"""

from __future__ import annotations

import asyncio
import copy
import time
import uuid
from typing import Any

import aiohttp

from pdserve import metrics
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
    body.update(max_tokens=1, min_tokens=0, stream=False, n=1)
    if path.endswith("/chat/completions"):
        body["max_completion_tokens"] = 1
    body.pop("stream_options", None)
    body["kv_transfer_params"] = {DO_REMOTE_DECODE: True}
    return body


class RemotePrefill:
    def __init__(self, settings: Settings) -> None:
        assert settings.producer_url is not None
        self.settings = settings
        self.url = settings.producer_url.rstrip("/")
        self._session: aiohttp.ClientSession | None = None
        self.health = ProducerHealth(self.url)
        # Read once: a consumer started without pdserve's entrypoint has no
        # key and must fail at startup, not on its first request.
        self._key = node_key()

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    def _client_session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            timeout = aiohttp.ClientTimeout(total=self.settings.prefill_timeout)
            self._session = aiohttp.ClientSession(timeout=timeout)
        return self._session

    async def request_lease(
        self, path: str, payload: dict[str, Any], headers: dict[str, str]
    ) -> Lease | None:
        """The producer's lease signed by this node, or None to prefill locally."""
        if self.health.down:
            return self._fallback("producer_down")
        forwarded = {k: v for k, v in headers.items() if k in FORWARDED_HEADERS}
        start = time.perf_counter()
        try:
            async with self._client_session().post(
                self.url + path, json=prefill_body(path, payload), headers=forwarded
            ) as response:
                if response.status != 200:
                    if response.status >= 500:
                        self.health.mark_down(self._client_session())
                    return self._fallback(f"producer_http_{response.status}")
                answer = await response.json()
        except asyncio.TimeoutError:
            self.health.mark_down(self._client_session())
            return self._fallback("producer_timeout")
        except (aiohttp.ClientError, ValueError, OSError):
            self.health.mark_down(self._client_session())
            return self._fallback("producer_unreachable")
        params = answer.get("kv_transfer_params") if isinstance(answer, dict) else None
        lease = Lease.from_params(params)
        if lease is None:
            return self._fallback("producer_gave_no_kv")
        metrics.REMOTE_PREFILLS.inc()
        seconds = time.perf_counter() - start
        metrics.REMOTE_PREFILL_SECONDS.observe(seconds)
        engine = lease.producer_queue_seconds + lease.producer_prefill_seconds
        metrics.TTFT_PRODUCER_CALL.observe(max(0.0, seconds - engine))
        metrics.TTFT_PRODUCER_QUEUE.observe(lease.producer_queue_seconds)
        metrics.TTFT_PRODUCER_PREFILL.observe(lease.producer_prefill_seconds)
        return lease.signed(self._key)

    @staticmethod
    def _fallback(reason: str) -> None:
        logger.warning("Prefilling locally: %s", reason)
        metrics.LOCAL_PREFILLS.labels(reason=reason).inc()
        return None


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


class ProducerHealth:
    """After a failure, requests skip the producer (prefilling locally at
    once) until a background probe of its /health succeeds again."""

    PROBE_SECONDS = 2.0

    def __init__(self, url: str) -> None:
        self.url = url
        self.down = False
        self._probe: asyncio.Task | None = None

    def mark_down(self, session: aiohttp.ClientSession) -> None:
        if not self.down:
            logger.warning("Producer %s is down; prefilling locally", self.url)
        self.down = True
        if self._probe is None or self._probe.done():
            self._probe = asyncio.get_running_loop().create_task(self._wait_up(session))

    async def _wait_up(self, session: aiohttp.ClientSession) -> None:
        timeout = aiohttp.ClientTimeout(total=self.PROBE_SECONDS)
        while True:
            await asyncio.sleep(self.PROBE_SECONDS)
            try:
                async with session.get(self.url + "/health", timeout=timeout) as r:
                    if r.status == 200:
                        break
            except (aiohttp.ClientError, asyncio.TimeoutError, OSError):
                continue
        logger.info("Producer %s is back; prefilling there again", self.url)
        self.down = False
