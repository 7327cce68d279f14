"""Producer-side record of the blocks each finished prefill holds for a consumer.

A lease ends when the consumer releases it or when it expires, but never
while a read of it is in progress: a read pins the lease (tcp, nccl: until
its bytes have left the blocks; ipc, where the consumer copies by itself:
until the consumer releases it or the hold it was promised runs out). Either
way the request id is handed back to vLLM exactly once, and only then are
the blocks freed and reusable.

Grants reach the worker with the engine step after the request finished; a
read that overtakes its grant is parked by the server for a few steps
(``step``). Releases that overtake the grant are remembered (bounded) and
applied when it arrives. Ended leases are remembered as long as a late read
or release of them could come, so those are refused or ignored at once.

Callers verify lease tokens before calling in: every request id that reaches
this table belongs to a lease this producer issued.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from enum import Enum

# Releases kept for leases whose grant has not arrived yet; genuine ones
# only (tokens are verified first), so this bounds a broken consumer.
MAX_EARLY_RELEASES = 4096
# Distinct consumer ranks a release can need (Release.needed's bound).
MAX_RELEASERS = 1024


class ReadRefused(Exception):
    """This read cannot be served; the message says why."""


class Verdict(Enum):
    READY = "ready"
    NOT_YET_GRANTED = "not yet granted"


@dataclass
class HeldLease:
    """The blocks one lease holds on this rank, and who reads or released
    them (what the consumer carries is ``pdserve.lease.Lease``)."""

    block_ids: list[int]
    prompt_hash: str
    expires_at: float
    readers: int = 0
    held_until: float = 0.0
    released: bool = False
    # Consumer ranks that read this rank's part (TP sizes differ): the lease
    # ends with the last one's release. A rank counts once, however often
    # its release is sent (again after a broken connection).
    released_by: set[str] = field(default_factory=set)
    releases_needed: int = 1


class LeaseTable:
    def __init__(self, lease_seconds: float, clock=time.monotonic) -> None:
        self._lease_seconds = lease_seconds
        self._clock = clock
        self._lock = threading.Lock()
        self._leases: dict[str, HeldLease] = {}
        self._early_releases: OrderedDict[str, float] = OrderedDict()
        # (consumer ranks that released, releases needed) of each early one.
        self._early_counts: dict[str, tuple[set[str], int]] = {}
        # Ended leases and when they may be forgotten; insertion order is
        # forgetting order because the memory time is constant.
        self._ended: OrderedDict[str, float] = OrderedDict()
        self._finished: set[str] = set()
        self._released = 0
        self._expired = 0
        # Engine steps seen; parked reads give up after a few.
        self.step = 0

    @property
    def lease_seconds(self) -> float:
        return self._lease_seconds

    def tick(self) -> None:
        """One engine step went by."""
        with self._lock:
            self.step += 1

    def grant(self, request_id: str, block_ids: list[int], prompt_hash: str) -> None:
        with self._lock:
            if request_id in self._leases or request_id in self._ended:
                return  # a duplicate grant changes nothing
            lease = HeldLease(
                list(block_ids), prompt_hash, self._clock() + self._lease_seconds
            )
            self._leases[request_id] = lease
            if self._early_releases.pop(request_id, None) is not None:
                seen, needed = self._early_counts.pop(request_id, ({""}, 1))
                lease.released_by, lease.releases_needed = seen, needed
                lease.released = len(seen) >= needed
                self._end_if_done(request_id, lease)

    # ---- reads ----

    def open_read(
        self, request_id: str, prompt_hash: str, block_ids: list[int], pin: bool = True
    ) -> Verdict:
        """Pin the lease for a read of ``block_ids`` (READY), or say that its
        grant has not arrived yet. Raises ReadRefused for anything else.
        ``pin=False`` only checks: the idle thread refuses what it can
        without the engine, whose steps may have ended with the lease."""
        with self._lock:
            lease = self._leases.get(request_id)
            if lease is None:
                if request_id in self._ended:
                    raise ReadRefused(f"lease {request_id} has ended")
                return Verdict.NOT_YET_GRANTED
            if lease.released:
                raise ReadRefused(f"lease {request_id} was released")
            if prompt_hash != lease.prompt_hash:
                raise ReadRefused("prompt hash differs from the lease's")
            check_block_ids(block_ids, lease.block_ids)
            if pin:
                lease.readers += 1
            return Verdict.READY

    def close_read(self, request_id: str) -> None:
        """The pinned read finished (or failed): the blocks may go."""
        with self._lock:
            lease = self._leases.get(request_id)
            if lease is None or lease.readers == 0:
                return
            lease.readers -= 1
            self._end_if_done(request_id, lease)

    def hold(self, request_id: str, seconds: float) -> None:
        """Keep a pinned lease until its release or ``seconds`` from now,
        whichever is first: its consumer copies the blocks by itself."""
        with self._lock:
            lease = self._leases.get(request_id)
            if lease is not None:
                lease.held_until = max(lease.held_until, self._clock() + seconds)

    # ---- ends ----

    def release(
        self, request_id: str, prompt_hash: str, needed: int = 1, consumer: str = ""
    ) -> bool:
        """Consumer rank ``consumer`` is done with the lease (the last of
        ``needed`` ranks that read it here ends it); True if it was live."""
        with self._lock:
            lease = self._leases.get(request_id)
            if lease is None:
                if request_id not in self._ended:
                    self._remember_early_release(request_id, needed, consumer)
                return False
            if prompt_hash != lease.prompt_hash or lease.released:
                return False
            lease.released_by.add(consumer)
            lease.releases_needed = max(lease.releases_needed, needed)
            if len(lease.released_by) < lease.releases_needed:
                return True
            lease.released = True
            lease.held_until = 0.0
            self._end_if_done(request_id, lease)
            return True

    def _remember_early_release(
        self, request_id: str, needed: int, consumer: str
    ) -> None:
        seen, before = self._early_counts.get(request_id, (set(), 1))
        if len(seen) < MAX_RELEASERS:
            seen.add(consumer)
        self._early_counts[request_id] = (seen, max(before, needed))
        self._early_releases[request_id] = self._clock() + self._lease_seconds
        self._early_releases.move_to_end(request_id)
        while len(self._early_releases) > MAX_EARLY_RELEASES:
            forgotten, _ = self._early_releases.popitem(last=False)
            self._early_counts.pop(forgotten, None)

    def _end_if_done(self, request_id: str, lease: HeldLease) -> bool:
        now = self._clock()
        over = lease.released or lease.expires_at <= now
        if not over or lease.readers or lease.held_until > now:
            return False
        del self._leases[request_id]
        self._finished.add(request_id)
        self._ended[request_id] = now + self._lease_seconds
        if lease.released:
            self._released += 1
        else:
            self._expired += 1
        return True

    def pop_finished(self) -> tuple[set[str], int]:
        """Request ids whose blocks may be freed now, and how many of them
        expired unreleased."""
        now = self._clock()
        with self._lock:
            for request_id, lease in list(self._leases.items()):
                self._end_if_done(request_id, lease)
            for table in (self._early_releases, self._ended):
                while table and next(iter(table.values())) <= now:
                    forgotten, _ = table.popitem(last=False)
                    self._early_counts.pop(forgotten, None)
            finished, self._finished = self._finished, set()
            expired, self._expired = self._expired, 0
            return finished, expired

    def take_released(self) -> int:
        """How many leases consumers released since the last call."""
        with self._lock:
            released, self._released = self._released, 0
            return released

    def __len__(self) -> int:
        with self._lock:
            return len(self._leases)


def check_block_ids(wanted: list[int], leased: list[int]) -> None:
    """A read may name each block of its lease at most once."""
    if len(wanted) > len(leased):
        raise ReadRefused("more blocks than the lease holds")
    if len(set(wanted)) != len(wanted):
        raise ReadRefused("duplicate block ids")
    if not set(wanted) <= set(leased):
        raise ReadRefused("blocks outside the request's lease")
