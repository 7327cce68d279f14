"""Background threads for KV traffic that are free to run on any core.

vLLM's CPU worker pins its process to the cores of its OpenMP team, and
threads inherit that pin: a transfer thread would then share one core with
the worker's main thread, which spins between engine steps, and starve for
seconds. Transfer threads therefore widen their own affinity first.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor


def unpin_current_thread() -> None:
    try:
        os.sched_setaffinity(0, range(os.cpu_count() or 1))
    except (AttributeError, OSError, ValueError):
        pass  # not Linux, or a cpuset forbids it: keep the inherited mask


def start_thread(target: Callable[..., object], name: str, *args: object) -> None:
    def run() -> None:
        unpin_current_thread()
        target(*args)

    threading.Thread(target=run, name=name, daemon=True).start()


def thread_pool(workers: int, name: str) -> ThreadPoolExecutor:
    return ThreadPoolExecutor(
        workers, thread_name_prefix=name, initializer=unpin_current_thread
    )


# How long the engine's main thread sleeps to hand the GIL to transfer threads.
HANDOFF_SECONDS = 0.0005


def hand_off_gil() -> None:
    """Called on vLLM's worker main thread while transfer threads have work.

    Between engine steps that thread spins, releasing and retaking the GIL
    faster than CPython's switch interval, so a thread waiting for the GIL is
    never granted a forced switch and can starve for seconds. A real sleep
    lets it in.
    """
    time.sleep(HANDOFF_SECONDS)


def wait_until(done: Callable[[], bool], timeout: float) -> None:
    """Hand the GIL over in short sleeps until ``done()`` or ``timeout``."""
    deadline = time.monotonic() + timeout
    while not done() and time.monotonic() < deadline:
        hand_off_gil()
