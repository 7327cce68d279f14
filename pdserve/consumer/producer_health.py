"""Whether one producer may be sent requests."""

from __future__ import annotations

import asyncio
import uuid

import aiohttp

from pdserve.consumer.producer_source import Endpoint
from pdserve.log import init_logger
from pdserve.timing import HEALTH_PROBE_SECONDS, WORK_PROBE_SECONDS

logger = init_logger(__name__)

# A hung producer's probe: the smallest real completion (no lease asked).
WORK_PROBE_PATH = "/v1/completions"
WORK_PROBE_BODY = {"prompt": "ping", "max_tokens": 1, "temperature": 0}


class ProducerHealth:
    """After a failure, requests skip the producer until a background probe
    succeeds: a dead producer costs one request its failover, not every
    request a timeout.

    The probe depends on the failure. A producer that refused or failed a
    request (unreachable, 5xx) is back once its ``/health`` answers. One
    that timed out is *hung*: vLLM answers ``/health`` while its engine is
    stuck, so it is back only once it answers real work again, a one-token
    completion sent with this consumer's own credentials."""

    def __init__(self, endpoint: Endpoint) -> None:
        self.endpoint = endpoint
        self.down = False
        self.hung = False
        self._headers: dict[str, str] = {}
        self._probe: asyncio.Task | None = None
        self._closed = False

    def mark_down(
        self,
        session: aiohttp.ClientSession,
        headers: dict[str, str] | None = None,
        hung: bool = False,
    ) -> None:
        """``headers``: this consumer's own (its API key), for work probes."""
        if not self.down or (hung and not self.hung):
            what = "hung (timed out)" if hung else "down"
            logger.warning("Producer %s is %s", self.endpoint.key, what)
        self.down = True
        self.hung = self.hung or hung
        self._headers = dict(headers or {})
        if self._closed:
            return  # it left the pool: a request in flight failed there
        if self._probe is None or self._probe.done():
            self._probe = asyncio.get_running_loop().create_task(self._wait_up(session))

    def close(self) -> None:
        """Stop probing (the producer left the pool, or the pool closes)."""
        self._closed = True
        if self._probe is not None:
            self._probe.cancel()

    async def _wait_up(self, session: aiohttp.ClientSession) -> None:
        while True:
            await asyncio.sleep(HEALTH_PROBE_SECONDS)
            # Read each round: a producer may be found hung while probed.
            probe = self._answers_work if self.hung else self._answers_health
            try:
                if await probe(session):
                    break
            except (aiohttp.ClientError, asyncio.TimeoutError, OSError):
                continue
        logger.info("Producer %s is back", self.endpoint.key)
        self.down = self.hung = False

    async def _answers_health(self, session: aiohttp.ClientSession) -> bool:
        async with session.get(
            self.endpoint.base_url + "/health",
            headers=self.endpoint.headers(),
            timeout=aiohttp.ClientTimeout(total=HEALTH_PROBE_SECONDS),
        ) as response:
            return response.status == 200

    async def _answers_work(self, session: aiohttp.ClientSession) -> bool:
        headers = self._headers | self.endpoint.headers()
        headers["X-Request-Id"] = f"pdserve-probe-{uuid.uuid4().hex}"
        async with session.post(
            self.endpoint.base_url + WORK_PROBE_PATH,
            json=WORK_PROBE_BODY,
            headers=headers,
            timeout=aiohttp.ClientTimeout(total=WORK_PROBE_SECONDS),
            allow_redirects=False,
        ) as response:
            return response.status == 200
