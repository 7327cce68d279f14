"""Worker half of the connector (runs in each TP rank's worker process).

Producer rank: serve the KV of leased blocks on its side-channel port and
tell vLLM when a lease ended. Consumer rank: pull its shard from the same
rank of the producer in background threads, then release the lease.
"""

from __future__ import annotations

import threading
import time

import torch

import pdserve
from pdserve.connector.kv_client import ProducerClients
from pdserve.connector.kv_server import KVServer
from pdserve.connector.leases import LeaseTable
from pdserve.connector.metadata import LeaseRef, LoadSpec, PDServeMetadata
from pdserve.connector.stats import PDServeStats
from pdserve.handshake import check_compatible, wait_for_rank_info
from pdserve.kv_cache import PagedKVCache, dtype_name
from pdserve.log import init_logger
from pdserve.protocol import RankInfo
from pdserve.settings import Settings, kv_secret
from pdserve.threads import hand_off_gil, thread_pool, wait_until
from pdserve.transport import (
    TRANSPORT_NAMES,
    TransportUnavailable,
    candidates,
    device_uuid,
    get_transport,
    host_identity,
)

logger = init_logger(__name__)

LOAD_THREADS = 4
# Longest an engine step of a CPU worker waits for transfers to finish.
CPU_TRANSFER_WAIT_SECONDS = 0.05


