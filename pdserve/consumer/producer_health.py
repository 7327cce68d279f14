"""Whether one producer may be sent requests."""

from __future__ import annotations

import asyncio

import aiohttp

from pdserve.consumer.producer_source import Endpoint
from pdserve.log import init_logger

logger = init_logger(__name__)


class ProducerHealth:
    """After a failure, requests skip the producer until a background probe
    of its /health succeeds again: a dead producer costs one request its
    failover, not every request a timeout."""

    # A recovered producer is used again within about two of these; each
    # probe is bounded by it too, so a hung producer never holds a probe.
    PROBE_SECONDS = 2.0

    def __init__(self, endpoint: Endpoint) -> None:
        self.endpoint = endpoint
        self.down = False
        self._probe: asyncio.Task | None = None
        self._closed = False

    def mark_down(self, session: aiohttp.ClientSession) -> None:
        if not self.down:
            logger.warning("Producer %s is down", self.endpoint.key)
        self.down = True
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
        timeout = aiohttp.ClientTimeout(total=self.PROBE_SECONDS)
        url = self.endpoint.base_url + "/health"
        while True:
            await asyncio.sleep(self.PROBE_SECONDS)
            try:
                async with session.get(
                    url, headers=self.endpoint.headers(), timeout=timeout
                ) as r:
                    if r.status == 200:
                        break
            except (aiohttp.ClientError, asyncio.TimeoutError, OSError):
                continue
        logger.info("Producer %s is back", self.endpoint.key)
        self.down = False
