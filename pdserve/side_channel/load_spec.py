"""What a consumer rank is asked to load: a lease's blocks into its own."""

from __future__ import annotations

from dataclasses import dataclass

from pdserve.lease import Lease


@dataclass
class LoadSpec:
    """Consumer: copy ``remote_block_ids`` of the lease into ``local_block_ids``."""

    request_id: str
    lease: Lease
    remote_block_ids: list[int]
    local_block_ids: list[int]
    # When the scheduler allocated the blocks (time.time()): the transfer
    # phases of the TTFT split start here.
    scheduled_at: float = 0.0
