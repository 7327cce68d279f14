"""What the scheduler half tells the worker half each engine step."""

from __future__ import annotations

from dataclasses import dataclass, field

from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorMetadata

from pdserve.lease import Lease
from pdserve.side_channel.load_spec import LoadSpec


@dataclass
class LeaseGrant:
    """Producer: hold ``block_ids`` of a finished prefill for a consumer."""

    request_id: str
    block_ids: list[int]
    prompt_hash: str


@dataclass
class PDServeMetadata(KVConnectorMetadata):
    loads: list[LoadSpec] = field(default_factory=list)
    # Consumer: leases it will not read (request ended, KV refused).
    releases: list[Lease] = field(default_factory=list)
    grants: list[LeaseGrant] = field(default_factory=list)
    # Consumer: loads vLLM waits for that cannot start (request id, its
    # blocks): reported failed so the prompt is recomputed.
    failed_loads: list[tuple[str, list[int]]] = field(default_factory=list)
    # Whether this step runs a forward (else the engine steps only to keep
    # leases or transfers alive: CPU workers then give their cores back).
    forward: bool = True
