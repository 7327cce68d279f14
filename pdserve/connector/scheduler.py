"""Scheduler half of the connector (runs in vLLM's engine-core process).

Producer: when a prefill-only request finishes, keep its blocks and hand out
a lease in the response. Consumer: for a request carrying a lease its own
HTTP layer signed, check it against the request's own prompt tokens, let
vLLM allocate blocks and have the workers pull the KV into them.

Request fields are untrusted: each entry point parses them once into a
``Lease`` and treats anything else as "prefill locally". No exception
escapes into vLLM's scheduler (it would take the engine down).
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

import msgspec
from vllm.v1.request import RequestStatus

from pdserve.connector.metadata import LeaseGrant, LoadSpec, PDServeMetadata
from pdserve.connector.phases import PhaseClock
from pdserve.connector.stats import PDServeStats
from pdserve.fingerprint import kv_fingerprint, uncovered
from pdserve.lease import (
    DO_REMOTE_PREFILL,
    FirstToken,
    Lease,
    lease_token,
    refusal,
    request_wants_lease,
)
from pdserve.log import init_logger
from pdserve.settings import Settings

if TYPE_CHECKING:
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.request import Request

logger = init_logger(__name__)
T = TypeVar("T")


def never_raises(default: Any) -> Callable[[Callable[..., T]], Callable[..., T]]:
    """Last line of defence: a bug or an input nobody foresaw must cost a
    local prefill, not vLLM's engine."""

    def wrap(method: Callable[..., T]) -> Callable[..., T]:
        @functools.wraps(method)
        def guarded(self: PDServeScheduler, *args: Any) -> T:
            try:
                return method(self, *args)
            except Exception:
                logger.exception("pdserve: %s failed; falling back", method.__name__)
                self._stats.add("kv_connector_errors")
                return default

        return guarded

    return wrap


@dataclass
class _Pending:
    """Consumer: a request whose lease was accepted and not yet loaded."""

    lease: Lease
    num_local_tokens: int = 0


