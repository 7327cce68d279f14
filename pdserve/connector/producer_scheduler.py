"""Producer: when a prefill-only request finishes, keep its blocks and hand
out a lease in the response (with the first token it sampled), unless the
leases already hold their share of the KV cache or the request's inputs are
ones the lease's fingerprint does not cover; the answer then says why, and
the consumer prefills locally at once."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import msgspec
from vllm.v1.request import RequestStatus

from pdserve.connector.metadata import LeaseGrant
from pdserve.connector.scheduler import SchedulerHalf, never_raises
from pdserve.fingerprint import kv_fingerprint, uncovered
from pdserve.lease import FirstToken, Lease, lease_token, refusal, request_wants_lease
from pdserve.log import init_logger
from pdserve.settings import Settings

if TYPE_CHECKING:
    from vllm.v1.request import Request

logger = init_logger(__name__)

_LEASABLE = (RequestStatus.FINISHED_LENGTH_CAPPED, RequestStatus.FINISHED_STOPPED)


class ProducerScheduler(SchedulerHalf):
    def __init__(
        self,
        settings: Settings,
        block_size: int,
        node_key: bytes,
        num_blocks: int = 0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        super().__init__(settings, block_size, node_key, clock)
        # Blocks held by leases, by request, and their cap (a share of the
        # KV cache: leases must never starve this node's own prefills).
        self._leased: dict[str, int] = {}
        self._leased_blocks = 0
        self.lease_cap_blocks = int(settings.max_leased_fraction * num_blocks)

    @never_raises(default=None)
    def update_connector_output(self, connector_output: Any) -> None:
        for request_id in getattr(connector_output, "finished_sending", None) or ():
            self._leased_blocks -= self._leased.pop(request_id, 0)

    @never_raises(default=(False, None))
    def request_finished(
        self, request: Request, block_ids: list[int]
    ) -> tuple[bool, dict[str, Any] | None]:
        try:
            return self._finished(request, list(block_ids))
        finally:
            # After the lease took its phases (forgetting first read 0 s of
            # prefill and put it all in the queue).
            self._clock.forget(request.request_id)

    def _finished(
        self, request: Request, block_ids: list[int]
    ) -> tuple[bool, dict[str, Any] | None]:
        """Keep a finished prefill's blocks and lease them, if it asked and
        can be leased; the answer says why not otherwise."""
        if not request_wants_lease(request.kv_transfer_params) or not block_ids:
            return False, None
        if request.status not in _LEASABLE:
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
                instance_id=self.settings.instance_id,
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
