"""A consumer TP rank: pulls its shard of each lease from the producer rank
with the same index, then releases the lease.

It knows the producer instance (epoch) it shook hands with. A lease from
another instance means the producer restarted: the rank drops every session
and mapping of the old one, shakes hands again and only then reads.

A dead producer's GPU memory stays allocated while this rank maps it (ipc),
so its restart on that GPU would not fit: a watch thread asks the producer
rank who it is every second and, when it is gone or another instance, lets
go of everything of it at once, even while our engine is idle (no step).
"""

from __future__ import annotations

import socket
import threading
import time

from pdserve.connector.cpu_pacing import CONSUMER_WAIT_SECONDS, pace
from pdserve.connector.kv_client import BlockingClient, Load, ProducerLink
from pdserve.connector.metadata import LoadSpec
from pdserve.connector.stats import PDServeStats
from pdserve.handshake import IncompatibleProducer, check_compatible, wait_for_rank_info
from pdserve.kv_cache import PagedKVCache
from pdserve.lease import Lease
from pdserve.log import init_logger
from pdserve.protocol import RankInfo
from pdserve.settings import Settings
from pdserve.transport import (
    KVTransport,
    TransportUnavailable,
    candidates,
    get_transport,
)

logger = init_logger(__name__)

# After a failed handshake with a new producer instance, loads fail at once
# (prefilled locally) for this long instead of trying again every step.
REHANDSHAKE_BACKOFF_SECONDS = 1.0
# How often the watch thread checks the producer rank, and how long it waits.
WATCH_SECONDS = 1.0
WATCH_TIMEOUT_SECONDS = 2.0
# A GPU-direct transport whose copies failed this many times in a row (no
# successful load between) is given up for tcp: a broken peer mapping or
# communicator would otherwise fail every pull and recompute every prompt.
COPY_FAILURES_BEFORE_FALLBACK = 3


def resolve(name: str) -> list[str]:
    """The IPv4/IPv6 addresses ``name`` has now; [] if it has none now."""
    try:
        infos = socket.getaddrinfo(name, None, type=socket.SOCK_STREAM)
    except OSError:
        return []
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


