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
    "kv_transport_fallbacks": "KV transports given up: at handshake (the next "
    "tried) or later, broken or failing copies (tcp used from then on).",
    "kv_leases_refused": "Leases not loaded: not signed by this node, malformed, or "
    "for inputs the fingerprint does not cover.",
    "kv_leases_withheld": "Prefills not leased (the consumer prefilled locally): "
    "leased blocks at their cap, inputs the fingerprint does not cover, or a "
    "request id past the lease's bounds.",
    "kv_reads_refused": "Reads refused: unknown or ended lease, bad block ids.",
    "kv_connector_errors": "Unexpected connector errors (prompt prefilled locally).",
    "kv_tickets_expired": "Requests admitted before their lease whose answer never "
    "came by their deadline (prefilled locally).",
    "first_tokens_from_producer": "Requests whose first token the consumer emitted "
    "from the producer's lease (no consumer forward before it).",
}

# Counters with one label: name -> (label, help).
LABELED_COUNTERS = {
    "first_token_fallbacks": (
        "reason",
        "Leased requests that took the path where the consumer computes the first "
        "token itself, by reason (a feature the model runner cannot continue from "
        "the producer's token exactly, no first token in the lease, ...).",
    ),
    "kv_pairings": (
        "transport",
        "Producer ranks a consumer rank paired with to read KV from (again for "
        "a new producer instance), by the transport agreed at pairing.",
    ),
}


# Seconds per request; the ttft_* ones split a remote prefill's time to first
# token on the consumer (the producer's share is measured by the HTTP layer).
HISTOGRAMS = {
    "kv_transfer_seconds": "Time to pull one request's KV from the producer.",
    "ttft_consumer_queue_seconds": "TTFT phase: consumer engine arrival to the "
    "pull scheduled (its blocks allocated).",
    "ttft_transfer_wait_seconds": "TTFT phase: pull scheduled to the producer's "
    "answer (worker pickup, read round trip).",
    "ttft_transfer_copy_seconds": "TTFT phase: producer's answer to the KV in "
    "the consumer's blocks.",
    "ttft_first_token_seconds": "TTFT phase: KV in place to the consumer's "
    "first-token step done (requests whose first token the consumer computes).",
    "ttft_consumer_frontend_in_seconds": "The consumer's HTTP layer handing a "
    "request to its vLLM handler, to the request reaching the engine (the "
    "handler's work, the hop to the engine core). Admitted while the producer "
    "prefills, this overlaps the producer call: not on the TTFT path then.",
    "ttft_lease_delivery_seconds": "TTFT phase: the consumer's HTTP layer sending "
    "the producer's answer to its engine, to the engine taking it.",
    "ttft_consumer_admission_seconds": "TTFT phase: the producer's first token "
    "known to the consumer engine, to its output (the request's admission: "
    "blocks allocated, its pull started).",
}

# Counts of consumer engine steps per request (a step: one schedule() call).
STEP_HISTOGRAMS = {
    "engine_steps_to_first_token": "Consumer engine steps from a leased request's "
    "arrival in the engine to its first token's output.",
    "engine_steps_to_second_token": "Consumer engine steps from a leased request's "
    "arrival in the engine to its second token's output.",
}
STEP_BUCKETS = [0, 1, 2, 3, 4, 5, 6, 8, 10, 15, 20, 50]
BUCKETS = [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5]
_HISTOGRAM_TABLES = ((HISTOGRAMS, BUCKETS), (STEP_HISTOGRAMS, STEP_BUCKETS))


@dataclass
class PDServeStats(KVConnectorStats):
    def __post_init__(self) -> None:
        if not self.data:
            self.reset()

    def reset(self) -> None:
        self.data = (
            {name: 0 for name in COUNTERS}
            | {name: {} for name in LABELED_COUNTERS}
            | {name: [] for name in (*HISTOGRAMS, *STEP_HISTOGRAMS)}
        )

    def add(self, name: str, value: int = 1) -> None:
        self.data[name] += value

    def add_labeled(self, name: str, label: str, value: int = 1) -> None:
        counts = self.data[name]
        counts[label] = counts.get(label, 0) + value

    def observe(self, name: str, seconds: float) -> None:
        self.data[name].append(seconds)

    def aggregate(self, other: KVConnectorStats) -> PDServeStats:
        for name in COUNTERS:
            self.data[name] += other.data.get(name, 0)
        for name in LABELED_COUNTERS:
            for label, value in other.data.get(name, {}).items():
                self.add_labeled(name, label, value)
        for name in (*HISTOGRAMS, *STEP_HISTOGRAMS):
            self.data[name] += other.data.get(name, [])
        return self

    def reduce(self) -> dict[str, int | float]:
        reduced: dict[str, int | float] = {n: self.data[n] for n in COUNTERS}
        for name in LABELED_COUNTERS:
            reduced[name] = sum(self.data[name].values())
        for name in (*HISTOGRAMS, *STEP_HISTOGRAMS):
            values = self.data[name]
            reduced[name + "_avg"] = sum(values) / len(values) if values else 0
        return reduced

    def is_empty(self) -> bool:
        names = (*COUNTERS, *LABELED_COUNTERS, *HISTOGRAMS, *STEP_HISTOGRAMS)
        return not any(self.data[name] for name in names)

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
        self.labeled = {
            name: self._counter_cls(
                name=f"pdserve:{name}",
                documentation=doc,
                labelnames=[*labelnames, label],
            )
            for name, (label, doc) in LABELED_COUNTERS.items()
        }
        self._engine_labels = per_engine_labelvalues
        self.histograms = {
            name: create_metric_per_engine(
                self._histogram_cls(
                    name=f"pdserve:{name}",
                    documentation=doc,
                    buckets=buckets,
                    labelnames=labelnames,
                ),
                per_engine_labelvalues,
            )
            for table, buckets in (
                (HISTOGRAMS, BUCKETS),
                (STEP_HISTOGRAMS, STEP_BUCKETS),
            )
            for name, doc in table.items()
        }

    def observe(self, transfer_stats_data: dict[str, Any], engine_idx: int = 0) -> None:
        for name, counter in self.counters.items():
            if value := transfer_stats_data.get(name, 0):
                counter[engine_idx].inc(value)
        for name, counter in self.labeled.items():
            for label, value in transfer_stats_data.get(name, {}).items():
                engine = self._engine_labels[engine_idx]
                counter.labels(*engine, label).inc(value)
        for name, histogram in self.histograms.items():
            for value in transfer_stats_data.get(name, []):
                histogram[engine_idx].observe(value)
