"""One producer instance as a consumer rank sees it.

A producer is an address, its KV ports (one per producer TP rank) and its
instance id. The consumer rank reads its KV heads from the producer ranks
that hold them (``tp_mapping``): with equal TP sizes, whole blocks
from the rank of its own index over the best transport both can use; with
different TP sizes, a run of heads from each of one or more ranks, over tcp.
Each producer rank it reads from is a ``RankPair``: what that rank is, the
transport and session, and the side-channel link the reads go on.
"""

from __future__ import annotations

from dataclasses import dataclass

from pdserve.connector.kv_client import BlockingClient, Load, ProducerLink
from pdserve.connector.metadata import LoadSpec
from pdserve.connector.stats import PDServeStats
from pdserve.connector.tp_mapping import (
    HeadSlice,
    UnsupportedMapping,
    head_slices,
    rank_heads,
    whole_blocks,
)
from pdserve.handshake import IncompatibleProducer, InstanceGone, check_compatible
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

# A GPU-direct transport whose copies failed this many times in a row (no
# successful load between) is given up for tcp: a broken peer mapping or
# communicator would otherwise fail every pull and recompute every prompt.
COPY_FAILURES_BEFORE_FALLBACK = 3

PeerKey = tuple[str, tuple[int, ...]]


def peer_key(lease: Lease) -> PeerKey:
    return lease.kv_host, tuple(lease.kv_ports)


@dataclass
class RankPair:
    """This consumer rank and one producer rank it reads from."""

    remote: RankInfo
    link: ProducerLink
    transport: KVTransport
    session: str
    # Consumer ranks (of all of this node's) that release this producer
    # rank's part of a lease: the last of them ends it.
    readers: int = 1
    copy_failures: int = 0  # in a row, of the current transport
    # Released only, never read: it holds copies of heads another producer
    # rank serves (fewer KV heads than producer ranks).
    release_only: bool = False
    # Blocks move whole (the ranks hold the same heads), decided at pairing;
    # otherwise each read names its run of heads.
    whole: bool = True


