"""pdserve's vLLM V1 KV connector, loaded through ``kv_connector_module_path``.

It only routes vLLM's calls to the scheduler half or the worker half.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
)
from vllm.distributed.parallel_state import get_tensor_model_parallel_rank

from pdserve.connector.metadata import PDServeMetadata
from pdserve.connector.scheduler import SchedulerHalf
from pdserve.connector.scheduler_role import scheduler_half
from pdserve.connector.stats import PDServePromMetrics, PDServeStats
from pdserve.connector.worker import PDServeWorker
from pdserve.lease import node_key
from pdserve.settings import Settings

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.request import Request

try:  # vLLM >= 0.26 labels external hits by source.
    from vllm.v1.metrics.cache_hit_source import CacheHitSource
except ImportError:  # pragma: no cover - older vLLM
    CacheHitSource = None


class PDServeConnector(KVConnectorBase_V1):
    if CacheHitSource is not None:
        _cache_hit_source = CacheHitSource.P2P

    def __init__(
        self,
        vllm_config: VllmConfig,
        role: KVConnectorRole,
        kv_cache_config: Any = None,
    ) -> None:
        super().__init__(vllm_config, role, kv_cache_config)
        transfer_config = vllm_config.kv_transfer_config
        assert transfer_config is not None
        settings = Settings.from_extra_config(transfer_config.kv_connector_extra_config)
        if len(kv_cache_config.kv_cache_groups) != 1:
            raise ValueError(
                "pdserve supports models with a single KV cache group "
                f"(full attention); this one has {len(kv_cache_config.kv_cache_groups)}"
            )
        self._scheduler: SchedulerHalf | None = None
        self._worker: PDServeWorker | None = None
        if role == KVConnectorRole.SCHEDULER:
            self._scheduler = scheduler_half(
                settings,
                vllm_config.cache_config.block_size,
                node_key(),
                num_blocks=kv_cache_config.num_blocks,
            )
        else:
            self._worker = PDServeWorker(
                settings,
                vllm_config,
                kv_cache_config,
                get_tensor_model_parallel_rank(),
            )

    @property
    def scheduler(self) -> SchedulerHalf:
        assert self._scheduler is not None
        return self._scheduler

    @property
    def worker(self) -> PDServeWorker:
        assert self._worker is not None
        return self._worker

    # ---- worker side ----

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        self.worker.register_kv_caches(kv_caches)

    def start_load_kv(self, forward_context: Any, **kwargs: Any) -> None:
        meta = self._get_connector_metadata()
        assert isinstance(meta, PDServeMetadata)
        self.worker.start(meta)

    def wait_for_layer_load(self, layer_name: str) -> None:
        return

    def save_kv_layer(
        self, layer_name: str, kv_layer: torch.Tensor, attn_metadata: Any, **kwargs: Any
    ) -> None:
        return

    def wait_for_save(self) -> None:
        return

    def get_finished(
        self, finished_req_ids: set[str]
    ) -> tuple[set[str] | None, set[str] | None]:
        return self.worker.get_finished()

    def get_block_ids_with_load_errors(self) -> set[int]:
        return self.worker.take_failed_blocks()

    def get_kv_connector_stats(self) -> PDServeStats | None:
        if self._scheduler is not None:
            return self._scheduler.take_stats()
        return self.worker.take_stats()

    def shutdown(self) -> None:
        for half in (self._worker, self._scheduler):
            if half is not None:
                half.shutdown()

    # ---- scheduler side ----

    def get_num_new_matched_tokens(
        self, request: Request, num_computed_tokens: int
    ) -> tuple[int, bool]:
        return self.scheduler.get_num_new_matched_tokens(request, num_computed_tokens)

    def update_state_after_alloc(
        self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int
    ) -> None:
        self.scheduler.update_state_after_alloc(request, blocks, num_external_tokens)

    def build_connector_meta(
        self, scheduler_output: SchedulerOutput
    ) -> KVConnectorMetadata:
        return self.scheduler.build_connector_meta(scheduler_output)

    def update_connector_output(self, connector_output: Any) -> None:
        self.scheduler.update_connector_output(connector_output)

    def request_finished(
        self, request: Request, block_ids: list[int]
    ) -> tuple[bool, dict[str, Any] | None]:
        return self.scheduler.request_finished(request, block_ids)

    # ---- metrics, in the API server process ----

    @classmethod
    def build_kv_connector_stats(
        cls, data: dict[str, Any] | None = None
    ) -> PDServeStats | None:
        return PDServeStats(data=data) if data is not None else PDServeStats()

    @classmethod
    def build_prom_metrics(
        cls,
        vllm_config: VllmConfig,
        metric_types: dict,
        labelnames: list[str],
        per_engine_labelvalues: dict[int, list[object]],
    ) -> PDServePromMetrics:
        return PDServePromMetrics(
            vllm_config, metric_types, labelnames, per_engine_labelvalues
        )
