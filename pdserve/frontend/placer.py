"""Per request, on the consumer: prefill here or on a producer.

Ties the pieces together for the HTTP layer: the prompt's token ids as this
node's vLLM will see them (``prompt_tokens``), what this node's own prefix
cache holds of them (``PrefixIndex``, fed by vLLM's KV cache events), the
producers' load (``ProducerPool.saturated``), this node's own requests in
flight, and the measured cost model (``CostEstimator``). The decision itself
is ``placement.decide``.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from typing import Any

from pdserve.frontend.kv_events import KVEventSubscriber
from pdserve.frontend.kv_events_config import KVEventsSource
from pdserve.frontend.placement import CostEstimator, Decision, decide
from pdserve.frontend.prefix_index import PrefixIndex
from pdserve.frontend.prompt_tokens import prompt_token_ids
from pdserve.frontend.remote_prefill import multimodal
from pdserve.lease import Lease
from pdserve.log import init_logger
from pdserve.settings import Settings

logger = init_logger(__name__)

# Used until vLLM's config is at hand (the first request brings it).
DEFAULT_BLOCK_SIZE = 16


class Placer:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.estimator = CostEstimator(
            DEFAULT_BLOCK_SIZE, fixed_threshold=settings.local_prefill_max_tokens
        )
        self.index: PrefixIndex | None = None
        self._subscriber: KVEventSubscriber | None = None
        self._started = False
        self.inflight = 0  # requests this node serves now
        self.max_inflight = 0  # its engine's --max-num-seqs, once known
        self._transfers = TransferMeter(DEFAULT_BLOCK_SIZE)

    def _start(self, scope: dict) -> None:
        """On the first request: vLLM's app state is there by now."""
        self._started = True
        config = getattr(getattr(scope.get("app"), "state", None), "vllm_config", None)
        block_size = getattr(getattr(config, "cache_config", None), "block_size", None)
        if block_size:
            self.estimator = CostEstimator(
                int(block_size), fixed_threshold=self.settings.local_prefill_max_tokens
            )
            self._transfers = TransferMeter(int(block_size))
        scheduler = getattr(config, "scheduler_config", None)
        self.max_inflight = int(getattr(scheduler, "max_num_seqs", 0) or 0)
        if self.settings.kv_events:
            source = KVEventsSource.from_json(self.settings.kv_events)
            self.index = PrefixIndex(block_size)
            # Not waited for: its thread catches up by itself (replay).
            self._subscriber = KVEventSubscriber(
                self.index,
                source.endpoint,
                source.replay_endpoint,
                source.topic,
            ).start(wait=0)

    def close(self) -> None:
        if self._subscriber is not None:
            self._subscriber.close()

    @contextlib.contextmanager
    def serving(self) -> Iterator[None]:
        self.inflight += 1
        try:
            yield
        finally:
            self.inflight -= 1

    async def place(
        self, scope: dict, route: str, payload: dict[str, Any], saturated: bool
    ) -> tuple[Decision | None, list[int] | None]:
        """Where to prefill, and the prompt's token ids; (None, None) when the
        prompt is unknown (it goes to a producer)."""
        try:
            return await self._place(scope, route, payload, saturated)
        except Exception:  # a bug or an input nobody foresaw: go remote
            logger.exception("pdserve: placement failed; prefilling remotely")
            return None, None

    async def _place(
        self, scope: dict, route: str, payload: dict[str, Any], saturated: bool
    ) -> tuple[Decision | None, list[int] | None]:
        if not self._started:
            self._start(scope)
        if multimodal(payload):
            # Their inputs enter vLLM's block hashes, which the index cannot
            # reproduce; nor are they rendered twice (images fetched) for this.
            # (A LoRA adapter, chosen by ``model``, would match the base
            # model's blocks: a local prefill too many, never wrong KV.)
            return None, None
        if self.settings.local_prefill_max_tokens == 0 and not (
            saturated and self.inflight < self.max_inflight
        ):
            # No rule can keep it here: not worth rendering the prompt.
            return None, None
        ids = await prompt_token_ids(scope, route, payload)
        if ids is None:
            return None, None
        cached = 0
        salt = payload.get("cache_salt")
        if self.index is not None and (salt is None or isinstance(salt, str)):
            cached = self.index.cached_tokens(ids, salt)
        self._transfers.sample(self.estimator)
        decision = decide(
            len(ids),
            cached,
            # The others this node serves (this request counts in inflight).
            self.estimator.threshold(running=max(0, self.inflight - 1)),
            producers_saturated=saturated,
            inflight=self.inflight,
            max_inflight=self.max_inflight,
        )
        return decision, ids

    # ---- measurements ----

    def observe_remote(self, seconds: float, lease: Lease) -> None:
        self.estimator.observe_remote(
            seconds,
            lease.producer_queue_seconds,
            lease.producer_prefill_seconds,
            lease.num_prompt_tokens,
        )

    def timed_local(self, send: Any, new_tokens: int, streamed: bool) -> Any:
        """``send`` that measures a local prefill's time to first token: the
        first body chunk of a streamed answer (a buffered one arrives whole,
        after the decode)."""
        if not streamed:
            return send
        started = time.perf_counter()
        seen = False

        async def timed(message: dict) -> None:
            nonlocal seen
            if not seen and message["type"] == "http.response.body":
                if message.get("body"):
                    seen = True
                    self.estimator.observe_local(
                        new_tokens, time.perf_counter() - started
                    )
            await send(message)

        return timed


class TransferMeter:
    """The KV pull rate (seconds per token), from the engine's own transfer
    metrics in this process's Prometheus registry (the connector's stats
    land there): new pulls since the last sample, at most every
    ``every`` samples."""

    def __init__(self, block_size: int, every: int = 64) -> None:
        self.block_size = block_size
        self.every = every
        self._calls = 0
        self._seconds = 0.0
        self._blocks = 0.0

    def sample(self, estimator: CostEstimator) -> None:
        self._calls += 1
        if self._calls % self.every:
            return
        seconds = _registry_value("pdserve:kv_transfer_seconds_sum")
        blocks = _registry_value("pdserve:kv_blocks_received_total")
        if blocks > self._blocks and seconds >= self._seconds:
            tokens = int((blocks - self._blocks) * self.block_size)
            estimator.observe_transfer(tokens, seconds - self._seconds)
        self._seconds, self._blocks = seconds, blocks


def _registry_value(name: str) -> float:
    """The sum of a sample over every label set in the default registry."""
    from prometheus_client import REGISTRY

    total = 0.0
    for family in REGISTRY.collect():
        for sample in family.samples:
            if sample.name == name:
                total += sample.value
    return total
