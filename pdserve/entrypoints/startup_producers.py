"""The consumer's producers at startup, before any engine starts.

Every ``--producer-url`` is resolved and every address asked for its
metadata, all at once. The consumer starts as soon as one round finds at
least one compatible producer; addresses not up yet join later (the HTTP
layer's ``ProducerPool`` follows the names). When none answered within
``--producer-connect-timeout`` it starts all the same, without producers: a
producer outage must not keep a consumer from serving (it prefills locally
until producers join). Any incompatible producer —
another model, another pdserve or vLLM version, a KV secret that does not
match — stops the consumer, even if others are fine: that is a deployment
error, better seen at once than as a producer the consumer quietly ignores.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from typing import NamedTuple

from pdserve import handshake
from pdserve.consumer.producer_metadata import ProducerMetadata, checked, own_metadata
from pdserve.consumer.producer_source import Endpoint, ProducerSource
from pdserve.handshake import IncompatibleProducer
from pdserve.log import init_logger
from pdserve.settings import Settings
from pdserve.timing import HANDSHAKE_RETRY_SECONDS, STARTUP_FETCH_SECONDS

logger = init_logger(__name__)

# Parallel requests at most (a headless Service may list many pods).
MAX_PARALLEL = 32


class Found(NamedTuple):
    endpoint: Endpoint
    metadata: ProducerMetadata


def find_producers(settings: Settings, headers: dict[str, str]) -> list[Found]:
    """Every producer reachable and compatible now, once there is one; none
    when none answered within ``settings.connect_timeout``.

    Raises IncompatibleProducer on any incompatible one."""
    mine = own_metadata(settings)
    sources = [ProducerSource(url) for url in settings.producer_urls]
    deadline = time.monotonic() + settings.connect_timeout
    logged = False
    while True:
        remaining = max(deadline - time.monotonic(), 0.1)
        timeout = min(STARTUP_FETCH_SECONDS, remaining)
        found, last_error = one_round(sources, mine, headers, timeout)
        if found:
            return found
        if time.monotonic() >= deadline:
            logger.warning(
                "No producer (%s) reachable within %.0fs (%s): starting "
                "without one; prompts are prefilled locally until a producer "
                "joins (looked for every few seconds)",
                ", ".join(settings.producer_urls),
                settings.connect_timeout,
                last_error,
            )
            return []
        if not logged:
            logger.info("Waiting for producers (%s)", last_error)
            logged = True
        time.sleep(HANDSHAKE_RETRY_SECONDS)


def one_round(
    sources: list[ProducerSource],
    mine: dict,
    headers: dict[str, str],
    timeout: float,
) -> tuple[list[Found], Exception | None]:
    endpoints: list[Endpoint] = []
    last_error: Exception | None = None
    for source in sources:
        try:
            endpoints += source.endpoints(source.resolve_blocking())
        except OSError as exc:
            last_error = OSError(f"cannot resolve {source.url}: {exc}")

    def fetch(endpoint: Endpoint) -> dict | Exception:
        try:
            return handshake.fetch_metadata_once(
                endpoint.base_url, timeout, headers | endpoint.headers()
            )
        except (OSError, ValueError) as exc:
            return exc

    with ThreadPoolExecutor(max(1, min(MAX_PARALLEL, len(endpoints)))) as pool:
        answers = list(pool.map(fetch, endpoints))
    found = []
    for endpoint, answer in zip(endpoints, answers, strict=True):
        if isinstance(answer, Exception):
            last_error = OSError(f"producer {endpoint.key}: {answer}")
            continue
        try:
            found.append(Found(endpoint, checked(mine, answer)))
        except IncompatibleProducer as exc:
            raise IncompatibleProducer(f"producer {endpoint.key}: {exc}") from exc
    return found, last_error
