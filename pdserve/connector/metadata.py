"""What the scheduler half tells the worker half each engine step."""

from __future__ import annotations

from dataclasses import dataclass, field

from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorMetadata


@dataclass
class LeaseRef:
    """A producer lease, enough to read or release it on every rank."""

    request_id: str
    token: str
    host: str
    ports: list[int]


@dataclass
class LoadSpec:
    """Consumer: copy ``remote_block_ids`` of the lease into ``local_block_ids``."""

    request_id: str
    lease: LeaseRef
    remote_block_ids: list[int]
    local_block_ids: list[int]


@dataclass
class LeaseGrant:
    """Producer: hold ``block_ids`` of a finished prefill for a consumer."""

    request_id: str
    block_ids: list[int]
    token: str


@dataclass
class PDServeMetadata(KVConnectorMetadata):
    loads: list[LoadSpec] = field(default_factory=list)
    releases: list[LeaseRef] = field(default_factory=list)
    grants: list[LeaseGrant] = field(default_factory=list)