class ProducerPeer:
    def __init__(
        self,
        host: str,
        kv_ports: list[int],
        instance_id: str,
        kv: PagedKVCache,
        info: RankInfo,
        settings: Settings,
        secret: bytes | None,
        stats: PDServeStats,
    ) -> None:
        self.host = host
        self.kv_ports = list(kv_ports)
        self.instance_id = instance_id
        self.kv = kv
        self.info = info
        self.settings = settings
        self._secret = secret
        self.stats = stats
        self.slices: list[HeadSlice] = []
        self.pairs: dict[int, RankPair] = {}
        # Transports given up while pairing (on a pairing thread): counted
        # into ``stats`` by the engine's thread when it takes the peer.
        self.setup_fallbacks = 0

    @property
    def key(self) -> PeerKey:
        return self.host, tuple(self.kv_ports)

    def __repr__(self) -> str:
        return f"producer {self.host}:{self.kv_ports} (instance {self.instance_id})"

    # ---- pairing ----

    def open(self, timeout: float, first: RankInfo | None = None) -> None:
        """Pair with every producer rank this rank reads from. ``first``: the
        rank info of the producer rank of our index, already fetched.
        Raises IncompatibleProducer or OSError."""
        self.slices = self._slices()
        read = {s.producer_rank for s in self.slices}
        for rank in sorted(read | self._released_here()):
            client = self.client(rank, timeout)
            remote = first if first is not None and rank == self.info.tp_rank else None
            remote = remote or client.rank_info()
            if remote.instance_id != self.instance_id:
                raise InstanceGone(
                    f"instance {self.instance_id} is gone: its ports serve "
                    f"{remote.instance_id}"
                )
            if remote.tp_rank != rank or remote.tp_size != len(self.kv_ports):
                raise IncompatibleProducer(
                    f"KV port {client.port} serves TP rank {remote.tp_rank} of "
                    f"{remote.tp_size}, expected {rank} of {len(self.kv_ports)}"
                )
            self.pairs[rank] = self._pair(client, remote, release_only=rank not in read)
        names = sorted({pair.transport.name for pair in self.pairs.values()})
        logger.info(
            "pdserve consumer rank %d paired with %s over %s (its ranks %s)",
            self.info.tp_rank,
            self,
            "/".join(names),
            sorted(self.pairs),
        )

    def _slices(self) -> list[HeadSlice]:
        producer_tp, consumer_tp = len(self.kv_ports), self.info.tp_size
        if producer_tp == consumer_tp:
            rank = self.info.tp_rank
            return [HeadSlice(rank, 0, 0, max(self.kv.num_heads, 1))]
        try:
            return head_slices(
                self.info.total_kv_heads, producer_tp, consumer_tp, self.info.tp_rank
            )
        except UnsupportedMapping as exc:
            raise IncompatibleProducer(
                f"producer TP {producer_tp}, consumer TP {consumer_tp}: {exc}"
            ) from exc

    def _unread(self) -> set[int]:
        """Producer ranks no rank of this node reads (their heads' copies
        are read from other producer ranks)."""
        producer_tp, consumer_tp = len(self.kv_ports), self.info.tp_size
        if producer_tp == consumer_tp:
            return set()
        total = self.info.total_kv_heads
        read = {
            s.producer_rank
            for rank in range(consumer_tp)
            for s in head_slices(total, producer_tp, consumer_tp, rank)
        }
        return set(range(producer_tp)) - read

    def _released_here(self) -> set[int]:
        """Unread producer ranks this rank releases leases on: vLLM frees a
        lease's blocks only once every producer rank has let go."""
        consumer_tp = self.info.tp_size
        return {p for p in self._unread() if p % consumer_tp == self.info.tp_rank}

    def _whole(self, remote: RankInfo) -> bool:
        if remote.tp_size == self.info.tp_size:
            return True
        heads = rank_heads(self.info.total_kv_heads, remote.tp_size, remote.tp_rank)
        return whole_blocks(self.slices, self.kv.num_heads, len(heads))

    def _pair(
        self, client: BlockingClient, remote: RankInfo, release_only: bool = False
    ) -> RankPair:
        whole = self._whole(remote)
        check_compatible(local=self.info, remote=remote, whole=whole)
        self._check_heads(remote)
        link = ProducerLink(
            self.host,
            client.port,
            self.kv,
            self.settings.transfer_timeout,
            self._secret,
            consumer_id=self.consumer_id,
        )
        if release_only:
            # No reads: no transport session (nor a GPU mapping) for it.
            return RankPair(remote, link, get_transport("tcp"), "", 1, 0, True, whole)
        transport, session = self._open_transport(client, remote, whole)
        readers = self._readers_of(remote.tp_rank)
        return RankPair(remote, link, transport, session, readers, whole=whole)

    def _check_heads(self, remote: RankInfo) -> None:
        """The producer rank holds as many heads as the mapping says: were
        vLLM to split heads otherwise, bytes would fit and heads be wrong."""
        if remote.tp_size == self.info.tp_size:
            return
        expected = len(
            rank_heads(self.info.total_kv_heads, remote.tp_size, remote.tp_rank)
        )
        for layer in remote.layers:
            if layer.head_dim < 0 or layer.shape[layer.head_dim] != expected:
                raise IncompatibleProducer(
                    f"producer rank {remote.tp_rank} layer {layer.name} holds "
                    f"{layer.shape} with heads in dim {layer.head_dim}; expected "
                    f"{expected} KV heads there"
                )

    def _readers_of(self, producer_rank: int) -> int:
        """How many of this node's ranks read ``producer_rank``: each
        releases its part of a lease there, the last one ends it."""
        consumer_tp, producer_tp = self.info.tp_size, len(self.kv_ports)
        if consumer_tp == producer_tp:
            return 1
        total = self.info.total_kv_heads
        return sum(
            any(
                s.producer_rank == producer_rank
                for s in head_slices(total, producer_tp, consumer_tp, rank)
            )
            for rank in range(consumer_tp)
        )

    def _open_transport(
        self, client: BlockingClient, remote: RankInfo, whole: bool
    ) -> tuple[KVTransport, str]:
        """The best transport both ranks can use; tcp if the others fail.
        Some heads of each block move over tcp only."""
        names = (
            candidates(
                self.settings.transport,
                self.info,
                remote,
                has_secret=self._secret is not None,
            )
            if whole
            else []
        )
        for name in names:
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
                self.setup_fallbacks += 1
        return get_transport("tcp"), ""

    @property
    def consumer_id(self) -> str:
        """Who this rank is to a producer: a new hello of the same id
        replaces the older session there."""
        return f"{self.settings.instance_id}/{self.info.tp_rank}"

    def client(self, rank: int, timeout: float) -> BlockingClient:
        return BlockingClient(self.host, self.kv_ports[rank], timeout, self._secret)

    # ---- reads ----

    def submit(self, spec: LoadSpec, deadline: float) -> int:
        """Start reading ``spec``'s blocks (one load per producer rank);
        returns how many loads were started."""
        for part in self.slices:
            pair = self.pairs[part.producer_rank]
            whole = pair.whole
            load = Load(
                spec,
                pair.transport,
                pair.session,
                deadline,
                remote_heads=None if whole else (part.remote_start, part.count),
                local_heads=None if whole else (part.local_start, part.count),
                releases_needed=pair.readers,
            )
            pair.link.submit(load)
        return len(self.slices)

    def release(self, lease: Lease) -> None:
        for pair in self.pairs.values():
            pair.link.release(lease, pair.readers)

    def flush_releases(self) -> list[Load]:
        """Send what links hold to release when no load is in flight on
        them (the watch thread: the engine may not step again after a
        request's last pull, or after handing back a lease)."""
        finished: list[Load] = []
        for pair in self.pairs.values():
            if pair.link.has_releases() and not pair.link.busy():
                finished += pair.link.pump()
        return finished

    def releasing(self) -> bool:
        """Whether a link still has releases to send (idle links only)."""
        return any(
            p.link.has_releases() and not p.link.busy() for p in self.pairs.values()
        )

    def release_unread(self, lease: Lease) -> None:
        """A pull of ``lease`` ended: the producer ranks it did not read
        from let go too (the ones it read were released by their loads)."""
        for pair in self.pairs.values():
            if pair.release_only:
                pair.link.release(lease, pair.readers)

    def pump(self) -> list[Load]:
        finished: list[Load] = []
        for pair in self.pairs.values():
            try:
                finished += pair.link.pump()
            except Exception as exc:  # never into vLLM's worker: recompute
                logger.exception("pdserve: KV link failed unexpectedly")
                self.stats.add("kv_connector_errors")
                finished += pair.link.close(f"unexpected error: {exc!r}")
        for pair in self.pairs.values():
            if not pair.release_only and not pair.transport.healthy(pair.session):
                self._fall_back_to_tcp(pair, "its session broke")
        return finished

    def busy(self) -> bool:
        return any(pair.link.busy() for pair in self.pairs.values())

    def close(self, reason: str) -> list[Load]:
        """Close every connection and session; the loads that were cut."""
        cut: list[Load] = []
        for pair in self.pairs.values():
            cut += pair.link.close(reason)
            pair.transport.drop_sessions()
        return cut

    # ---- transport failures ----

    def count_copy_failure(self, load: Load) -> None:
        """Another failed copy of a transport in use: give it up at the
        limit. Reads refused or timed out say nothing about the transport."""
        pair = self._pair_of(load)
        if pair is None or not load.transport_failed:
            return
        if pair.transport.name == "tcp":
            return  # nothing to fall back to
        pair.copy_failures += 1
        # A session the producer has dropped is dead at once.
        if pair.copy_failures >= COPY_FAILURES_BEFORE_FALLBACK or load.session_lost:
            self._fall_back_to_tcp(
                pair,
                f"{pair.copy_failures} copies in a row failed, the latest: "
                f"{load.error}",
            )

    def copy_succeeded(self, load: Load) -> None:
        pair = self._pair_of(load)
        if pair is not None:
            pair.copy_failures = 0

    def _pair_of(self, load: Load) -> RankPair | None:
        for pair in self.pairs.values():
            if pair.transport is load.transport:
                return pair
        return None

    def _fall_back_to_tcp(self, pair: RankPair, reason: str) -> None:
        logger.warning(
            "pdserve: KV transport %s to %s failed (%s); using tcp from now on",
            pair.transport.name,
            self,
            reason,
        )
        self.stats.add("kv_transport_fallbacks")
        pair.transport.drop_sessions()
        pair.transport, pair.session = get_transport("tcp"), ""
        pair.copy_failures = 0
