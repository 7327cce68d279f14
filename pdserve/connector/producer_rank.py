"""A producer TP rank: serves its shard of leased KV, tells vLLM when a
lease has ended so the blocks can be freed."""

from __future__ import annotations

from pdserve.connector.cpu_pacing import pace
from pdserve.connector.metadata import LeaseGrant
from pdserve.connector.stats import PDServeStats
from pdserve.kv_cache import PagedKVCache
from pdserve.log import init_logger
from pdserve.settings import Settings
from pdserve.side_channel.leases import LeaseTable
from pdserve.side_channel.protocol import RankInfo
from pdserve.side_channel.server import KVServer
from pdserve.timing import PRODUCER_IDLE_SECONDS
from pdserve.transport import get_transport

logger = init_logger(__name__)


class ProducerRank:
    def __init__(
        self,
        settings: Settings,
        kv: PagedKVCache,
        info: RankInfo,
        tp_rank: int,
        node_key: bytes,
        secret: bytes | None,
    ) -> None:
        self.leases = LeaseTable(settings.lease_seconds)
        self.server = KVServer(
            settings.kv_host,
            settings.kv_ports[tp_rank],
            kv,
            info,
            self.leases,
            {name: get_transport(name) for name in info.transports},
            node_key=node_key,
            secret=secret,
        )
        self.stats = PDServeStats()
        self._forward = True  # whether the current step runs a forward
        logger.info(
            "pdserve producer rank %d serves KV on port %d (%d layers, %d B/block, "
            "KV secret %s; %s)",
            tp_rank,
            self.server.port,
            len(kv.layers),
            kv.bytes_per_block(),
            "required" if secret else "off",
            info.kv_layout,
        )

    def start(self, grants: list[LeaseGrant], forward: bool = True) -> None:
        self._forward = forward
        for grant in grants:
            self.leases.grant(grant.request_id, grant.block_ids, grant.prompt_hash)

    def finished(self) -> set[str]:
        """Serve what can be served now; the requests whose leases ended."""
        try:
            self.server.step()
        except Exception:  # never into vLLM's worker: the leases expire
            logger.exception("pdserve: KV server step failed")
            self.stats.add("kv_connector_errors")
        if not self._forward and self.server.is_idle():
            # A step with nothing to compute or serve on this rank: it runs
            # because some rank holds a lease (any rank's lease keeps the
            # whole engine stepping), so every rank paces, not only the
            # ones holding leases. A rank that spun here starved the
            # consumer's engine on its core until the other ranks' leases
            # expired (test_tensor_parallel, two TP 2 nodes on two cores).
            pace(self.server.kv.device, PRODUCER_IDLE_SECONDS)
        finished, expired = self.leases.pop_finished()
        if expired:
            logger.warning("pdserve: %d KV leases expired unread", expired)
            self.stats.add("kv_leases_expired", expired)
        if released := self.leases.take_released():
            self.stats.add("kv_leases_released", released)
        sent, refused = self.server.take_counters()
        if sent:
            self.stats.add("kv_bytes_sent", sent)
        if refused:
            self.stats.add("kv_reads_refused", refused)
        return finished

    def shutdown(self) -> None:
        self.server.close()
