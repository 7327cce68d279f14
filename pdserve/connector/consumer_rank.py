"""A consumer TP rank: pulls its part of each lease from the producer that
issued it, then releases the lease.

It knows every producer (``ProducerPeer``: address, KV ports, instance) it
has paired with. A lease names its producer (the address the consumer's HTTP
layer reached it at, its KV ports, its instance id). Pairing never runs on
the engine's thread (``Pairer``): a lease of a producer not paired with yet,
or of a new instance of a known one (a restart), fails at once (its prompt
is recomputed here) and starts the pairing in the background. Producers the
HTTP layer found (``pdserve.pairings``) are paired with before it sends them
any work, so that is rare.

A dead producer's GPU memory stays allocated while this rank maps it (ipc),
so its restart on that GPU would not fit: a watch thread asks each producer
who it is every second and, when it is gone or another instance, lets go of
everything of it at once, even while our engine is idle (no step).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

from pdserve.connector.cpu_pacing import CONSUMER_WAIT_SECONDS, pace
from pdserve.connector.kv_client import BlockingClient, Load
from pdserve.connector.metadata import LoadSpec
from pdserve.connector.orphan_releases import OrphanReleases
from pdserve.connector.pairing import Pairer
from pdserve.connector.producer_peer import PeerKey, ProducerPeer, peer_key
from pdserve.connector.stats import PDServeStats
from pdserve.handshake import IncompatibleProducer, wait_for_rank_info
from pdserve.kv_cache import PagedKVCache
from pdserve.lease import Lease
from pdserve.log import init_logger
from pdserve.pairings import PairingTarget, targets_reader
from pdserve.protocol import RankInfo
from pdserve.settings import ProducerAddress, Settings

logger = init_logger(__name__)

# After a failed pairing with a producer, it is not tried again for this
# long, counted from the end of the failed attempt.
REHANDSHAKE_BACKOFF_SECONDS = 1.0
# How often the watch thread checks the producers, and how long it waits.
WATCH_SECONDS = 1.0
WATCH_TIMEOUT_SECONDS = 2.0
# While the engine is idle the watch thread sends pending releases, pumping
# every few milliseconds for up to this long (a connection to open and prove
# included).
FLUSH_SECONDS = 3.0
FLUSH_PUMP_SECONDS = 0.002
# Producers paired with at once; the least recently used idle one goes.
MAX_PEERS = 64


@dataclass
class _Pull:
    """One request's pull: a load per producer rank it reads from."""

    spec: LoadSpec
    peer: ProducerPeer
    remaining: int
    error: str | None = None
    nbytes: int = 0
    replied_at: float = 0.0
    done_at: float = 0.0


