"""Where to prefill a request: on this consumer, or on a producer.

A remote prefill costs the request a fixed overhead the local one does not
(the producer call: both HTTP layers, the network, the producer's queue)
plus the producer's prefill; its KV is pulled after its first token went
out. A local prefill costs the request this node's prefill, and costs every
request this node is decoding as much again: its tokens join their steps
(chunked prefill spreads them, it does not remove them). So, in client
seconds, for a prompt of n new tokens with R other requests running here:

    local(n)  = a * n * (1 + R)     a: this node's prefill seconds per token
    remote(n) = c + (p + t) * n     c: producer call overhead and queue,
                                    p: producer prefill s/token,
                                    t: KV pull s/token (it delays token 2
                                       and the steps that copy it)
    threshold = c / (a * (1 + R) - p - t)   (local(n) <= remote(n) below it)

clamped to [floor, ceiling]; the ceiling when the denominator is not
positive (an idle node with a producer no faster than itself: the hop only
adds), one block until a and c have been measured. With the first token
from the producer, a lone request on an idle consumer is fastest here, and
the threshold falls as this node gets busy: the busier, the more a local
prefill costs the requests it already serves. ``--local-prefill-max-tokens``
(``fixed_threshold``) overrides it; 0 turns the short-prompt rule off.
Reasons are the ``reason`` label of ``pdserve:local_prefills_total``.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

# Labels of pdserve:local_prefills_total.
SHORT_PROMPT = "short_prompt"
PREFIX_CACHED = "prefix_cached"
PRODUCERS_SATURATED = "producers_saturated"
REMOTE = "remote"
AUTOMATIC = -1


@dataclass(frozen=True)
class Decision:
    local: bool
    # Why: a local_prefills_total reason, or "remote".
    reason: str
    # Tokens this node would compute locally (prompt less its cache hit).
    new_tokens: int
    # The short-prompt threshold the decision used.
    threshold: int


def decide(
    prompt_tokens: int,
    cached_tokens: int,
    threshold: int,
    *,
    producers_saturated: bool = False,
    inflight: int = 0,
    max_inflight: int = 0,
) -> Decision:
    """The placement of one request.

    ``inflight`` is this node's own count of requests it is serving (what its
    HTTP layer knows); ``max_inflight`` the count above which it has no room
    for extra prefills (e.g. its ``--max-num-seqs``; 0: never take a
    saturated producer's work).
    """
    new_tokens = max(0, prompt_tokens - max(0, cached_tokens))
    if new_tokens <= threshold:
        # Local only thanks to the cache: say so, it is what the index buys.
        reason = PREFIX_CACHED if prompt_tokens > threshold else SHORT_PROMPT
        return Decision(True, reason, new_tokens, threshold)
    if producers_saturated and inflight < max_inflight:
        return Decision(True, PRODUCERS_SATURATED, new_tokens, threshold)
    return Decision(False, REMOTE, new_tokens, threshold)


class _Ewma:
    """Exponentially weighted mean of a ratio, as a ratio of weighted sums:
    long prompts, whose per-token cost is least blurred by fixed step costs,
    weigh most."""

    def __init__(self, alpha: float) -> None:
        self.alpha = alpha
        self.num = 0.0
        self.den = 0.0
        self.samples = 0

    def add(self, num: float, den: float) -> None:
        if self.samples == 0:
            self.num, self.den = num, den
        else:
            self.num += self.alpha * (num - self.num)
            self.den += self.alpha * (den - self.den)
        self.samples += 1

    def value(self) -> float | None:
        return self.num / self.den if self.samples and self.den > 0 else None


class _Mean:
    def __init__(self, alpha: float) -> None:
        self.alpha = alpha
        self.mean: float | None = None
        self.samples = 0

    def add(self, x: float) -> None:
        self.mean = x if self.mean is None else self.mean + self.alpha * (x - self.mean)
        self.samples += 1


class CostEstimator:
    """Learns a, c, p and t online and turns them into the short-prompt
    threshold for a node with R requests running.

    Feed it from the HTTP layer:
    - ``observe_local(new_tokens, seconds)``: a request this node prefilled
      itself, ``seconds`` from handing it to vLLM to its first token (its
      TTFT here: includes this node's queue, which is what a local prefill
      costs the client);
    - ``observe_remote(call_seconds, queue_seconds, prefill_seconds, tokens)``:
      a producer call and the lease's producer_queue/prefill_seconds;
    - ``observe_transfer(tokens, seconds)``: KV pulled (from the engine's
      transfer metrics).
    Thread-safe.
    """

    def __init__(
        self,
        block_size: int,
        *,
        fixed_threshold: int = AUTOMATIC,
        floor: int | None = None,
        ceiling: int = 4096,
        min_samples: int = 3,
        alpha: float = 0.1,
    ) -> None:
        if fixed_threshold < AUTOMATIC:
            raise ValueError("local prefill max tokens must be -1 (automatic) or >= 0")
        self.block_size = block_size
        self.fixed_threshold = fixed_threshold
        self.floor = block_size if floor is None else floor
        self.ceiling = max(ceiling, self.floor)
        self.min_samples = min_samples
        self._local = _Ewma(alpha)
        self._transfer = _Ewma(alpha)
        self._producer_prefill = _Ewma(alpha)
        self._overhead = _Mean(alpha)
        self._lock = threading.Lock()

    def observe_local(self, new_tokens: int, seconds: float) -> None:
        if new_tokens > 0 and seconds > 0:
            with self._lock:
                self._local.add(seconds, new_tokens)

    def observe_remote(
        self,
        call_seconds: float,
        queue_seconds: float,
        prefill_seconds: float,
        tokens: int = 0,
    ) -> None:
        """The call's overhead is the call less the producer's prefill (its
        queue is part of what a remote prefill costs)."""
        if call_seconds > 0:
            with self._lock:
                self._overhead.add(max(0.0, call_seconds - prefill_seconds))
                if tokens > 0 and prefill_seconds > 0:
                    self._producer_prefill.add(prefill_seconds, tokens)

    def observe_transfer(self, tokens: int, seconds: float) -> None:
        if tokens > 0 and seconds >= 0:
            with self._lock:
                self._transfer.add(seconds, tokens)

    def rates(self) -> dict[str, float | None]:
        """a (local s/token), c (remote overhead s), p (producer prefill
        s/token), t (transfer s/token)."""
        with self._lock:
            return {
                "local_seconds_per_token": self._local.value(),
                "remote_overhead_seconds": self._overhead.mean,
                "producer_seconds_per_token": self._producer_prefill.value(),
                "transfer_seconds_per_token": self._transfer.value(),
            }

    def threshold(self, running: int = 0) -> int:
        """New tokens up to which a local prefill costs no more than a
        remote one, with ``running`` other requests decoding here."""
        if self.fixed_threshold != AUTOMATIC:
            return self.fixed_threshold
        with self._lock:
            a = self._local.value()
            c = self._overhead.mean
            p = self._producer_prefill.value() or 0.0
            t = self._transfer.value() or 0.0
            measured = (
                self._local.samples >= self.min_samples
                and self._overhead.samples >= self.min_samples
            )
        if not measured or a is None or c is None:
            return self.floor
        gain = a * (1 + max(0, running)) - p - t
        if gain <= 0:
            # Nothing saved per token by going remote: local up to the cap.
            return self.ceiling
        return round(min(self.ceiling, max(self.floor, c / gain)))
