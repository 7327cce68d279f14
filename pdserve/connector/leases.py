"""Producer-side record of the blocks each finished prefill holds for a consumer.

A lease ends when the consumer releases it or when it expires; either way
the request id is handed back to vLLM once, which then frees the blocks.
Releasing an ended lease again is harmless: a consumer's HTTP layer and its
engine may both release the lease of a request whose client went away.
"""

from __future__ import annotations

import hmac
import threading
import time
from dataclasses import dataclass


@dataclass
class Lease:
    block_ids: list[int]
    token: str
    expires_at: float


class LeaseTable:
    def __init__(self, lease_seconds: float, clock=time.monotonic) -> None:
        self._lease_seconds = lease_seconds
        self._clock = clock
        self._cond = threading.Condition()
        self._leases: dict[str, Lease] = {}
        # Releases can overtake the grant (it reaches this worker a step
        # later); remember them until the grant arrives or the lease would
        # have expired anyway.
        self._early_releases: dict[str, tuple[str, float]] = {}
        self._finished: set[str] = set()
        # Ended leases, remembered as long as a late read or release of them
        # could come (a lease's lifetime): reads fail at once, releases are
        # no-ops instead of being kept as early ones.
        self._ended: dict[str, float] = {}
        self._released = 0

    @property
    def lease_seconds(self) -> float:
        return self._lease_seconds

    def grant(self, request_id: str, block_ids: list[int], token: str) -> None:
        with self._cond:
            early = self._early_releases.pop(request_id, None)
            if early is not None and hmac.compare_digest(early[0], token):
                self._finished.add(request_id)
                self._ended[request_id] = self._clock() + self._lease_seconds
                self._released += 1
                self._cond.notify_all()
                return
            expires_at = self._clock() + self._lease_seconds
            self._leases[request_id] = Lease(list(block_ids), token, expires_at)
            self._cond.notify_all()

    def wait_for(self, request_id: str, token: str, timeout: float) -> Lease:
        """The live lease of ``request_id`` if ``token`` opens it.

        Raises PermissionError for a wrong token, LookupError if none arrives.
        """
        deadline = self._clock() + timeout
        with self._cond:
            while (lease := self._leases.get(request_id)) is None:
                remaining = deadline - self._clock()
                if remaining <= 0 or request_id in self._ended:
                    raise LookupError(f"no lease for request {request_id}")
                self._cond.wait(remaining)
            if not hmac.compare_digest(lease.token, token):
                raise PermissionError(f"wrong token for request {request_id}")
            return lease

    def release(self, request_id: str, token: str) -> bool:
        with self._cond:
            lease = self._leases.get(request_id)
            if lease is None:
                if request_id not in self._ended:
                    expiry = self._clock() + self._lease_seconds
                    self._early_releases[request_id] = (token, expiry)
                return False
            if not hmac.compare_digest(lease.token, token):
                raise PermissionError(f"wrong token for request {request_id}")
            self._end(request_id)
            self._released += 1
            return True

    def _end(self, request_id: str) -> None:
        del self._leases[request_id]
        self._finished.add(request_id)
        self._ended[request_id] = self._clock() + self._lease_seconds
        self._cond.notify_all()

    def pop_finished(self) -> tuple[set[str], int]:
        """Request ids whose blocks may be freed now, and how many expired."""
        now = self._clock()
        with self._cond:
            expired = [
                r for r, lease in self._leases.items() if lease.expires_at <= now
            ]
            for request_id in expired:
                self._end(request_id)
            for request_id, (_, expiry) in list(self._early_releases.items()):
                if expiry <= now:
                    del self._early_releases[request_id]
            # Insertion order is forgetting order: the lifetime is constant.
            while self._ended and next(iter(self._ended.values())) <= now:
                del self._ended[next(iter(self._ended))]
            finished, self._finished = self._finished, set()
            return finished, len(expired)

    def take_released(self) -> int:
        """How many leases consumers released since the last call."""
        with self._cond:
            released, self._released = self._released, 0
            return released

    def __len__(self) -> int:
        with self._cond:
            return len(self._leases)
