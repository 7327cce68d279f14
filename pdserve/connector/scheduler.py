"""Scheduler half of the connector (runs in vLLM's engine-core process).

Producer: when a prefill-only request finishes, keep its blocks and hand out
a lease (block ids, token, prompt fingerprint) in the response.
Consumer: for a request carrying such a lease, check the fingerprint against
the request's own prompt tokens, then let vLLM allocate blocks and have the
workers pull the KV into them.
"""

from __future__ import annotations

import secrets
from typing import TYPE_CHECKING, Any

from vllm.v1.request import RequestStatus

from pdserve.connector.metadata import LeaseGrant, LeaseRef, LoadSpec, PDServeMetadata
from pdserve.connector.stats import PDServeStats
from pdserve.log import init_logger
from pdserve.protocol import prompt_hash
from pdserve.settings import Settings

if TYPE_CHECKING:
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.request import Request

logger = init_logger(__name__)

# Keys of kv_transfer_params, the only thing that travels through the HTTP
# answers between the two nodes.
DO_REMOTE_DECODE = "do_remote_decode"
DO_REMOTE_PREFILL = "do_remote_prefill"


def lease_params(
    request_id: str,
    token: str,
    block_ids: list[int],
    prompt: list[int],
    ports: list[int],
) -> dict[str, Any]:
    return {
        DO_REMOTE_PREFILL: True,
        "remote_request_id": request_id,
        "remote_block_ids": block_ids,
        "lease_token": token,
        "prompt_hash": prompt_hash(prompt),
        "num_prompt_tokens": len(prompt),
        "kv_ports": ports,
    }


def lease_from_params(params: dict[str, Any], host: str) -> LeaseRef:
    return LeaseRef(
        request_id=params["remote_request_id"],
        token=params["lease_token"],
        host=host,
        ports=list(params["kv_ports"]),
    )


class PDServeScheduler:
    def __init__(self, settings: Settings, block_size: int) -> None:
        self.settings = settings
        self.block_size = block_size
        self._local_hits: dict[str, int] = {}
        self._meta = PDServeMetadata()
        self._stats = PDServeStats()

    # ---- consumer ----

    def get_num_new_matched_tokens(
        self, request: Request, num_computed_tokens: int
    ) -> tuple[int, bool]:
        params = request.kv_transfer_params
        if not params or not params.get(DO_REMOTE_PREFILL):
            return 0, False
        prompt = list(request.prompt_token_ids or [])
        if params.get("prompt_hash") != prompt_hash(prompt):
            logger.warning(
                "Request %s: producer KV was computed for other prompt tokens; "
                "prefilling locally",
                request.request_id,
            )
            self._stats.add("kv_prompt_mismatches")
            self._give_back(params)
            return 0, False
        self._local_hits[request.request_id] = num_computed_tokens
        return len(prompt) - num_computed_tokens, True

    def update_state_after_alloc(
        self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int
    ) -> None:
        params = request.kv_transfer_params
        if not params or not params.get(DO_REMOTE_PREFILL):
            return
        num_local = self._local_hits.pop(request.request_id, 0)
        if num_external_tokens == 0:
            self._give_back(params)
            return
        params[DO_REMOTE_PREFILL] = False
        num_prompt_blocks = -(-len(request.prompt_token_ids) // self.block_size)
        first = num_local // self.block_size
        local_ids = list(blocks.get_block_ids()[0][first:num_prompt_blocks])
        remote_ids = list(params["remote_block_ids"][first:num_prompt_blocks])
        self._meta.loads.append(
            LoadSpec(
                request_id=request.request_id,
                lease=lease_from_params(params, self._producer_host),
                remote_block_ids=remote_ids,
                local_block_ids=local_ids,
            )
        )

    @property
    def _producer_host(self) -> str:
        assert self.settings.producer_kv_host is not None
        return self.settings.producer_kv_host

    def _give_back(self, params: dict[str, Any]) -> None:
        """Release a lease this consumer will not read."""
        params[DO_REMOTE_PREFILL] = False
        self._meta.releases.append(lease_from_params(params, self._producer_host))

    # ---- both ----

    def build_connector_meta(
        self, scheduler_output: SchedulerOutput
    ) -> PDServeMetadata:
        meta, self._meta = self._meta, PDServeMetadata()
        return meta

    def request_finished(
        self, request: Request, block_ids: list[int]
    ) -> tuple[bool, dict[str, Any] | None]:
        params = request.kv_transfer_params
        if not params:
            return False, None
        if params.get(DO_REMOTE_PREFILL):
            # Consumer request that ended before its KV was pulled.
            self._local_hits.pop(request.request_id, None)
            self._give_back(params)
            return False, None
        if not params.get(DO_REMOTE_DECODE) or self.settings.role != "producer":
            return False, None
        if (
            request.status
            not in (
                RequestStatus.FINISHED_LENGTH_CAPPED,
                RequestStatus.FINISHED_STOPPED,
            )
            or not block_ids
        ):
            return False, None
        token = secrets.token_urlsafe(24)
        self._meta.grants.append(LeaseGrant(request.request_id, list(block_ids), token))
        prompt = list(request.prompt_token_ids or [])
        return True, lease_params(
            request.request_id, token, list(block_ids), prompt, self.settings.kv_ports
        )

    def take_stats(self) -> PDServeStats | None:
        return self._stats.take()