class ConsumerRank:
    def __init__(
        self,
        settings: Settings,
        kv: PagedKVCache,
        info: RankInfo,
        tp_rank: int,
        secret: bytes | None,
        watch_seconds: float = WATCH_SECONDS,
        watch_timeout: float = WATCH_TIMEOUT_SECONDS,
    ) -> None:
        self.settings = settings
        self.kv = kv
        self.info = info
        self.tp_rank = tp_rank
        self._secret = secret
        self.peers: dict[PeerKey, ProducerPeer] = {}
        self._used: dict[PeerKey, float] = {}
        self.pairer = Pairer(
            tp_rank, self._pair, REHANDSHAKE_BACKOFF_SECONDS, settings.run_dir
        )
        self._targets = targets_reader(settings.run_dir) if settings.run_dir else None
        # The engine's thread and the watch thread never act at once.
        self._lock = threading.Lock()
        self._stopped = threading.Event()
        self._watch: threading.Thread | None = None
        # The watch's period and patience (WATCH_*), given so that tests
        # control them rather than wait for them.
        self._watch_seconds = watch_seconds
        self._watch_timeout = watch_timeout
        self._pulls: dict[str, _Pull] = {}
        self._orphans = OrphanReleases(kv, settings.transfer_timeout, secret)
        self._done: set[str] = set()
        self._failed_blocks: set[int] = set()
        self.stats = PDServeStats()
        self.last_error: str | None = None  # why the latest pull failed

    # ---- pairing ----

    def connect(self) -> None:
        """Startup, before the engine serves: pair with the producers the
        entrypoint found. One that does not match refuses the start; one
        that is not reachable is paired with in the background once the
        HTTP layer asks for it (the node serves meanwhile, prefilling
        locally)."""
        # One deadline for all: producers that vanished while the model
        # loaded must not cost a wait each.
        deadline = time.monotonic() + self.settings.connect_timeout
        for address in self.settings.producers:
            try:
                self._connect(address, max(1.0, deadline - time.monotonic()))
            except (TimeoutError, OSError) as exc:
                logger.warning("pdserve: %s; prefilling locally meanwhile", exc)
        self._start_watch()

    def _connect(self, address: ProducerAddress, timeout: float) -> None:
        # Ask the producer rank of our index (rank 0 if it has fewer) who
        # it is, waiting for it to start.
        own = self.tp_rank if self.tp_rank < len(address.kv_ports) else 0
        client = BlockingClient(
            address.host,
            address.kv_ports[own],
            self.settings.transfer_timeout,
            self._secret,
        )
        first = wait_for_rank_info(client, timeout)
        peer = self._new_peer(address.host, address.kv_ports, first.epoch)
        try:
            peer.open(
                self.settings.transfer_timeout, first if own == self.tp_rank else None
            )
        except BaseException:
            peer.close("pairing failed")  # no half-open session or mapping
            raise
        self._add(peer)
        self.pairer.paired(_target_of(peer))

    def _pair(self, target: PairingTarget) -> ProducerPeer:
        """Pair with ``target`` (on a pairing thread, never the engine's)."""
        peer = self._new_peer(target.host, list(target.kv_ports), target.epoch)
        try:
            peer.open(self.settings.transfer_timeout)
        except BaseException:
            peer.close("pairing failed")  # no half-open session or mapping
            raise
        return peer

    def _install_paired(self) -> None:
        """Peers the pairing threads finished (engine thread, under lock)."""
        for peer in self.pairer.take_ready():
            self._add(peer)

    def _new_peer(self, host: str, kv_ports: list[int], epoch: str) -> ProducerPeer:
        return ProducerPeer(
            host,
            kv_ports,
            epoch,
            self.kv,
            self.info,
            self.settings,
            self._secret,
            self.stats,
        )

    def _add(self, peer: ProducerPeer) -> None:
        old = self.peers.pop(peer.key, None)
        if old is not None:
            logger.info(
                "pdserve: %s replaces %s; dropping the old one's sessions", peer, old
            )
            self._drop(old, "producer changed")
        while len(self.peers) >= MAX_PEERS:
            self._drop(
                self.peers.pop(self._least_recently_used()), "too many producers"
            )
        self.peers[peer.key] = peer
        self._used[peer.key] = time.monotonic()
        if peer.setup_fallbacks:
            self.stats.add("kv_transport_fallbacks", peer.setup_fallbacks)
            peer.setup_fallbacks = 0
        for pair in peer.pairs.values():
            if not pair.release_only:
                self.stats.add_labeled("kv_pairings", pair.transport.name)

    def _least_recently_used(self) -> PeerKey:
        idle = [k for k, p in self.peers.items() if not p.busy()] or list(self.peers)
        return min(idle, key=lambda k: self._used.get(k, 0.0))

    def _drop(self, peer: ProducerPeer, reason: str) -> None:
        for load in peer.close(reason):
            self._record(load)
        self._used.pop(peer.key, None)
        self.pairer.forget(_target_of(peer))

    def _peer_for(self, lease: Lease) -> ProducerPeer:
        """The paired producer that issued ``lease``. Raises
        IncompatibleProducer when there is none yet (a pairing is started:
        the engine never waits for one)."""
        key = peer_key(lease)
        peer = self.peers.get(key)
        if peer is not None and peer.epoch == lease.epoch:
            self._used[key] = time.monotonic()
            return peer
        if not lease.kv_host:
            raise IncompatibleProducer("the lease names no producer address")
        target = PairingTarget(lease.kv_host, tuple(lease.kv_ports), lease.epoch)
        if (error := self.pairer.failed_recently(target)) is not None:
            raise IncompatibleProducer(f"pairing failed recently: {error}")
        self.pairer.want(target)
        raise IncompatibleProducer("not paired yet (pairing in the background)")

    # ---- the watch ----

    def _start_watch(self) -> None:
        if self._watch is None:
            self._watch = threading.Thread(
                target=self._watch_producers,
                name=f"pdserve-producer-watch-{self.tp_rank}",
                daemon=True,
            )
            self._watch.start()

    def _watch_producers(self) -> None:
        while not self._stopped.wait(self._watch_seconds):
            self._pair_with_targets()
            for peer in list(self.peers.values()):
                if self._producer_alive(peer):
                    continue
                with self._lock:
                    if self.peers.get(peer.key) is peer:
                        self._forget(peer)
            self._flush_releases()

    def _flush_releases(self) -> None:
        """Drive releases out while the engine is idle: a lease handed back
        from an idle engine (one step, then none) must not wait for the next
        request, nor a connection that must be opened (and proven) first.
        A few milliseconds between pumps, the lock released between them."""
        deadline = time.monotonic() + FLUSH_SECONDS
        while not self._stopped.is_set():
            with self._lock:
                for peer in list(self.peers.values()):
                    for load in peer.flush_releases():
                        self._record(load)
                self._orphans.pump()
                pending = self._orphans or any(
                    peer.releasing() for peer in self.peers.values()
                )
            if not pending or time.monotonic() > deadline:
                return
            self._stopped.wait(FLUSH_PUMP_SECONDS)

    def _pair_with_targets(self) -> None:
        """Pair ahead with the producers the HTTP layer found: it sends one
        work only once every rank has paired with it."""
        if self._targets is None:
            return
        for target in self._targets.read() or ():
            peer = self.peers.get(target.key)
            if peer is None or peer.epoch != target.epoch:
                self.pairer.want(target)

    def _producer_alive(self, peer: ProducerPeer) -> bool:
        """False only when we know: nobody listens, or another instance."""
        for rank in list(peer.pairs):
            try:
                epoch = peer.client(rank, self._watch_timeout).rank_info().epoch
            except (ConnectionRefusedError, ConnectionResetError):
                return False
            except Exception:  # slow or busy: it may well be alive
                continue
            if epoch != peer.epoch:
                return False
        return True

    def _forget(self, peer: ProducerPeer) -> None:
        logger.warning(
            "pdserve: %s is gone; dropped its sessions and mappings (a new "
            "instance is paired with on its first lease)",
            peer,
        )
        del self.peers[peer.key]
        self._drop(peer, "producer gone")

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
        self._install_paired()
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
            self._release(lease)

    def _release(self, lease: Lease) -> None:
        peer = self.peers.get(peer_key(lease))
        if peer is not None and peer.epoch == lease.epoch:
            peer.release(lease)
        else:
            # Not paired with its instance: a short-lived link (the producer
            # acts only on leases it issued, by their token).
            self._orphans.release(lease)

    def _start_load(self, spec: LoadSpec) -> None:
        try:
            peer = self._peer_for(spec.lease)
        except IncompatibleProducer as exc:
            self._release(spec.lease)
            return self._fail(spec, f"producer unusable: {exc}")
        if any(
            max(spec.remote_block_ids, default=0) >= pair.remote.num_blocks
            for pair in peer.pairs.values()
        ):
            # A device copy would read past the producer's cache.
            self._release(spec.lease)
            return self._fail(spec, "the lease names blocks the producer lacks")
        deadline = time.monotonic() + self.settings.transfer_timeout
        self._pulls[spec.request_id] = _Pull(spec, peer, 0)
        self._pulls[spec.request_id].remaining = peer.submit(spec, deadline)

    def poll(self) -> None:
        with self._lock:
            self._poll()

    def _poll(self) -> None:
        for peer in list(self.peers.values()):
            for load in peer.pump():
                self._record(load)
        self._orphans.pump()
        if any(peer.busy() for peer in self.peers.values()):
            pace(self.kv.device, CONSUMER_WAIT_SECONDS)

    def _record(self, load: Load) -> None:
        """One producer rank's part of a pull ended."""
        pull = self._pulls.get(load.spec.request_id)
        if pull is None or pull.spec is not load.spec:
            return
        if load.error is not None:
            pull.peer.count_copy_failure(load)
            pull.error = pull.error or load.error
        else:
            pull.peer.copy_succeeded(load)
            pull.nbytes += load.nbytes
            pull.replied_at = max(pull.replied_at, load.replied_at)
            pull.done_at = max(pull.done_at, load.done_at)
        pull.remaining -= 1
        if pull.remaining <= 0:
            del self._pulls[load.spec.request_id]
            pull.peer.release_unread(pull.spec.lease)
            self._finish(pull, load.started)

    def _finish(self, pull: _Pull, started: float) -> None:
        if pull.error is not None:
            return self._fail(pull.spec, pull.error)
        self.stats.add("kv_loads")
        self.stats.add("kv_bytes_received", pull.nbytes)
        self.stats.add("kv_blocks_received", len(pull.spec.local_block_ids))
        self.stats.observe("kv_transfer_seconds", time.monotonic() - started)
        if pull.spec.scheduled_at:
            wait = pull.replied_at - pull.spec.scheduled_at
            self.stats.observe("ttft_transfer_wait_seconds", max(0.0, wait))
        self.stats.observe("ttft_transfer_copy_seconds", pull.done_at - pull.replied_at)
        self._done.add(pull.spec.request_id)

    def _fail(self, spec: LoadSpec, reason: str) -> None:
        logger.warning(
            "pdserve: pulling KV for %s failed (%s); recomputing locally",
            spec.request_id,
            reason,
        )
        self._pulls.pop(spec.request_id, None)
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
        self.pairer.close()
        with self._lock:
            for peer in list(self.peers.values()):
                self._drop(peer, "shutting down")
            self.peers.clear()
            self._orphans.close()


def _target_of(peer: ProducerPeer) -> PairingTarget:
    return PairingTarget(peer.host, tuple(peer.kv_ports), peer.epoch)
