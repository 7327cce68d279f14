"""Transfer statistics: collected in the engine, exported on ``/metrics``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from vllm.distributed.kv_transfer.kv_connector.v1.metrics import (
    KVConnectorPromMetrics,
    KVConnectorStats,
)
from vllm.v1.metrics.utils import create_metric_per_engine

COUNTERS = {
    "kv_bytes_received": "KV cache bytes pulled from the producer.",
    "kv_blocks_received": "KV cache blocks pulled from the producer.",
    "kv_loads": "Requests whose prompt KV was pulled from the producer.",
    "kv_load_failures": "KV pulls that failed; the consumer recomputed the prompt.",
    "kv_prompt_mismatches": "Producer KV refused: it was computed for other tokens.",
    "kv_bytes_sent": "KV cache bytes sent to consumers.",
    "kv_leases_expired": "Producer leases that ended by timeout, not release.",
    "kv_leases_released": "Producer leases that consumers released (read or given up).",
    "kv_transport_fallbacks": "KV transports that failed at handshake (next tried).",
}


@dataclass
class PDServeStats(KVConnectorStats):
    def __post_init__(self) -> None:
        if not self.data:
            self.reset()

    def reset(self) -> None:
        self.data = {name: 0 for name in COUNTERS} | {"kv_transfer_seconds": []}

    def add(self, name: str, value: int = 1) -> None:
        self.data[name] += value

    def aggregate(self, other: KVConnectorStats) -> PDServeStats:
        for name in COUNTERS:
            self.data[name] += other.data.get(name, 0)
        self.data["kv_transfer_seconds"] += other.data.get("kv_transfer_seconds", [])
        return self

    def reduce(self) -> dict[str, int | float]:
        seconds = self.data["kv_transfer_seconds"]
        reduced: dict[str, int | float] = {n: self.data[n] for n in COUNTERS}
        reduced["kv_transfer_seconds_avg"] = (
            sum(seconds) / len(seconds) if seconds else 0
        )
        return reduced

    def is_empty(self) -> bool:
        return not self.data["kv_transfer_seconds"] and not any(
            self.data[name] for name in COUNTERS
        )

    def take(self) -> PDServeStats | None:
        """Hand over what was collected since the last call, or None."""
        if self.is_empty():
            return None
        taken = PDServeStats(data=self.data)
        self.reset()
        return taken


class PDServePromMetrics(KVConnectorPromMetrics):
    def __init__(
        self,
        vllm_config: Any,
        metric_types: dict,
        labelnames: list[str],
        per_engine_labelvalues: dict[int, list[object]],
    ) -> None:
        super().__init__(vllm_config, metric_types, labelnames, per_engine_labelvalues)
        self.counters = {
            name: create_metric_per_engine(
                self._counter_cls(
                    name=f"pdserve:{name}", documentation=doc, labelnames=labelnames
                ),
                per_engine_labelvalues,
            )
            for name, doc in COUNTERS.items()
        }
        self.transfer_seconds = create_metric_per_engine(
            self._histogram_cls(
                name="pdserve:kv_transfer_seconds",
                documentation="Time to pull one request's KV from the producer.",
                buckets=[0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5],
                labelnames=labelnames,
            ),
            per_engine_labelvalues,
        )

    def observe(self, transfer_stats_data: dict[str, Any], engine_idx: int = 0) -> None:
        for name, counter in self.counters.items():
            if value := transfer_stats_data.get(name, 0):
                counter[engine_idx].inc(value)
        for seconds in transfer_stats_data.get("kv_transfer_seconds", []):
            self.transfer_seconds[engine_idx].observe(seconds)
