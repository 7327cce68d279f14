"""The one way tests wait for something another thread, task or process
does: poll a predicate until it holds, with a deadline, and fail naming what
was waited for and what was last seen. Never sleep for a thing to happen."""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

T = TypeVar("T")


@dataclass(frozen=True)
class Equal:
    """``got`` compared with ``want``: truthy once they are equal, and shown
    with both when a wait on it times out."""

    got: object
    want: object

    def __bool__(self) -> bool:
        return self.got == self.want


def eventually(
    predicate: Callable[[], T],
    timeout: float,
    what: str,
    step: Callable[[], object] | None = None,
    interval: float = 0.005,
) -> T:
    """Call ``predicate`` until it returns something truthy, and return that.
    ``step`` runs between tries (e.g. an engine step: what makes progress).
    Raises AssertionError naming ``what`` and the last value seen once
    ``timeout`` seconds passed."""
    deadline = time.monotonic() + timeout
    while True:
        seen = predicate()
        if seen:
            return seen
        if time.monotonic() > deadline:
            raise AssertionError(_timed_out(timeout, what, seen))
        if step is not None:
            step()
        time.sleep(interval)


async def eventually_async(
    predicate: Callable[[], T | Awaitable[T]],
    timeout: float,
    what: str,
    interval: float = 0.005,
) -> T:
    """``eventually`` for a test running on an event loop: the loop runs
    between tries. ``predicate`` may be a coroutine function."""
    deadline = time.monotonic() + timeout
    while True:
        seen = predicate()
        if inspect.isawaitable(seen):
            seen = await seen
        if seen:
            return seen
        if time.monotonic() > deadline:
            raise AssertionError(_timed_out(timeout, what, seen))
        await asyncio.sleep(interval)


def _timed_out(timeout: float, what: str, seen: object) -> str:
    return f"timed out after {timeout:g}s waiting for {what}; last seen: {seen!r}"