class PDServeWorker:
    def __init__(
        self,
        settings: Settings,
        vllm_config,
        num_blocks: int,
        tp_rank: int,
    ) -> None:
        self.settings = settings
        self.vllm_config = vllm_config
        self.num_blocks = num_blocks
        self.tp_rank = tp_rank
        # The consumer picks its transport at the handshake; tcp until then.
        self.transport = get_transport("tcp")
        self.session = ""
        self.kv: PagedKVCache | None = None
        self.server: KVServer | None = None
        self.leases = LeaseTable(settings.lease_seconds)
        self._secret = kv_secret()
        self.clients = ProducerClients(settings.transfer_timeout, self._secret)
        self._pool = thread_pool(LOAD_THREADS, "pdserve-load")
        self._lock = threading.Lock()
        self._done_loads: set[str] = set()
        # Loads and releases submitted to the pool and not finished yet.
        self._in_flight = 0
        self._failed_blocks: set[int] = set()
        self._stats = PDServeStats()

    def rank_info(self) -> RankInfo:
        assert self.kv is not None
        model_config = self.vllm_config.model_config
        return RankInfo(
            pdserve_version=pdserve.__version__,
            protocol_version=pdserve.PROTOCOL_VERSION,
            vllm_version=_vllm_version(),
            model=self.settings.model,
            dtype=dtype_name(model_config.dtype),
            tp_size=self.vllm_config.parallel_config.tensor_parallel_size,
            tp_rank=self.tp_rank,
            block_size=self.vllm_config.cache_config.block_size,
            kv_cache_dtype=str(self.vllm_config.cache_config.cache_dtype),
            num_blocks=self.num_blocks,
            layers=self.kv.layer_infos(),
            transports=self.served_transports(),
            device=self.kv.device.type,
            device_uuid=device_uuid(self.kv.device),
            host_id=host_identity(),
        )

    def served_transports(self) -> list[str]:
        assert self.kv is not None
        if self.kv.device.type == "cuda":
            return list(TRANSPORT_NAMES)
        return ["tcp"]

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        self.kv = PagedKVCache(kv_caches, self.num_blocks)
        info = self.rank_info()
        if self.settings.role == "producer":
            port = self.settings.kv_ports[self.tp_rank]
            transports = {name: get_transport(name) for name in info.transports}
            self.server = KVServer(
                self.settings.kv_host,
                port,
                self.kv,
                info,
                self.leases,
                transports,
                secret=self._secret,
            )
            logger.info(
                "pdserve producer rank %d serves KV on port %d (%d layers, %d B/block, "
                "KV secret %s)",
                self.tp_rank,
                self.server.port,
                len(self.kv.layers),
                self.kv.bytes_per_block(),
                "required" if self._secret else "off",
            )
            return
        host = self.settings.producer_kv_host
        assert host is not None
        port = self.settings.producer_kv_ports[self.tp_rank]
        remote = wait_for_rank_info(
            self.clients.get(host, port), self.settings.connect_timeout
        )
        check_compatible(local=info, remote=remote)
        self._open_transport(self.clients.get(host, port), info, remote)
        logger.info(
            "pdserve consumer rank %d paired with producer %s:%d over %s",
            self.tp_rank,
            host,
            port,
            self.transport.name,
        )

    def _open_transport(self, client, local: RankInfo, remote: RankInfo) -> None:
        """The best transport both ranks can use; tcp if the others fail."""
        assert self.kv is not None
        for name in candidates(self.settings.transport, local, remote):
            transport = get_transport(name)
            try:
                self.session = transport.open_session(client, self.kv, remote)
            except (TransportUnavailable, OSError, RuntimeError) as exc:
                logger.warning(
                    "pdserve: KV transport %s unavailable (%s); trying the next",
                    name,
                    exc,
                )
                self._stats.add("kv_transport_fallbacks")
                continue
            self.transport = transport
            return

    # ---- each engine step ----

    def start(self, meta: PDServeMetadata) -> None:
        for grant in meta.grants:
            self.leases.grant(grant.request_id, grant.block_ids, grant.token)
        for load in meta.loads:
            self._submit(self._load, load)
        for lease in meta.releases:
            self._submit(self._release, lease)

    def _submit(self, work, item) -> None:
        with self._lock:
            self._in_flight += 1

        def run() -> None:
            try:
                work(item)
            finally:
                with self._lock:
                    self._in_flight -= 1

        self._pool.submit(run)

    def _on_cpu(self) -> bool:
        return self.kv is not None and self.kv.device.type == "cpu"

    def _transfers_busy(self) -> bool:
        if self.server is not None and self.server.is_busy():
            return True
        return self._in_flight > 0

    def _let_transfers_run(self) -> None:
        """vLLM's CPU worker keeps the GIL between steps (its main thread
        spins, waiting for the next one), so transfer threads only run while
        this thread waits here: until they are done, within a bound; or, on a
        producer holding leases, briefly, for a read that may be arriving.
        A GPU worker waits on the device and lets them run by itself."""
        if not self._on_cpu():
            return
        if self._transfers_busy():
            wait_until(lambda: not self._transfers_busy(), CPU_TRANSFER_WAIT_SECONDS)
        elif self.server is not None and len(self.leases):
            hand_off_gil()

    def get_finished(self) -> tuple[set[str] | None, set[str] | None]:
        self._let_transfers_run()
        if self.settings.role == "producer":
            finished, expired = self.leases.pop_finished()
            if expired:
                logger.warning("pdserve: %d KV leases expired unread", expired)
                self._stats.add("kv_leases_expired", expired)
            if released := self.leases.take_released():
                self._stats.add("kv_leases_released", released)
            if self.server is not None and (sent := self.server.take_bytes_sent()):
                self._stats.add("kv_bytes_sent", sent)
            return finished or None, None
        with self._lock:
            done, self._done_loads = self._done_loads, set()
        return None, done or None

    def take_failed_blocks(self) -> set[int]:
        with self._lock:
            failed, self._failed_blocks = self._failed_blocks, set()
        return failed

    def take_stats(self) -> PDServeStats | None:
        with self._lock:
            return self._stats.take()

    # ---- background ----

    def _client_for(self, lease: LeaseRef):
        return self.clients.get(lease.host, lease.ports[self.tp_rank])

    def _load(self, load: LoadSpec) -> None:
        assert self.kv is not None
        start = time.perf_counter()
        logger.debug(
            "pdserve: pulling %d blocks for %s",
            len(load.local_block_ids),
            load.request_id,
        )
        try:
            nbytes = self._client_for(load.lease).read(
                self.transport,
                self.kv,
                load.lease.request_id,
                load.lease.token,
                load.remote_block_ids,
                load.local_block_ids,
                self.session,
            )
        except Exception as exc:
            logger.warning(
                "pdserve: pulling KV for %s failed (%s); recomputing locally",
                load.request_id,
                exc,
            )
            with self._lock:
                self._failed_blocks.update(load.local_block_ids)
                self._stats.add("kv_load_failures")
                self._done_loads.add(load.request_id)
            self._release(load.lease)
            return
        seconds = time.perf_counter() - start
        with self._lock:
            self._stats.add("kv_loads")
            self._stats.add("kv_bytes_received", nbytes)
            self._stats.add("kv_blocks_received", len(load.local_block_ids))
            self._stats.data["kv_transfer_seconds"].append(seconds)
            self._done_loads.add(load.request_id)
        self._release(load.lease)

    def _release(self, lease: LeaseRef) -> None:
        try:
            self._client_for(lease).release(lease.request_id, lease.token)
        except Exception as exc:
            # The lease still ends when it expires on the producer.
            logger.warning(
                "pdserve: releasing lease %s failed: %s", lease.request_id, exc
            )

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        if self.server is not None:
            self.server.close()
        self.clients.close()


def _vllm_version() -> str:
    import vllm

    return vllm.__version__
