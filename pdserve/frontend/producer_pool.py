"""The producers a consumer may send prefills to, and which one a request
goes to.

Producers come from ``--producer-url`` (see ``producer_source``): every
``RESOLVE_SECONDS`` each URL's name is resolved again, so producers join and
leave while the consumer runs. A new address serves nothing until its
``/pdserve/metadata`` was fetched and found compatible; an incompatible one
is logged and never used (while it keeps its address).

A request goes to the producer its prompt prefix hashes to (rendezvous
hashing over the healthy producers: requests sharing a prefix meet that
producer's prefix cache, and only ~1/N of prefixes move when a producer
joins or leaves), unless that producer is much busier than the least busy
one; failover goes down the same ranking.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import aiohttp

from pdserve import metrics
from pdserve.frontend import producer_metadata
from pdserve.frontend.prefill_demand import Demand
from pdserve.frontend.producer_health import ProducerHealth
from pdserve.frontend.producer_metadata import ProducerMetadata, own_metadata
from pdserve.frontend.producer_source import Endpoint, ProducerSource
from pdserve.incompatible import IncompatibleProducer
from pdserve.log import init_logger
from pdserve.pairings import NodePairings, PairingTarget, write_targets
from pdserve.settings import Settings
from pdserve.timing import (
    INSTANCE_MEMORY_SECONDS,
    METADATA_TIMEOUT_SECONDS,
    PRODUCER_KEEPALIVE_SECONDS,
    RESOLVE_SECONDS,
    RESOLVE_TIMEOUT_SECONDS,
)

logger = init_logger(__name__)

# Affinity yields to load: a request leaves the producer its prefix hashes
# to when that one's outstanding prefill work (estimated prompt tokens)
# exceeds AFFINITY_LOAD_FACTOR x the least busy producer's plus
# AFFINITY_SLACK_TOKENS. Below that a prefix-cache hit saves more than the
# extra queueing costs; the slack, about one long prompt, keeps a few short
# requests from breaking affinity on an otherwise idle pool.
AFFINITY_LOAD_FACTOR = 2.0
AFFINITY_SLACK_TOKENS = 4096.0


@dataclass(eq=False)
class Producer:
    endpoint: Endpoint
    metadata: ProducerMetadata
    health: ProducerHealth
    outstanding_requests: int = 0
    outstanding_work: float = 0.0

    @property
    def key(self) -> str:
        return self.endpoint.key

    @property
    def url(self) -> str:
        return self.endpoint.base_url

    @property
    def address(self) -> str:
        return self.endpoint.address

    @property
    def kv_ports(self) -> list[int]:
        return self.metadata.kv_ports

    @property
    def instance_id(self) -> str:
        return self.metadata.instance_id

    def describe(self) -> dict[str, Any]:
        return {
            "producer": self.key,
            "instance_id": self.instance_id,
            "kv_ports": self.kv_ports,
            "down": self.health.down,
            "hung": self.health.hung,
            "outstanding_requests": self.outstanding_requests,
            "outstanding_work": self.outstanding_work,
        }


class ProducerPool:
    def __init__(self, settings: Settings) -> None:
        self.sources = [ProducerSource(url) for url in settings.producer_urls]
        self.saturation_requests = settings.producer_saturation_requests
        self._mine = own_metadata(settings)
        self._producers: dict[str, Producer] = {}
        # Endpoints last found per source: kept while its name fails to resolve.
        self._found: list[dict[str, Endpoint]] = [{} for _ in self.sources]
        self._incompatible: set[str] = set()
        self._unreachable_logged: set[str] = set()
        self._headers: dict[str, str] = {}
        self._session: aiohttp.ClientSession | None = None
        self._refresher: asyncio.Task | None = None
        self._first_refresh = asyncio.Event()
        # Which instances each address served, lately: one seen again after
        # another means answers come from several (a load-balanced URL).
        self._instances_seen: dict[str, dict[str, float]] = {}
        self._soon: set[asyncio.Task] = set()
        # Every engine rank of this node publishes what it paired with; a
        # producer is sent work only once all have (files in the run dir).
        self._run_dir = settings.run_dir
        self._pairings = (
            NodePairings(settings.run_dir, settings.tensor_parallel_size)
            if settings.run_dir
            else None
        )

    # ---- lifecycle ----

    @property
    def session(self) -> aiohttp.ClientSession:
        """The session every call to a producer goes through."""
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(
                    keepalive_timeout=PRODUCER_KEEPALIVE_SECONDS
                )
            )
        return self._session

    def start(self, api_key: str | None = None) -> None:
        """Start following the producers (once, on vLLM's event loop: at
        its startup, or on the first request). ``api_key``: this node's own
        key, the one it calls producers with."""
        self._headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        if self._refresher is None:
            self._refresher = asyncio.get_running_loop().create_task(self._follow())

    @property
    def headers(self) -> dict[str, str]:
        """What every call to a producer carries: this node's credentials."""
        return dict(self._headers)

    async def ready(self, api_key: str | None = None) -> None:
        """``start``; then wait, bounded, until the producers were looked up
        once."""
        self.start(api_key)
        if not self._first_refresh.is_set():
            bound = RESOLVE_TIMEOUT_SECONDS + METADATA_TIMEOUT_SECONDS
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._first_refresh.wait(), bound)

    async def close(self) -> None:
        if self._refresher is not None:
            self._refresher.cancel()
        for producer in self._producers.values():
            producer.health.close()
        if self._session is not None:
            await self._session.close()

    async def _follow(self) -> None:
        while True:
            try:
                await self.refresh()
            except Exception:  # never let one bad round end the following
                logger.exception("Looking up producers failed")
            self._first_refresh.set()
            await asyncio.sleep(RESOLVE_SECONDS)

    # ---- membership ----

    async def refresh(self) -> None:
        """Resolve every URL once; admit new producers, drop gone ones."""
        for index, source in enumerate(self.sources):
            addresses = await self._resolve(source)
            if addresses is not None:
                endpoints = source.endpoints(addresses)
                self._found[index] = {e.key: e for e in endpoints}
        found = {k: e for by_source in self._found for k, e in by_source.items()}
        for key in set(self._producers) - set(found):
            self._drop(key)
        # An address that left and comes back (a new pod) is checked anew.
        self._incompatible &= set(found)
        self._unreachable_logged &= set(found)
        new = [
            e
            for k, e in found.items()
            if k not in self._producers and k not in self._incompatible
        ]
        await asyncio.gather(*(self._admit(e) for e in new))

    async def _resolve(self, source: ProducerSource) -> list[str] | None:
        try:
            return await asyncio.wait_for(source.resolve(), RESOLVE_TIMEOUT_SECONDS)
        except (OSError, asyncio.TimeoutError) as exc:
            # Keep what was found: a DNS hiccup must not empty the pool.
            logger.warning("Cannot resolve %s: %r", source.url, exc)
            return None

    async def _admit(self, endpoint: Endpoint) -> None:
        try:
            theirs = await producer_metadata.fetch(
                self.session, endpoint, self._headers, METADATA_TIMEOUT_SECONDS
            )
            metadata = producer_metadata.checked(self._mine, theirs)
        except IncompatibleProducer as exc:
            logger.error("Producer %s will not be used: %s", endpoint.key, exc)
            self._incompatible.add(endpoint.key)
            return
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError, ValueError) as exc:
            if endpoint.key not in self._unreachable_logged:
                logger.info("Producer %s not reachable yet: %r", endpoint.key, exc)
                self._unreachable_logged.add(endpoint.key)
            return
        self._unreachable_logged.discard(endpoint.key)
        twin = self._instance(metadata.instance_id)
        if twin is not None:
            # One producer under two addresses (IPv4 and IPv6, or two URLs):
            # counted twice it would get twice its share.
            logger.info("Producer %s is %s", endpoint.key, twin.key)
            self._incompatible.add(endpoint.key)
            return
        self._producers[endpoint.key] = Producer(
            endpoint, metadata, ProducerHealth(endpoint)
        )
        self._seen(endpoint.key, metadata.instance_id)
        self._publish_targets()
        logger.info(
            "Producer %s joined: instance %s, KV ports %s (used once this node's "
            "engine ranks have paired with it)",
            endpoint.key,
            metadata.instance_id,
            metadata.kv_ports,
        )

    def _instance(self, instance_id: str) -> Producer | None:
        for producer in self._producers.values():
            if producer.instance_id == instance_id:
                return producer
        return None

    def has(self, producer: Producer) -> bool:
        """Whether ``producer`` is (still) in the pool."""
        return self._producers.get(producer.key) is producer

    def _drop(self, key: str) -> None:
        producer = self._producers.pop(key)
        producer.health.close()
        # Keeps the per-producer series bounded by the producers present.
        with contextlib.suppress(KeyError):
            metrics.REMOTE_PREFILLS.remove(key)
        self._publish_targets()
        logger.info("Producer %s left", key)

    # ---- instances and pairing ----

    def _seen(self, key: str, instance_id: str) -> None:
        seen = self._instances_seen.setdefault(key, {})
        seen[instance_id] = time.monotonic()
        for old, at in list(seen.items()):
            if time.monotonic() - at > INSTANCE_MEMORY_SECONDS:
                del seen[old]

    def instance_changed(self, producer: Producer, instance_id: str) -> None:
        """``producer``'s address answered as another instance than the one
        admitted. A new one (a restart): dropped now, admitted again (and
        paired) on the next refresh. One seen before: several instances
        answer at that address; it is never used again while it has it."""
        key = producer.key
        back_again = instance_id in self._instances_seen.get(key, {})
        self._seen(key, instance_id)
        if self._producers.get(key) is producer:
            self._drop(key)
        if not back_again:
            self._refresh_soon()
        if back_again:
            logger.error(
                "Producer %s answers as several instances (%s): a load-balanced "
                "URL? List each producer by its own address (e.g. a headless "
                "Service). Not used while it has this address.",
                key,
                ", ".join(sorted(self._instances_seen[key])),
            )
            self._incompatible.add(key)
        else:
            logger.warning(
                "Producer %s is now instance %s (restarted): pairing again",
                key,
                instance_id,
            )

    def _publish_targets(self) -> None:
        """Tell this node's engine ranks whom to pair with ahead of work."""
        if not self._run_dir:
            return
        targets = [_target(p) for p in self._producers.values()]
        try:
            write_targets(self._run_dir, targets)
        except OSError as exc:
            logger.warning("pdserve: cannot publish producers to pair with: %s", exc)

    def _paired(self, producer: Producer) -> bool:
        """Whether every engine rank of this node paired with it. One that
        never will (a mismatch at rank level) is dropped, saying why; one
        whose instance is gone (a restart) is dropped and looked up again
        at once."""
        if self._pairings is None:
            return True
        state = self._pairings.state(_target(producer))
        if state.incompatible:
            logger.error("Producer %s will not be used: %s", producer.key, state.error)
            self._incompatible.add(producer.key)
            self._drop(producer.key)
        elif state.gone:
            logger.warning("Producer %s restarted (%s)", producer.key, state.error)
            self._drop(producer.key)
            self._refresh_soon()
        return state.paired

    def _refresh_soon(self) -> None:
        """Look the producers up now, not at the next round (a restarted one
        is admitted, and paired with, as soon as it answers)."""
        with contextlib.suppress(RuntimeError):  # no running loop: next round
            task = asyncio.get_running_loop().create_task(self.refresh())
            self._soon.add(task)
            task.add_done_callback(self._soon.discard)

    # ---- choosing ----

    def producers(self) -> list[Producer]:
        return list(self._producers.values())

    def healthy(self) -> list[Producer]:
        """Producers that may be sent work: up, and paired by every rank."""
        return [
            p
            for p in list(self._producers.values())
            if not p.health.down and self._paired(p)
        ]

    def order(self, demand: Demand) -> list[Producer]:
        """Healthy producers in the order this request tries them."""
        ranked = sorted(
            self.healthy(), key=lambda p: rendezvous(demand.affinity_key, p.key)
        )
        if not ranked:
            return []
        first = ranked[0]
        least = min(ranked, key=lambda p: (p.outstanding_work, p.outstanding_requests))
        limit = AFFINITY_LOAD_FACTOR * least.outstanding_work + AFFINITY_SLACK_TOKENS
        if first.outstanding_work > limit:
            first = least
        return [first, *(p for p in ranked if p is not first)]

    def saturated(self) -> bool:
        """Whether every healthy producer has more than
        ``producer_saturation_requests`` prefills outstanding: sending more
        only queues them there. None healthy is not saturated: that is a
        failure, counted as such."""
        healthy = self.healthy()
        return bool(healthy) and all(
            p.outstanding_requests > self.saturation_requests for p in healthy
        )

    @contextlib.contextmanager
    def sending(self, producer: Producer, demand: Demand) -> Iterator[None]:
        """Count a prefill as outstanding on ``producer`` while it runs."""
        producer.outstanding_requests += 1
        producer.outstanding_work += demand.work
        try:
            yield
        finally:
            producer.outstanding_requests -= 1
            producer.outstanding_work -= demand.work

    def mark_down(self, producer: Producer, hung: bool = False) -> None:
        """``hung``: it timed out, and is back only once it answers work."""
        producer.health.mark_down(self.session, self._headers, hung=hung)

    def state(self) -> dict[str, Any]:
        """For the consumer's /health: whether prompts go to producers."""
        usable = len(self.healthy())
        return {
            "producers_known": len(self._producers),
            "producers_usable": usable,
            "remote_prefill": usable > 0,
        }

    def describe(self) -> list[dict[str, Any]]:
        return [p.describe() for p in self._producers.values()]


def _target(producer: Producer) -> PairingTarget:
    return PairingTarget(
        producer.address, tuple(producer.kv_ports), producer.instance_id
    )


def rendezvous(affinity_key: bytes, producer_key: str) -> bytes:
    """Rendezvous (highest random weight) rank, lowest first: a hash of
    both, so each prefix ranks the producers in its own stable order."""
    data = affinity_key + b"\0" + producer_key.encode()
    return hashlib.blake2b(data, digest_size=8).digest()