class ConsumerRank:
    def __init__(
        self,
        settings: Settings,
        kv: PagedKVCache,
        info: RankInfo,
        tp_rank: int,
        secret: bytes | None,
    ) -> None:
        assert settings.producer_kv_host is not None
        self.settings = settings
        self.kv = kv
        self.info = info
        self.tp_rank = tp_rank
        self._secret = secret
        # Resolved once: the engine's thread never waits for DNS.
        self.host = socket.gethostbyname(settings.producer_kv_host)
        self.remote: RankInfo | None = None
        self.remote_port = 0
        # The producer we paired with is gone: pair again before any read.
        self.stale = False
        self.transport: KVTransport = get_transport("tcp")
        self.session = ""
        self._copy_failures = 0  # in a row, of the current transport
        # The engine's thread and the watch thread never act at once.
        self._lock = threading.Lock()
        self._stopped = threading.Event()
        self._watch: threading.Thread | None = None
        self._links: dict[int, ProducerLink] = {}
        self._handshake_failed_at = -REHANDSHAKE_BACKOFF_SECONDS
        self._done: set[str] = set()
        self._failed_blocks: set[int] = set()
        self.stats = PDServeStats()
        self.last_error: str | None = None  # why the latest pull failed

    # ---- handshakes ----

    def connect(self) -> None:
        """Startup: wait for the producer rank and pair with it."""
        port = self.settings.producer_kv_ports[self.tp_rank]
        client = self._client(port)
        remote = wait_for_rank_info(client, self.settings.connect_timeout)
        self._pair(client, remote)

    def _rehandshake(self, lease: Lease) -> None:
        """A lease of another producer instance arrived: pair with it anew."""
        now = time.monotonic()
        if now - self._handshake_failed_at < REHANDSHAKE_BACKOFF_SECONDS:
            raise IncompatibleProducer("producer changed; handshake failed recently")
        try:
            client = self._client(lease.kv_ports[self.tp_rank])
            remote = client.rank_info()
            if remote.epoch != lease.epoch:
                raise IncompatibleProducer(
                    f"lease of producer {lease.epoch}, rank serves {remote.epoch}"
                )
            self._pair(client, remote)
        except (OSError, IncompatibleProducer) as exc:
            self._handshake_failed_at = now
            logger.warning("pdserve: pairing with the new producer failed: %s", exc)
            raise IncompatibleProducer(str(exc)) from exc

    def _pair(self, client: BlockingClient, remote: RankInfo) -> None:
        check_compatible(local=self.info, remote=remote)
        if self.remote is not None:
            logger.info(
                "pdserve: producer instance changed (%s -> %s); dropping its "
                "sessions and connections",
                self.remote.epoch,
                remote.epoch,
            )
        self._drop_producer()
        self._use(*self._open_transport(client, remote))
        self.remote, self.remote_port, self.stale = remote, client.port, False
        self._start_watch()
        logger.info(
            "pdserve consumer rank %d paired with producer %s:%d (instance %s) over %s",
            self.tp_rank,
            client.host,
            client.port,
            remote.epoch,
            self.transport.name,
        )

    def _drop_producer(self, reason: str = "producer changed") -> None:
        for link in self._links.values():
            for load in link.close(reason):
                self._record(load)
        self._links.clear()
        self.transport.drop_sessions()

    # ---- the watch ----

    def _start_watch(self) -> None:
        if self._watch is None:
            self._watch = threading.Thread(
                target=self._watch_producer,
                name=f"pdserve-producer-watch-{self.tp_rank}",
                daemon=True,
            )
            self._watch.start()

    def _watch_producer(self) -> None:
        while not self._stopped.wait(WATCH_SECONDS):
            self._follow_address()
            remote, port = self.remote, self.remote_port
            if remote is None or self.stale or self._producer_alive(remote, port):
                continue
            with self._lock:
                if self.remote is remote and not self.stale:
                    self._forget_producer(remote)

    def _follow_address(self) -> None:
        """A replaced producer (a new Kubernetes pod) has a new address under
        the same name: leave the old one, pair with the new on its lease."""
        assert self.settings.producer_kv_host is not None
        addresses = resolve(self.settings.producer_kv_host)
        if not addresses or self.host in addresses:
            return  # unknown now, or still ours (a name may have several)
        with self._lock:
            logger.warning(
                "pdserve: producer %s moved from %s to %s",
                self.settings.producer_kv_host,
                self.host,
                addresses[0],
            )
            if self.remote is not None and not self.stale:
                self._forget_producer(self.remote)
            self.host = addresses[0]

    def _producer_alive(self, remote: RankInfo, port: int) -> bool:
        """False only when we know: nobody listens, or another instance."""
        client = BlockingClient(self.host, port, WATCH_TIMEOUT_SECONDS, self._secret)
        try:
            return client.rank_info().epoch == remote.epoch
        except (ConnectionRefusedError, ConnectionResetError):
            return False
        except Exception:  # slow or busy: it may well be alive
            return True

    def _forget_producer(self, remote: RankInfo) -> None:
        logger.warning(
            "pdserve: producer instance %s is gone; dropped its sessions and "
            "mappings (a new instance is paired with on its first lease)",
            remote.epoch,
        )
        self._drop_producer("producer gone")
        self._use(get_transport("tcp"), "")
        self.stale = True

    def _open_transport(
        self, client: BlockingClient, remote: RankInfo
    ) -> tuple[KVTransport, str]:
        """The best transport both ranks can use; tcp if the others fail."""
        for name in candidates(self.settings.transport, self.info, remote):
            transport = get_transport(name)
            try:
                session = transport.open_session(
                    client, self.kv, remote, self.consumer_id
                )
                return transport, session
            except (TransportUnavailable, OSError, RuntimeError) as exc:
                logger.warning(
                    "pdserve: KV transport %s unavailable (%s); trying the next",
                    name,
                    exc,
                )
                self.stats.add("kv_transport_fallbacks")
        raise AssertionError("tcp is always a candidate")

    def _use(self, transport: KVTransport, session: str) -> None:
        self.transport, self.session = transport, session
        self._copy_failures = 0

    def _fall_back_to_tcp(self, reason: str) -> None:
        logger.warning(
            "pdserve: KV transport %s failed (%s); using tcp from now on",
            self.transport.name,
            reason,
        )
        self.stats.add("kv_transport_fallbacks")
        self.transport.drop_sessions()
        self._use(get_transport("tcp"), "")

    @property
    def consumer_id(self) -> str:
        """Who this rank is to a producer: a new hello of the same id
        replaces the older session there."""
        return f"{self.settings.instance_id}/{self.tp_rank}"

    def _client(self, port: int) -> BlockingClient:
        return BlockingClient(
            self.host, port, self.settings.transfer_timeout, self._secret
        )

    # ---- each engine step ----

    def start(
        self,
        loads: list[LoadSpec],
        releases: list[Lease],
        failed: list[tuple[str, list[int]]],
    ) -> None:
        with self._lock:
            self._start(loads, releases, failed)

    def _start(
        self,
        loads: list[LoadSpec],
        releases: list[Lease],
        failed: list[tuple[str, list[int]]],
    ) -> None:
        for request_id, block_ids in failed:
            self.stats.add("kv_load_failures")
            self._failed_blocks.update(block_ids)
            self._done.add(request_id)
        for spec in loads:
            try:
                self._start_load(spec)
            except Exception as exc:  # never into vLLM's worker: recompute
                self.stats.add("kv_connector_errors")
                self._fail(spec, f"unexpected error: {exc!r}")
        for lease in releases:
            if (
                self.remote is not None
                and not self.stale
                and lease.epoch == self.remote.epoch
                and len(lease.kv_ports) > self.tp_rank
            ):
                self._link(lease).release(lease)
            # A lease of an older instance ended with that instance; one
            # naming no port of ours opened nothing here.

    def _start_load(self, spec: LoadSpec) -> None:
        assert self.remote is not None
        if self.stale or spec.lease.epoch != self.remote.epoch:
            try:
                self._rehandshake(spec.lease)
            except IncompatibleProducer as exc:
                return self._fail(spec, f"producer changed: {exc}")
        assert self.remote is not None
        if len(spec.lease.kv_ports) <= self.tp_rank:
            return self._fail(spec, "the lease names no KV port for this rank")
        if max(spec.remote_block_ids, default=0) >= self.remote.num_blocks:
            # A device copy would read past the producer's cache.
            return self._fail(spec, "the lease names blocks the producer lacks")
        deadline = time.monotonic() + self.settings.transfer_timeout
        load = Load(spec, self.transport, self.session, deadline)
        self._link(spec.lease).submit(load)

    def _link(self, lease: Lease) -> ProducerLink:
        port = lease.kv_ports[self.tp_rank]
        link = self._links.get(port)
        if link is None:
            link = ProducerLink(
                self.host, port, self.kv, self.settings.transfer_timeout, self._secret
            )
            self._links[port] = link
        return link

    def poll(self) -> None:
        with self._lock:
            self._poll()

    def _poll(self) -> None:
        for link in self._links.values():
            try:
                finished = link.pump()
            except Exception as exc:  # never into vLLM's worker: recompute
                logger.exception("pdserve: KV link failed unexpectedly")
                self.stats.add("kv_connector_errors")
                finished = link.close(f"unexpected error: {exc!r}")
            for load in finished:
                self._record(load)
        if any(link.busy() for link in self._links.values()):
            pace(self.kv.device, CONSUMER_WAIT_SECONDS)
        if not self.transport.healthy(self.session):
            self._fall_back_to_tcp("its session broke")

    def _record(self, load: Load) -> None:
        if load.error is not None:
            self._count_copy_failure(load)
            return self._fail(load.spec, load.error)
        self._copy_failures = 0
        self.stats.add("kv_loads")
        self.stats.add("kv_bytes_received", load.nbytes)
        self.stats.add("kv_blocks_received", len(load.spec.local_block_ids))
        self.stats.observe("kv_transfer_seconds", time.monotonic() - load.started)
        if load.spec.scheduled_at:
            wait = load.replied_at - load.spec.scheduled_at
            self.stats.observe("ttft_transfer_wait_seconds", max(0.0, wait))
        self.stats.observe("ttft_transfer_copy_seconds", load.done_at - load.replied_at)
        self._done.add(load.spec.request_id)

    def _count_copy_failure(self, load: Load) -> None:
        """Another failed copy of the transport in use: give it up at the
        limit. Reads refused or timed out say nothing about the transport."""
        if not load.transport_failed or load.transport is not self.transport:
            return
        if self.transport.name == "tcp":
            return  # nothing to fall back to
        self._copy_failures += 1
        # A session the producer has dropped is dead at once.
        if self._copy_failures >= COPY_FAILURES_BEFORE_FALLBACK or load.session_lost:
            self._fall_back_to_tcp(
                f"{self._copy_failures} copies in a row failed, "
                f"the latest: {load.error}"
            )

    def _fail(self, spec: LoadSpec, reason: str) -> None:
        logger.warning(
            "pdserve: pulling KV for %s failed (%s); recomputing locally",
            spec.request_id,
            reason,
        )
        self.stats.add("kv_load_failures")
        self.last_error = reason
        self._failed_blocks.update(spec.local_block_ids)
        self._done.add(spec.request_id)

    def take_done(self) -> tuple[set[str], set[int]]:
        """Requests whose pulls ended, and the blocks of the failed ones."""
        with self._lock:
            done, self._done = self._done, set()
            failed, self._failed_blocks = self._failed_blocks, set()
        return done, failed

    def take_stats(self) -> PDServeStats | None:
        with self._lock:
            return self.stats.take()

    def shutdown(self) -> None:
        self._stopped.set()
        with self._lock:
            self._drop_producer("shutting down")
