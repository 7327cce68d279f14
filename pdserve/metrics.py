"""Metrics of the consumer's request flow, served on vLLM's ``/metrics``.

Transfer metrics (bytes, blocks, load failures) come from the engine through
the connector's stats; these count what the HTTP layer decides.
"""

from prometheus_client import Counter, Histogram

REMOTE_PREFILLS = Counter(
    "pdserve:remote_prefills",
    "Requests whose prompt the producer prefilled.",
)
LOCAL_PREFILLS = Counter(
    "pdserve:local_prefills",
    "Requests the consumer prefilled itself, by reason.",
    ["reason"],
)
REMOTE_PREFILL_SECONDS = Histogram(
    "pdserve:remote_prefill_seconds",
    "Time from sending a request to the producer to holding its KV lease.",
    buckets=[0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30],
)
LEASES_RELEASED = Counter(
    "pdserve:leases_released_by_frontend",
    "Producer leases released by the HTTP layer: request rejected or client gone.",
    ["reason"],
)
