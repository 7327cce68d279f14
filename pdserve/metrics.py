"""Metrics of the consumer's request flow, served on vLLM's ``/metrics``.

Transfer metrics (bytes, blocks, load failures) come from the engine through
the connector's stats; these count what the HTTP layer decides.
"""

from prometheus_client import Counter, Histogram

REMOTE_PREFILLS = Counter(
    "pdserve:remote_prefills",
    "Requests whose prompt a producer prefilled, by producer (ADDRESS:PORT; "
    "a producer's series goes when it leaves the pool).",
    ["producer"],
)
PRODUCER_FAILOVERS = Counter(
    "pdserve:producer_failovers",
    "Prefills a producer failed (timeout, unreachable, 5xx), after which the "
    "request tried the next producer, or prefilled locally if none was left.",
    ["reason"],
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
    "Leases the HTTP layer handed to its engine to release: request rejected "
    "or client gone.",
    ["reason"],
)
CLIENT_KV_PARAMS_STRIPPED = Counter(
    "pdserve:client_kv_params_stripped",
    "Client requests whose kv_transfer_params the consumer removed: only the "
    "HTTP layer's own lease may reach the engine.",
)

# The producer's share of a remote prefill's time to first token, split.
_TTFT_BUCKETS = [
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1,
    2.5,
    5,
]
TTFT_HTTP_IN = Histogram(
    "pdserve:ttft_http_in_seconds",
    "TTFT phase: the request reaching the consumer's HTTP layer to its call to "
    "a producer (body, placement, rendering and tokenization).",
    buckets=_TTFT_BUCKETS,
)
TTFT_PRODUCER_CALL = Histogram(
    "pdserve:ttft_producer_call_seconds",
    "TTFT phase: the consumer's call to the producer until the producer engine "
    "queues it (the call out, the producer's HTTP layer and frontend).",
    buckets=_TTFT_BUCKETS,
)
TTFT_ANSWER_BACK = Histogram(
    "pdserve:ttft_answer_back_seconds",
    "TTFT phase: the producer issuing the lease to the consumer's HTTP layer "
    "holding it (the producer's frontend out, the answer's way back).",
    buckets=_TTFT_BUCKETS,
)
TTFT_PRODUCER_QUEUE = Histogram(
    "pdserve:ttft_producer_queue_seconds",
    "TTFT phase: the prefill waiting in the producer engine's queue.",
    buckets=_TTFT_BUCKETS,
)
TTFT_PRODUCER_PREFILL = Histogram(
    "pdserve:ttft_producer_prefill_seconds",
    "TTFT phase: the producer engine's prefill, first step to lease.",
    buckets=_TTFT_BUCKETS,
)
TTFT_HTTP = Histogram(
    "pdserve:ttft_http_seconds",
    "Time to first token as the consumer's HTTP layer sees it: the request "
    "reaching it to the first streamed event sent (remote prefills).",
    buckets=_TTFT_BUCKETS,
)
SECOND_TOKEN = Histogram(
    "pdserve:second_token_seconds",
    "The gap between a streamed remote prefill's first and second events, as "
    "the consumer's HTTP layer sends them (the KV pull and the consumer's "
    "first step on it lie here when the first token is the producer's).",
    buckets=_TTFT_BUCKETS,
)
