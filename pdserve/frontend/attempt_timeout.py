"""How long one attempt at a producer may take before the next is tried.

A producer whose engine is stuck still accepts connections (and answers
``/health``), so only a deadline tells it from a slow one. The rule, for
one request with ``remaining`` seconds left of ``--prefill-timeout``:

- the last producer it can try gets all of ``remaining``;
- every other attempt gets at most half of ``remaining`` (the producers after
  it keep at least as long as it had), and, once producer calls were
  measured, at most ``SLACK`` x the slowest recent call scaled to this
  request's work — but never less than ``FLOOR_FRACTION`` of
  ``--prefill-timeout``.

"Work" is the request's prompt tokens plus the prefill work this consumer
already has outstanding on that producer (queued ahead of it there); a
measured call of ``s`` seconds for ``w`` work predicts at most
``s * max(1, work / w)`` for this one. Scaling the slowest recent call, not
an average, keeps a long prompt or a producer that got busy from being taken
for a hung one; the floor keeps a burst of load that the measurements have
not seen yet from doing so. A false "hung" costs that producer its share of
requests until it answers a probe, so the rule errs long.
"""

from __future__ import annotations

from collections import deque

# Recent successful calls remembered (pool-wide: producers serve one model).
WINDOW = 64
# Calls measured before they bound an attempt.
MIN_SAMPLES = 3
# How much slower than the slowest recent call (scaled) a call may be.
SLACK = 4.0
# No attempt but the last is abandoned before this share of the budget.
FLOOR_FRACTION = 0.25


class CallTimes:
    """Recent producer calls that gave a lease: (seconds, work)."""

    def __init__(self, window: int = WINDOW) -> None:
        self._samples: deque[tuple[float, float]] = deque(maxlen=window)

    def add(self, seconds: float, work: float) -> None:
        self._samples.append((max(seconds, 0.0), max(work, 1.0)))

    def bound(self, work: float) -> float | None:
        """SLACK x the slowest recent call scaled to ``work``; None until
        MIN_SAMPLES calls were measured."""
        if len(self._samples) < MIN_SAMPLES:
            return None
        work = max(work, 1.0)
        return SLACK * max(s * max(1.0, work / w) for s, w in self._samples)


def attempt_timeout(
    remaining: float, attempts_left: int, budget: float, bound: float | None
) -> float:
    """Seconds this attempt may take (see the module's docstring).

    ``attempts_left``: producers this request may still try, this one
    included; ``budget``: ``--prefill-timeout``; ``bound``: ``CallTimes.bound``.
    """
    if attempts_left <= 1:
        return remaining
    share = remaining / 2
    if bound is None:
        return share
    return min(share, max(budget * FLOOR_FRACTION, bound))
