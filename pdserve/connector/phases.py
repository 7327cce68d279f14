"""Where a remotely prefilled request's time to first token goes, phase by
phase, as the scheduler half sees it (worker and HTTP layer add theirs).

All times are wall-clock (``time.time()``, as vLLM stamps ``arrival_time``):
the scheduler, its workers and its HTTP server share one host.

Producer: queue (arrival → first scheduled) and prefill (first scheduled →
lease issued) travel back to the consumer inside the lease.
Consumer: queue (arrival → KV blocks allocated, the pull scheduled), and the
first token (pull reported done → the step that computes the first token has
run).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from vllm.v1.core.sched.output import SchedulerOutput

    from pdserve.connector.stats import PDServeStats

# Requests tracked at once are bounded by vLLM's running requests; this caps
# what a bug could leak.
MAX_TRACKED = 1 << 16


class PhaseClock:
    def __init__(
        self, stats: PDServeStats, clock: Callable[[], float] = time.time
    ) -> None:
        self.stats = stats
        self._now = clock
        self._first_scheduled: dict[str, float] = {}
        # Consumer: requests whose pull was scheduled and not yet done (only
        # those are tracked further: a pull reported done for a request
        # already gone, aborted meanwhile, must not leave an entry behind).
        self._pulling: set[str] = set()
        self._loaded: dict[str, float] = {}
        self._computing: dict[str, float] = {}
        # Consumer: engine steps (schedule calls) so far; per leased request,
        # the step it arrived at and how many of its tokens were output.
        self.steps = 0
        self._tokens: dict[str, list[int]] = {}

    def step(self, scheduler_output: SchedulerOutput) -> None:
        """Called as each step is scheduled (build_connector_meta)."""
        now = self._now()
        self.steps += 1
        # Requests whose first-token step was scheduled last time: it has run.
        for loaded_at in self._computing.values():
            self.stats.observe("ttft_first_token_seconds", now - loaded_at)
        self._computing.clear()
        for request_id in scheduler_output.num_scheduled_tokens:
            if request_id in self._tokens:
                self._token_out(request_id)
            if request_id in self._loaded:
                self._computing[request_id] = self._loaded.pop(request_id)
            elif len(self._first_scheduled) < MAX_TRACKED:
                self._first_scheduled.setdefault(request_id, now)

    # ---- producer ----

    def producer_phases(self, request_id: str, arrival: float) -> tuple[float, float]:
        """(queue, prefill) seconds of a finished prefill."""
        now = self._now()
        scheduled = self._first_scheduled.pop(request_id, now)
        return max(0.0, scheduled - arrival), max(0.0, now - scheduled)

    def forget(self, request_id: str) -> None:
        self._first_scheduled.pop(request_id, None)
        self._tokens.pop(request_id, None)
        self._pulling.discard(request_id)
        self._loaded.pop(request_id, None)
        self._computing.pop(request_id, None)

    # ---- consumer ----

    def arrived(self, request_id: str, handed_at: float) -> None:
        """A leased request reached the engine (first seen here); its HTTP
        layer handed it to vLLM at ``handed_at`` (wall clock, 0: unknown)."""
        if request_id in self._tokens or len(self._tokens) >= MAX_TRACKED:
            return
        self._tokens[request_id] = [self.steps, 0]
        if handed_at:
            frontend = max(0.0, self._now() - handed_at)
            self.stats.observe("ttft_consumer_frontend_in_seconds", frontend)

    def first_token_emitted(self, request_id: str, arrived_at: float) -> None:
        """The producer's first token was output for ``request_id``."""
        self.stats.observe(
            "ttft_consumer_admission_seconds", max(0.0, self._now() - arrived_at)
        )
        if request_id in self._tokens:
            self._token_out(request_id)

    def _token_out(self, request_id: str) -> None:
        """One more token of a leased request goes out from this step."""
        counts = self._tokens[request_id]
        counts[1] += 1
        name = ("engine_steps_to_first_token", "engine_steps_to_second_token")
        self.stats.observe(name[counts[1] - 1], self.steps - counts[0])
        if counts[1] == 2:
            del self._tokens[request_id]

    def pull_scheduled(self, request_id: str, arrival: float) -> float:
        """The pull of a request was scheduled now; returns now."""
        now = self._now()
        self.stats.observe("ttft_consumer_queue_seconds", max(0.0, now - arrival))
        if len(self._pulling) < MAX_TRACKED:
            self._pulling.add(request_id)
        return now

    def pulls_done(self, request_ids: set[str] | None) -> None:
        now = self._now()
        for request_id in request_ids or ():
            if request_id in self._pulling:
                self._pulling.discard(request_id)
                self._loaded[request_id] = now
