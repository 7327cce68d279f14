"""Worker half of the connector (runs in each TP rank's worker process).

Builds the rank's view of its paged KV and hands it to the producer or
consumer half (producer_rank.py / consumer_rank.py). Everything runs on the
engine's own thread, a little every step; no thread of ours moves KV.
"""

from __future__ import annotations

import torch

import pdserve
from pdserve.connector.consumer_rank import ConsumerRank
from pdserve.connector.metadata import PDServeMetadata
from pdserve.connector.producer_rank import ProducerRank
from pdserve.connector.stats import PDServeStats
from pdserve.identity import engine_identity
from pdserve.kv_cache import PagedKVCache, dtype_name
from pdserve.kv_layout import (
    KVLayout,
    check_page_bytes,
    describe_kv_layout,
    kernel_blocks_in,
)
from pdserve.lease import node_key
from pdserve.log import init_logger
from pdserve.settings import Settings, kv_secret
from pdserve.side_channel.protocol import RankInfo
from pdserve.transport import (
    TRANSPORT_NAMES,
    device_pci_bus_id,
    device_uuid,
    host_identity,
)

logger = init_logger(__name__)


class PDServeWorker:
    def __init__(
        self,
        settings: Settings,
        vllm_config,
        kv_cache_config,
        tp_rank: int,
    ) -> None:
        self.settings = settings
        self.vllm_config = vllm_config
        self.kv_cache_config = kv_cache_config
        self.num_blocks = kv_cache_config.num_blocks
        self.tp_rank = tp_rank
        self.kv: PagedKVCache | None = None
        self.layout = KVLayout()
        self.producer: ProducerRank | None = None
        self.consumer: ConsumerRank | None = None
        # Blocks of failed pulls, reported with (never after) their requests.
        self._failed_blocks: set[int] = set()

    def rank_info(self, kv: PagedKVCache) -> RankInfo:
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
            layers=kv.layer_infos(),
            transports=list(TRANSPORT_NAMES) if kv.device.type == "cuda" else ["tcp"],
            device=kv.device.type,
            device_uuid=device_uuid(kv.device),
            device_pci_bus_id=device_pci_bus_id(kv.device),
            host_id=host_identity(),
            instance_id=self.settings.instance_id,
            kv_layout=self.layout,
            total_kv_heads=_total_kv_heads(model_config),
            identity=engine_identity(model_config),
        )

    def view_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> PagedKVCache:
        """The rank's KV as vLLM's spec and layout describe it."""
        # vLLM's [B, H, N, C] layer views (it names the layout) lead with the
        # blocks; older releases hand over their backends' own shapes.
        named = getattr(self.kv_cache_config, "kv_cache_layout", None)
        block_dim = 0 if named else None
        spec = self.kv_cache_config.kv_cache_groups[0].kv_cache_spec
        first = next(iter(kv_caches.values()))
        k = kernel_blocks_in(first, self.num_blocks, spec.block_size, block_dim)
        kv = PagedKVCache(kv_caches, self.num_blocks, k, block_dim)
        self.layout = describe_kv_layout(self.vllm_config, self.kv_cache_config, k)
        check_page_bytes(
            self.layout, [kv.block_nbytes(i) for i in range(len(kv.layers))]
        )
        locate_heads(kv, spec, named=bool(named))
        return kv

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        self.kv = self.view_kv_caches(kv_caches)
        info = self.rank_info(self.kv)
        if self.settings.role == "producer":
            self.producer = ProducerRank(
                self.settings, self.kv, info, self.tp_rank, node_key(), kv_secret()
            )
        else:
            self.consumer = ConsumerRank(
                self.settings, self.kv, info, self.tp_rank, kv_secret()
            )
            self.consumer.connect()

    # ---- each engine step ----

    def start(self, meta: PDServeMetadata) -> None:
        if self.producer is not None:
            self.producer.start(meta.grants, meta.forward)
        if self.consumer is not None:
            self.consumer.start(meta.loads, meta.releases, meta.failed_loads)
            self.consumer.poll()

    def get_finished(self) -> tuple[set[str] | None, set[str] | None]:
        if self.producer is not None:
            return self.producer.finished() or None, None
        assert self.consumer is not None
        self.consumer.poll()
        done, failed = self.consumer.take_done()
        self._failed_blocks |= failed
        return None, done or None

    def take_failed_blocks(self) -> set[int]:
        failed, self._failed_blocks = self._failed_blocks, set()
        return failed

    def take_stats(self) -> PDServeStats | None:
        if self.consumer is not None:
            return self.consumer.take_stats()
        return self.producer.stats.take() if self.producer is not None else None

    def shutdown(self) -> None:
        for half in (self.producer, self.consumer):
            if half is not None:
                half.shutdown()


def locate_heads(kv: PagedKVCache, spec, named: bool) -> None:
    """Tell ``kv`` where its KV heads are, where that is certain: vLLM's
    [B, H, N, C] views (H after the blocks and their kernel blocks), older
    releases' [.., N, H, D] backend shapes. Packed head slots are not heads:
    such a rank moves whole blocks only (equal TP sizes)."""
    heads = int(getattr(spec, "num_kv_heads", 0) or 0)
    if not heads or getattr(spec, "num_head_slots", None) not in (None, heads):
        return
    split = 1 if kv.kernel_blocks > 1 else 0
    dims = [1 + split if named else layer.dim() - 2 for layer in kv.layers]
    try:
        kv.locate_heads(dims, heads)
    except ValueError as exc:
        logger.info("pdserve: KV heads not located (%s): whole blocks only", exc)


def _total_kv_heads(model_config) -> int:
    try:
        return int(model_config.get_total_num_kv_heads())
    except Exception:  # a model vLLM cannot say it of: no head slicing
        return 0


def _vllm_version() -> str:
    import vllm

    return vllm.__version__
