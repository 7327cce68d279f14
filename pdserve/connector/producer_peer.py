"""One producer instance as a consumer rank sees it.

A producer is an address, its KV ports (one per producer TP rank) and its
instance id. The consumer rank reads its KV heads from the producer ranks
that hold them (``tp_mapping``): with equal TP sizes, whole blocks
from the rank of its own index over the best transport both can use; with
different TP sizes, a run of heads from each of one or more ranks, over tcp.
Which ranks it reads and which it only releases on is its ``TPPlan``,
computed once at pairing. Each such producer rank is a ``RankPair``: what
that rank is, its role in the plan, the transport and session, and the
side-channel link the reads and releases go on. When a lease's part ends is
the ``Pull``'s to decide (pull.py), never the peer's or a link's.
"""

from __future__ import annotations

from dataclasses import dataclass

from pdserve.connector.kv_client import BlockingClient, Load, LoadOwner, ProducerLink
from pdserve.connector.metadata import LoadSpec
from pdserve.connector.stats import PDServeStats
from pdserve.connector.tp_mapping import (
    RankRole,
    TPPlan,
    UnsupportedMapping,
    tp_plan,
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
    """This consumer rank and one producer rank it reads from or releases on."""

    remote: RankInfo
    link: ProducerLink
    transport: KVTransport
    session: str
    role: RankRole = RankRole(read=True, readers=1, whole=True, heads=None)
    copy_failures: int = 0  # in a row, of the current transport


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
        self.plan = TPPlan([], {})
        self.pairs: dict[int, RankPair] = {}
        # Transports given up while pairing (on a pairing thread): counted
        # into ``stats`` by the engine's thread when it takes the peer.
        self.setup_fallbacks = 0
        # Let go of (``close``): the producer still runs (evicted, shutting
        # down) or is ``gone`` (dead, or another instance now).
        self.closed = False
        self.gone = False

    @property
    def key(self) -> PeerKey:
        return self.host, tuple(self.kv_ports)

    def __repr__(self) -> str:
        return f"producer {self.host}:{self.kv_ports} (instance {self.instance_id})"

    # ---- pairing ----

    def open(self, timeout: float, first: RankInfo | None = None) -> None:
        """Pair with every producer rank this rank reads from or releases
        on. ``first``: the rank info of the producer rank of our index,
        already fetched. Raises IncompatibleProducer or OSError."""
        self.plan = self._plan()
        for rank in self.plan.ranks:
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
            self.pairs[rank] = self._pair(client, remote, self.plan.roles[rank])
        names = sorted({pair.transport.name for pair in self.pairs.values()})
        logger.info(
            "pdserve consumer rank %d paired with %s over %s (its ranks %s)",
            self.info.tp_rank,
            self,
            "/".join(names),
            sorted(self.pairs),
        )

    def _plan(self) -> TPPlan:
        producer_tp, consumer_tp = len(self.kv_ports), self.info.tp_size
        try:
            return tp_plan(
                self.info.total_kv_heads,
                producer_tp,
                consumer_tp,
                self.info.tp_rank,
                self.kv.num_heads,
            )
        except UnsupportedMapping as exc:
            raise IncompatibleProducer(
                f"producer TP {producer_tp}, consumer TP {consumer_tp}: {exc}"
            ) from exc

    def _pair(
        self, client: BlockingClient, remote: RankInfo, role: RankRole
    ) -> RankPair:
        check_compatible(local=self.info, remote=remote, whole=role.whole)
        _check_heads(remote, role)
        link = ProducerLink(
            self.host,
            client.port,
            self.kv,
            self.settings.transfer_timeout,
            self._secret,
            consumer_id=self.consumer_id,
        )
        if not role.read:
            # No reads: no transport session (nor a GPU mapping) for it.
            return RankPair(remote, link, get_transport("tcp"), "", role)
        transport, session = self._open_transport(client, remote, role.whole)
        return RankPair(remote, link, transport, session, role)

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

    def holds(self, block_ids: list[int]) -> bool:
        """Every producer rank has these blocks: a device copy would
        otherwise read past its cache."""
        last = max(block_ids, default=0)
        return all(last < pair.remote.num_blocks for pair in self.pairs.values())

    def submit(self, spec: LoadSpec, deadline: float, owner: LoadOwner) -> list[int]:
        """Start reading ``spec``'s blocks, one load per producer rank the
        plan reads; they report to ``owner``. The ranks read."""
        for part in self.plan.slices:
            pair = self.pairs[part.producer_rank]
            whole = pair.role.whole
            load = Load(
                spec,
                pair.transport,
                pair.session,
                deadline,
                remote_heads=None if whole else (part.remote_start, part.count),
                local_heads=None if whole else (part.local_start, part.count),
                releases_needed=pair.role.readers,
                producer_rank=part.producer_rank,
                owner=owner,
            )
            pair.link.submit(load)
        return [part.producer_rank for part in self.plan.slices]

    def release(self, lease: Lease, rank: int) -> None:
        """Let go of producer rank ``rank``'s part of ``lease`` (``Pull``
        decides when)."""
        pair = self.pairs[rank]
        pair.link.release(lease, pair.role.readers)

    def flush_releases(self) -> None:
        """Send what links hold to release when no load is in flight on
        them (the watch thread: the engine may not step again after a
        request's last pull, or after handing back a lease)."""
        for pair in self.pairs.values():
            if pair.link.has_releases() and not pair.link.busy():
                pair.link.pump()

    def releasing(self) -> bool:
        """Whether a link still has releases to send (idle links only)."""
        return any(
            p.link.has_releases() and not p.link.busy() for p in self.pairs.values()
        )

    def pump(self) -> None:
        """Advance every link; loads report their ends to their owners."""
        for pair in self.pairs.values():
            try:
                pair.link.pump()
            except Exception as exc:  # never into vLLM's worker: recompute
                logger.exception("pdserve: KV link failed unexpectedly")
                self.stats.add("kv_connector_errors")
                pair.link.close(f"unexpected error: {exc!r}")
        for pair in self.pairs.values():
            if pair.role.read and not pair.transport.healthy(pair.session):
                self._fall_back_to_tcp(pair, "its session broke")

    def busy(self) -> bool:
        return any(pair.link.busy() for pair in self.pairs.values())

    def close(self, reason: str, gone: bool = False) -> None:
        """Close every connection and session; the loads cut report to
        their owners, which let go elsewhere (``gone``: nowhere)."""
        self.closed, self.gone = True, gone
        for pair in self.pairs.values():
            pair.link.close(reason)
            pair.transport.drop_sessions()

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


def _check_heads(remote: RankInfo, role: RankRole) -> None:
    """The producer rank holds as many heads as the plan says: were vLLM to
    split heads otherwise, bytes would fit and heads be wrong."""
    if role.heads is None:
        return
    for layer in remote.layers:
        if layer.head_dim < 0 or layer.shape[layer.head_dim] != role.heads:
            raise IncompatibleProducer(
                f"producer rank {remote.tp_rank} layer {layer.name} holds "
                f"{layer.shape} with heads in dim {layer.head_dim}; expected "
                f"{role.heads} KV heads there"
            )
