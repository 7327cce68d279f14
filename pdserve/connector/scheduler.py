"""Scheduler half of the connector (runs in vLLM's engine-core process),
split by role as the worker half is: ``producer_scheduler`` keeps a finished
prefill's blocks and hands out a lease; ``consumer_scheduler`` checks a
request's lease and has the workers pull the KV. What both share is here:
the metadata handed to the workers each step, stats and the TTFT clock, and
the rule that nothing raises into vLLM's scheduler.

Request fields are untrusted: each entry point parses them once into a
typed struct and treats anything else as "prefill locally".
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

from pdserve.connector.metadata import PDServeMetadata
from pdserve.connector.phases import PhaseClock
from pdserve.connector.stats import PDServeStats
from pdserve.log import init_logger
from pdserve.settings import Settings

if TYPE_CHECKING:
    from vllm.v1.core.sched.output import SchedulerOutput

logger = init_logger(__name__)
T = TypeVar("T")


def never_raises(default: Any) -> Callable[[Callable[..., T]], Callable[..., T]]:
    """Last line of defence: a bug or an input nobody foresaw must cost a
    local prefill, not vLLM's engine."""

    def wrap(method: Callable[..., T]) -> Callable[..., T]:
        @functools.wraps(method)
        def guarded(self: SchedulerHalf, *args: Any) -> T:
            try:
                return method(self, *args)
            except Exception:
                logger.exception("pdserve: %s failed; falling back", method.__name__)
                self._stats.add("kv_connector_errors")
                return default

        return guarded

    return wrap


class SchedulerHalf:
    """What the producer's and the consumer's scheduler halves share."""

    def __init__(
        self,
        settings: Settings,
        block_size: int,
        node_key: bytes,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
        self.block_size = block_size
        self._key = node_key
        self._meta = PDServeMetadata()
        self._stats = PDServeStats()
        self._now = clock
        self._clock = PhaseClock(self._stats, clock)

    def build_connector_meta(
        self, scheduler_output: SchedulerOutput
    ) -> PDServeMetadata:
        self._step_clock(scheduler_output)
        meta, self._meta = self._meta, PDServeMetadata()
        meta.forward = scheduler_output.total_num_scheduled_tokens > 0
        return meta

    @never_raises(default=None)
    def _step_clock(self, scheduler_output: SchedulerOutput) -> None:
        self._clock.step(scheduler_output)

    def get_num_new_matched_tokens(
        self, request: Any, num_computed_tokens: int
    ) -> tuple[int | None, bool]:
        return 0, False

    def update_state_after_alloc(
        self, request: Any, blocks: Any, num_external_tokens: int
    ) -> None:
        return None

    def update_connector_output(self, connector_output: Any) -> None:
        return None

    def request_finished(
        self, request: Any, block_ids: list[int]
    ) -> tuple[bool, dict[str, Any] | None]:
        return False, None

    def take_stats(self) -> PDServeStats | None:
        return self._stats.take()

    def shutdown(self) -> None:
        return None
