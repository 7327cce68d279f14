"""The one way tests wait for something another thread or process does."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def eventually(
    predicate: Callable[[], T],
    timeout: float,
    what: str,
    step: Callable[[], object] | None = None,
    interval: float = 0.005,
) -> T:
    """Call ``predicate`` until it returns something truthy (returned), then
    stop; ``step`` runs before each try (e.g. an engine step). Fails the test
    naming ``what`` if ``timeout`` seconds pass first."""
    deadline = time.monotonic() + timeout
    while True:
        if step is not None:
            step()
        result = predicate()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(interval)
