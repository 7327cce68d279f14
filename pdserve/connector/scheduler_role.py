"""The scheduler half a node's role runs (both halves build on ``scheduler``)."""

from __future__ import annotations

import time
from collections.abc import Callable

from pdserve.connector.consumer_scheduler import ConsumerScheduler
from pdserve.connector.producer_scheduler import ProducerScheduler
from pdserve.connector.scheduler import SchedulerHalf
from pdserve.settings import Settings


def scheduler_half(
    settings: Settings,
    block_size: int,
    node_key: bytes,
    num_blocks: int = 0,
    clock: Callable[[], float] = time.time,
) -> SchedulerHalf:
    """The scheduler half of ``settings.role``."""
    if settings.role == "producer":
        return ProducerScheduler(settings, block_size, node_key, num_blocks, clock)
    return ConsumerScheduler(settings, block_size, node_key, clock)