class PDServeScheduler:
    def __init__(
        self,
        settings: Settings,
        block_size: int,
        tp_size: int,
        node_key: bytes,
        num_blocks: int = 0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
        self.block_size = block_size
        self.tp_size = tp_size
        self._key = node_key
        self._pending: dict[str, _Pending] = {}
        # Producer: blocks held by leases, by request, and their cap (a share
        # of the KV cache: leases must never starve the producer's prefills).
        self._leased: dict[str, int] = {}
        self._leased_blocks = 0
        self.lease_cap_blocks = int(settings.max_leased_fraction * num_blocks)
        self._meta = PDServeMetadata()
        self._stats = PDServeStats()
        self._now = clock
        self._clock = PhaseClock(self._stats, clock)

    # ---- consumer ----

    @never_raises(default=(0, False))
    def get_num_new_matched_tokens(
        self, request: Request, num_computed_tokens: int
    ) -> tuple[int, bool]:
        if self.settings.role != "consumer":
            return 0, False
        pending = self._accepted(request)
        if pending is None:
            return 0, False
        external = len(request.prompt_token_ids or ()) - num_computed_tokens
        if external <= 0:
            # Nothing to load: vLLM must never wait for an empty pull.
            self._give_back(self._pending.pop(request.request_id).lease)
            return 0, False
        pending.num_local_tokens = num_computed_tokens
        return external, True

    def _accepted(self, request: Request) -> _Pending | None:
        """The request's lease if it is one to load from (decided once)."""
        pending = self._pending.get(request.request_id)
        if pending is not None:
            return pending
        params = request.kv_transfer_params
        if not isinstance(params, dict) or not params.get(DO_REMOTE_PREFILL):
            return None
        params[DO_REMOTE_PREFILL] = False  # decided now, whatever follows
        lease = self._signed_lease(params)
        if lease is None:
            return None
        self._clock.arrived(request.request_id, lease.handed_at)
        if (reason := uncovered(request)) is not None:
            logger.warning(
                "Request %s: leased KV cannot be checked against its inputs (%s); "
                "prefilling locally",
                request.request_id,
                reason,
            )
            self._stats.add("kv_leases_refused")
            self._give_back(lease)
            return None
        prompt = list(request.prompt_token_ids or ())
        if lease.prompt_hash != kv_fingerprint(request):
            logger.warning(
                "Request %s: producer KV was computed for other prompt tokens; "
                "prefilling locally",
                request.request_id,
            )
            self._stats.add("kv_prompt_mismatches")
            self._give_back(lease)
            return None
        if reason := self._inconsistent(lease, prompt):
            logger.warning("Request %s: lease refused (%s)", request.request_id, reason)
            self._stats.add("kv_leases_refused")
            self._give_back(lease)
            return None
        pending = self._pending[request.request_id] = _Pending(lease)
        return pending

    def first_token_of(self, request: Request) -> FirstToken | str | None:
        """The producer's first token for ``request``, if its lease is one
        this node signed, for exactly this request's inputs, and carries one;
        else why not (a reason), or None when the request has no lease. Reads
        the lease without deciding it: loading it is decided as usual."""
        params = request.kv_transfer_params
        if not isinstance(params, dict) or not params.get(DO_REMOTE_PREFILL):
            return None
        lease = Lease.from_params(params)
        if lease is None or not lease.verified(self._key):
            return "lease_refused"
        self._clock.arrived(request.request_id, lease.handed_at)
        if (reason := uncovered(request)) is not None:
            return reason
        if lease.prompt_hash != kv_fingerprint(request) or self._inconsistent(
            lease, list(request.prompt_token_ids or ())
        ):
            return "lease_refused"
        if lease.first_token is None:
            return "no_first_token"
        return lease.first_token

    def first_token_emitted(self, request_id: str, arrived_at: float) -> None:
        self._clock.first_token_emitted(request_id, arrived_at)

    def count_first_token(self, fallback: str | None) -> None:
        """One leased request's first token: the producer's, or why not."""
        if fallback is None:
            self._stats.add("first_tokens_from_producer")
        else:
            self._stats.add_labeled("first_token_fallbacks", fallback)

    def _signed_lease(self, params: dict) -> Lease | None:
        """The lease this consumer's HTTP layer signed, or None (counted)."""
        lease = Lease.from_params(params)
        if lease is None or not lease.verified(self._key):
            logger.warning(
                "pdserve: ignoring kv_transfer_params this node did not issue"
            )
            self._stats.add("kv_leases_refused")
            return None
        return lease

    def _inconsistent(self, lease: Lease, prompt: list[int]) -> str | None:
        if lease.num_prompt_tokens != len(prompt):
            return "prompt length differs"
        if len(lease.block_ids) != -(-len(prompt) // self.block_size):
            return "block count does not fit the prompt"
        if not lease.kv_host:
            return "no producer address"
        return None

    def update_state_after_alloc(
        self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int
    ) -> None:
        pending = self._pending.pop(request.request_id, None)
        if pending is None:
            return
        if num_external_tokens == 0:
            return self._give_back(pending.lease)
        try:
            self._schedule_pull(request, blocks, pending)
        except Exception:
            # vLLM now waits for this pull: report it failed (the prompt is
            # recomputed) rather than leave the request waiting forever.
            logger.exception(
                "pdserve: scheduling the pull of %s failed", request.request_id
            )
            self._stats.add("kv_connector_errors")
            self._fail_pull(request.request_id, blocks, pending.lease)

    def _schedule_pull(
        self, request: Request, blocks: KVCacheBlocks, pending: _Pending
    ) -> None:
        block_ids = list(blocks.get_block_ids()[0])
        num_prompt_blocks = -(-len(request.prompt_token_ids or ()) // self.block_size)
        first = pending.num_local_tokens // self.block_size
        local_ids = block_ids[first:num_prompt_blocks]
        remote_ids = list(pending.lease.block_ids[first:num_prompt_blocks])
        if not local_ids or len(local_ids) != len(remote_ids):
            logger.warning(
                "Request %s: blocks do not match the lease", request.request_id
            )
            return self._fail_pull(request.request_id, blocks, pending.lease)
        scheduled_at = self._clock.pull_scheduled(
            request.request_id, request.arrival_time
        )
        self._meta.loads.append(
            LoadSpec(
                request.request_id, pending.lease, remote_ids, local_ids, scheduled_at
            )
        )

    def _fail_pull(self, request_id: str, blocks: KVCacheBlocks, lease: Lease) -> None:
        self._meta.failed_loads.append((request_id, list(blocks.get_block_ids()[0])))
        self._give_back(lease)

    def _give_back(self, lease: Lease) -> None:
        """Release a lease this consumer will not read."""
        self._meta.releases.append(lease)

    # ---- both ----

    def build_connector_meta(
        self, scheduler_output: SchedulerOutput
    ) -> PDServeMetadata:
        self._step_clock(scheduler_output)
        meta, self._meta = self._meta, PDServeMetadata()
        return meta

    @never_raises(default=None)
    def _step_clock(self, scheduler_output: SchedulerOutput) -> None:
        self._clock.step(scheduler_output)

    @never_raises(default=None)
    def update_connector_output(self, connector_output: Any) -> None:
        self._clock.pulls_done(getattr(connector_output, "finished_recving", None))
        for request_id in getattr(connector_output, "finished_sending", None) or ():
            self._leased_blocks -= self._leased.pop(request_id, 0)

    @never_raises(default=(False, None))
    def request_finished(
        self, request: Request, block_ids: list[int]
    ) -> tuple[bool, dict[str, Any] | None]:
        params = request.kv_transfer_params
        try:
            if self.settings.role == "consumer":
                self._consumer_finished(request, params)
                return False, None
            return self._producer_finished(request, list(block_ids), params)
        finally:
            # After the lease took its phases (forgetting first read 0 s of
            # prefill and put it all in the queue).
            self._clock.forget(request.request_id)

    def _producer_finished(
        self, request: Request, block_ids: list[int], params: object
    ) -> tuple[bool, dict[str, Any] | None]:
        """Keep a finished prefill's blocks and lease them, if it asked and
        can be leased; the answer says why not otherwise (the consumer then
        prefills locally at once)."""
        if not request_wants_lease(params) or not block_ids:
            return False, None
        if request.status not in (
            RequestStatus.FINISHED_LENGTH_CAPPED,
            RequestStatus.FINISHED_STOPPED,
        ):
            return False, None
        if (reason := uncovered(request)) is not None:
            self._stats.add("kv_leases_withheld")
            return False, refusal(reason)
        if self._leased_blocks + len(block_ids) > self.lease_cap_blocks:
            logger.warning(
                "pdserve: not leasing %s: leases hold %d of at most %d blocks",
                request.request_id,
                self._leased_blocks,
                self.lease_cap_blocks,
            )
            self._stats.add("kv_leases_withheld")
            return False, refusal("lease_cap")
        lease = self._issue(request, block_ids)
        if lease is None:
            self._stats.add("kv_leases_withheld")
            return False, refusal("unleasable")
        self._leased[request.request_id] = len(block_ids)
        self._leased_blocks += len(block_ids)
        self._meta.grants.append(
            LeaseGrant(request.request_id, block_ids, lease.prompt_hash)
        )
        return True, lease.to_params()

    def _consumer_finished(self, request: Request, params: object) -> None:
        """A request that ends before its pull: its lease goes back. So does
        one vLLM submits only to hand it back (a request it rejected)."""
        pending = self._pending.pop(request.request_id, None)
        if pending is not None:
            return self._give_back(pending.lease)
        if isinstance(params, dict) and params.get(DO_REMOTE_PREFILL):
            params[DO_REMOTE_PREFILL] = False
            if (lease := self._signed_lease(params)) is not None:
                self._give_back(lease)

    def _issue(self, request: Request, block_ids: list[int]) -> Lease | None:
        """The lease of a finished prefill, or None if its consumer could not
        take it (an id or a size past the lease's bounds): a lease nobody can
        release would pin its blocks until it expires."""
        digest = kv_fingerprint(request)
        assert digest is not None  # uncovered requests are not leased
        queue, prefill = self._clock.producer_phases(
            request.request_id, request.arrival_time
        )
        outputs = list(request.output_token_ids)
        try:
            lease = Lease(
                request_id=request.request_id,
                token=lease_token(self._key, request.request_id, digest),
                epoch=self.settings.instance_id,
                block_ids=block_ids,
                prompt_hash=digest,
                num_prompt_tokens=len(request.prompt_token_ids or ()),
                kv_ports=list(self.settings.kv_ports),
                producer_queue_seconds=queue,
                producer_prefill_seconds=prefill,
                issued_at=self._now(),
                first_token=FirstToken(outputs[0]) if outputs else None,
            )
            return Lease.checked(lease)
        except msgspec.ValidationError as exc:
            logger.warning("pdserve: not leasing %r: %s", request.request_id[:64], exc)
            return None

    def take_stats(self) -> PDServeStats | None:
        return self._stats.take()
