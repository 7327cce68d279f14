"""Consumer: for a request carrying a lease its own HTTP layer signed, or a
ticket whose answer (the lease) has arrived from it, check the lease against
the request's own inputs, let vLLM allocate blocks and have the workers pull
the KV into them. A request whose ticket has no answer yet is "not yet" for
vLLM (skipped each step, never blocking it) until the answer comes or the
ticket's deadline passes (then it prefills locally).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pdserve.connector.scheduler import SchedulerHalf, never_raises
from pdserve.connector.ticket_book import TicketBook
from pdserve.fingerprint import kv_fingerprint, uncovered
from pdserve.lease import DO_REMOTE_PREFILL, FirstToken, Lease
from pdserve.log import init_logger
from pdserve.settings import Settings
from pdserve.side_channel.load_spec import LoadSpec
from pdserve.ticket import Ticket, message_from_params

if TYPE_CHECKING:
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.request import Request

logger = init_logger(__name__)


class Wait:
    """The request's ticket has no answer yet."""


WAIT = Wait()
PROMPT_DIFFERS = "KV computed for other prompt tokens"


@dataclass
class _Pending:
    """A request whose lease was accepted and not yet loaded."""

    lease: Lease
    num_local_tokens: int = 0


class ConsumerScheduler(SchedulerHalf):
    def __init__(
        self,
        settings: Settings,
        block_size: int,
        node_key: bytes,
        clock: Callable[[], float] = time.time,
    ) -> None:
        super().__init__(settings, block_size, node_key, clock)
        self._pending: dict[str, _Pending] = {}
        self.tickets = TicketBook(
            self._give_back,
            settings.prefill_timeout,
            clock,
            on_delivered=self._delivered,
        )

    # ---- vLLM's connector calls ----

    @never_raises(default=(0, False))
    def get_num_new_matched_tokens(
        self, request: Request, num_computed_tokens: int
    ) -> tuple[int | None, bool]:
        pending = self._accepted(request)
        if pending is WAIT:
            return None, False  # vLLM asks again next step
        if pending is None:
            return 0, False
        assert isinstance(pending, _Pending)
        external = len(request.prompt_token_ids or ()) - num_computed_tokens
        if external <= 0:
            # Nothing to load: vLLM must never wait for an empty pull.
            self._give_back(self._pending.pop(request.request_id).lease)
            return 0, False
        pending.num_local_tokens = num_computed_tokens
        return external, True

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

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> Any:
        self._expire_tickets()
        return super().build_connector_meta(scheduler_output)

    @never_raises(default=None)
    def _expire_tickets(self) -> None:
        self.tickets.expire()

    @never_raises(default=None)
    def update_connector_output(self, connector_output: Any) -> None:
        self._clock.pulls_done(getattr(connector_output, "finished_recving", None))

    @never_raises(default=(False, None))
    def request_finished(
        self, request: Request, block_ids: list[int]
    ) -> tuple[bool, dict[str, Any] | None]:
        """A request that ends before its pull: its lease goes back. So does
        one vLLM submits only to hand it back (a request it rejected), and
        the answer a ticketed request never took."""
        try:
            pending = self._pending.pop(request.request_id, None)
            if pending is not None:
                self._give_back(pending.lease)
                return False, None
            params = request.kv_transfer_params
            if isinstance(params, dict) and params.get(DO_REMOTE_PREFILL):
                params[DO_REMOTE_PREFILL] = False
                self._let_go(params)
            return False, None
        finally:
            self._clock.forget(request.request_id)

    # ---- the first token, for the scheduler class ----

    def first_token_of(self, request: Request) -> FirstToken | str | Wait | None:
        """The producer's first token for ``request``, if its lease is one
        this node signed, for exactly this request's inputs, and carries one;
        else why not (a reason), WAIT while its ticket has no answer, None
        when the request has no lease at all. Decides nothing."""
        params = request.kv_transfer_params
        if not isinstance(params, dict) or not params.get(DO_REMOTE_PREFILL):
            return None
        found = self._lease_of(request, params, take=False)
        if found is WAIT:
            return WAIT
        lease, reason = found
        if lease is None:
            # A producer's refusal or an expired ticket is no lease at all
            # (its local prefill is counted where it was decided).
            return reason if reason == "lease_refused" else None
        if self._refusal(request, lease) is not None:
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

    # ---- deciding a request's lease ----

    def _accepted(self, request: Request) -> _Pending | Wait | None:
        """The request's lease if it is one to load from (decided once)."""
        pending = self._pending.get(request.request_id)
        if pending is not None:
            return pending
        params = request.kv_transfer_params
        if not isinstance(params, dict) or not params.get(DO_REMOTE_PREFILL):
            return None
        found = self._lease_of(request, params, take=True)
        if found is WAIT:
            return WAIT
        params[DO_REMOTE_PREFILL] = False  # decided now, whatever follows
        lease, reason = found
        if lease is None:
            if reason == "ticket_expired":
                self._stats.add("kv_tickets_expired")
            elif reason == "lease_refused":
                logger.warning(
                    "pdserve: ignoring kv_transfer_params this node did not issue"
                )
                self._stats.add("kv_leases_refused")
            return None
        if (reason := self._refusal(request, lease)) is not None:
            logger.warning("Request %s: lease refused (%s)", request.request_id, reason)
            mismatch = reason == PROMPT_DIFFERS
            self._stats.add("kv_prompt_mismatches" if mismatch else "kv_leases_refused")
            self._give_back(lease)
            return None
        pending = self._pending[request.request_id] = _Pending(lease)
        return pending

    def _lease_of(
        self, request: Request, params: dict, take: bool
    ) -> tuple[Lease | None, str | None] | Wait:
        """The request's lease (inline, or its ticket's answer) if this node
        signed it; else None and why. ``take``: the answer is used up."""
        ticket = Ticket.from_params(params)
        if ticket is None:
            lease = Lease.from_params(params)
            if lease is None or not lease.verified(self._key):
                return None, "lease_refused"
            self._clock.arrived(request.request_id, lease.handed_at)
            return lease, None
        if not ticket.verified(self._key):
            return None, "lease_refused"
        self._clock.arrived(request.request_id, ticket.handed_at)
        if self.tickets.answer(ticket.id) is None:
            if self._now() > ticket.deadline:
                return None, "ticket_expired"
            return WAIT
        answer, _ = self.tickets.answer(ticket.id)
        if take:
            self.tickets.take(ticket.id)
        if answer.lease is None:
            return None, answer.refused or "no_lease"
        if not answer.lease.verified(self._key):
            return None, "lease_refused"
        return answer.lease, None

    def _refusal(self, request: Request, lease: Lease) -> str | None:
        """Why the lease cannot be this request's KV, or None."""
        if (reason := uncovered(request)) is not None:
            return f"inputs not covered by the fingerprint ({reason})"
        if lease.prompt_hash != kv_fingerprint(request):
            return PROMPT_DIFFERS
        prompt = request.prompt_token_ids or ()
        if lease.num_prompt_tokens != len(prompt):
            return "prompt length differs"
        if len(lease.block_ids) != -(-len(prompt) // self.block_size):
            return "block count does not fit the prompt"
        if not lease.kv_host:
            return "no producer address"
        return None

    def _let_go(self, params: dict) -> None:
        """An undecided request ends: its lease, or its ticket's answer. A
        request the HTTP layer submitted only to carry an answer for a
        ticket (aborted on arrival) hands it over."""
        if (message := message_from_params(params, self._key)) is not None:
            self.tickets.receive(message)
            return
        ticket = Ticket.from_params(params)
        if ticket is not None:
            if ticket.verified(self._key):
                self.tickets.ended(ticket.id)
            return
        lease = Lease.from_params(params)
        if lease is not None and lease.verified(self._key):
            self._give_back(lease)

    # ---- pulls ----

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

    def _delivered(self, seconds: float) -> None:
        self._stats.observe("ttft_lease_delivery_seconds", seconds)

    def _give_back(self, lease: Lease) -> None:
        """Release a lease this consumer will not read."""
        self._meta.releases.append(lease)
