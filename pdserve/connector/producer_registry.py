"""The producers a consumer rank is paired with, and the watch over them.

It knows every producer (``ProducerPeer``: address, KV ports, instance) the
rank has paired with. A lease names its producer (the address the consumer's
HTTP layer reached it at, its KV ports, its instance id). Pairing never runs
on the engine's thread (``Pairer``): a lease of a producer not paired with
yet, or of a new instance of a known one (a restart), fails at once (its
prompt is recomputed here) and starts the pairing in the background.
Producers the HTTP layer found (``pdserve.pairings``) are paired with before
it sends them any work, so that is rare.

A dead producer's GPU memory stays allocated while this rank maps it (ipc),
so its restart on that GPU would not fit: a watch thread asks each producer
who it is every second and, when it is gone or another instance, lets go of
everything of it at once, even while our engine is idle (no step). It also
drives out releases an idle engine left behind.
"""

from __future__ import annotations

import threading
import time

from pdserve.connector.orphan_releases import OrphanReleases
from pdserve.connector.pairing import Pairer
from pdserve.connector.producer_peer import PeerKey, ProducerPeer, peer_key
from pdserve.connector.stats import PDServeStats
from pdserve.incompatible import IncompatibleProducer
from pdserve.kv_cache import PagedKVCache
from pdserve.lease import Lease
from pdserve.log import init_logger
from pdserve.pairings import PairingTarget, targets_reader
from pdserve.settings import ProducerAddress, Settings
from pdserve.side_channel.client import BlockingClient, wait_for_rank_info
from pdserve.side_channel.protocol import RankInfo
from pdserve.timing import (
    FLUSH_PUMP_SECONDS,
    FLUSH_SECONDS,
    REHANDSHAKE_BACKOFF_SECONDS,
    WATCH_SECONDS,
    WATCH_TIMEOUT_SECONDS,
)

logger = init_logger(__name__)

# Producers paired with at once; the least recently used idle one goes.
MAX_PEERS = 64


class ProducerRegistry:
    def __init__(
        self,
        settings: Settings,
        kv: PagedKVCache,
        info: RankInfo,
        tp_rank: int,
        secret: bytes | None,
        stats: PDServeStats,
        watch_seconds: float = WATCH_SECONDS,
        watch_timeout: float = WATCH_TIMEOUT_SECONDS,
    ) -> None:
        self.settings = settings
        self.kv = kv
        self.info = info
        self.tp_rank = tp_rank
        self._secret = secret
        self.stats = stats
        self.peers: dict[PeerKey, ProducerPeer] = {}
        self._used: dict[PeerKey, float] = {}
        self.pairer = Pairer(
            tp_rank, self._pair, REHANDSHAKE_BACKOFF_SECONDS, settings.run_dir
        )
        self._targets = targets_reader(settings.run_dir) if settings.run_dir else None
        # Releases of leases no paired peer can carry.
        self.orphans = OrphanReleases(kv, settings.transfer_timeout, secret)
        # The engine's thread and the watch thread never act at once.
        self.lock = threading.Lock()
        self._stopped = threading.Event()
        self._watch: threading.Thread | None = None
        # The watch's period and patience (WATCH_*), given so that tests
        # control them rather than wait for them.
        self._watch_seconds = watch_seconds
        self._watch_timeout = watch_timeout

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
        peer = self._new_peer(address.host, address.kv_ports, first.instance_id)
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
        peer = self._new_peer(target.host, list(target.kv_ports), target.instance_id)
        try:
            peer.open(self.settings.transfer_timeout)
        except BaseException:
            peer.close("pairing failed")  # no half-open session or mapping
            raise
        return peer

    def install_paired(self) -> None:
        """Peers the pairing threads finished (engine thread, under lock)."""
        for peer in self.pairer.take_ready():
            self._add(peer)

    def _new_peer(
        self, host: str, kv_ports: list[int], instance_id: str
    ) -> ProducerPeer:
        return ProducerPeer(
            host,
            kv_ports,
            instance_id,
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
            self._drop(old, "producer changed", gone=True)
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
            if pair.role.read:
                self.stats.add_labeled("kv_pairings", pair.transport.name)

    def _least_recently_used(self) -> PeerKey:
        idle = [k for k, p in self.peers.items() if not p.busy()] or list(self.peers)
        return min(idle, key=lambda k: self._used.get(k, 0.0))

    def _drop(self, peer: ProducerPeer, reason: str, gone: bool = False) -> None:
        """Let go of ``peer`` (already out of ``peers``): its pulls end."""
        peer.close(reason, gone)
        self._used.pop(peer.key, None)
        self.pairer.forget(_target_of(peer))

    def peer_of(self, lease: Lease) -> ProducerPeer | None:
        """The paired producer instance that issued ``lease``, if any."""
        peer = self.peers.get(peer_key(lease))
        return (
            peer if peer is not None and peer.instance_id == lease.instance_id else None
        )

    def peer_for(self, lease: Lease) -> ProducerPeer:
        """The paired producer that issued ``lease``. Raises
        IncompatibleProducer when there is none yet (a pairing is started:
        the engine never waits for one)."""
        peer = self.peer_of(lease)
        if peer is not None:
            self._used[peer.key] = time.monotonic()
            return peer
        if not lease.kv_host:
            raise IncompatibleProducer("the lease names no producer address")
        target = PairingTarget(lease.kv_host, tuple(lease.kv_ports), lease.instance_id)
        if (error := self.pairer.failed_recently(target)) is not None:
            raise IncompatibleProducer(f"pairing failed recently: {error}")
        self.pairer.want(target)
        raise IncompatibleProducer("not paired yet (pairing in the background)")

    # ---- each engine step ----

    def pump(self) -> bool:
        """Advance every link (loads report to their pulls); whether reads
        are still in flight."""
        for peer in list(self.peers.values()):
            peer.pump()
        self.orphans.pump()
        return any(peer.busy() for peer in self.peers.values())

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
                with self.lock:
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
            with self.lock:
                for peer in list(self.peers.values()):
                    peer.flush_releases()
                self.orphans.pump()
                pending = self.orphans or any(
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
            if peer is None or peer.instance_id != target.instance_id:
                self.pairer.want(target)

    def _producer_alive(self, peer: ProducerPeer) -> bool:
        """False only when we know: nobody listens, or another instance."""
        for rank in list(peer.pairs):
            try:
                instance_id = (
                    peer.client(rank, self._watch_timeout).rank_info().instance_id
                )
            except (ConnectionRefusedError, ConnectionResetError):
                return False
            except Exception:  # slow or busy: it may well be alive
                continue
            if instance_id != peer.instance_id:
                return False
        return True

    def _forget(self, peer: ProducerPeer) -> None:
        logger.warning(
            "pdserve: %s is gone; dropped its sessions and mappings (a new "
            "instance is paired with on its first lease)",
            peer,
        )
        del self.peers[peer.key]
        self._drop(peer, "producer gone", gone=True)

    def shutdown(self) -> None:
        """Stop the watch and pairing; let go of every producer."""
        self._stopped.set()
        self.pairer.close()
        with self.lock:
            for peer in list(self.peers.values()):
                self._drop(peer, "shutting down")
            self.peers.clear()
            self.orphans.close()


def _target_of(peer: ProducerPeer) -> PairingTarget:
    return PairingTarget(peer.host, tuple(peer.kv_ports), peer.instance_id)
