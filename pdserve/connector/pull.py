"""One request's pull of its KV on one consumer rank, and its lease's end.

A ``Pull`` owns this rank's part of one lease from the step the engine hands
it over to the end: it finds the producer (pairing), reads one load per
producer rank its plan names (reading), has the bytes put in place
(copying), and ends ``DONE`` or ``FAILED``. Links report each load's outcome
to it (``LoadOwner``); a lease the engine hands back unread is a pull that
ends at once.

Whatever the outcome (KV in place, a read refused or timed out, a copy that
fails, the producer gone or let go of, the engine handing the lease back),
each producer rank's part of the lease ends in one place, ``_let_go``, once:
a release to the producer rank while its peer is paired, to the whole lease
over a short-lived link when there is no peer (never paired, or let go of
while it still runs), and nothing when the producer is gone.
"""

from __future__ import annotations

import enum
import time
from collections.abc import Callable

from pdserve.connector.kv_client import Load
from pdserve.connector.metadata import LoadSpec
from pdserve.connector.orphan_releases import OrphanReleases
from pdserve.connector.producer_peer import ProducerPeer
from pdserve.lease import Lease

# The one part of a lease whose producer was never paired with.
WHOLE_LEASE = -1


class PullState(enum.Enum):
    PAIRING = "pairing"  # finding the paired producer instance
    READING = "reading"  # reads on their way, no bytes in place yet
    COPYING = "copying"  # bytes of at least one producer rank being put in place
    DONE = "done"  # every read part is in place (or nothing was to be read)
    FAILED = "failed"  # recomputed here

    @property
    def ended(self) -> bool:
        return self in (PullState.DONE, PullState.FAILED)


class Pull:
    def __init__(
        self,
        lease: Lease,
        spec: LoadSpec | None,
        orphans: OrphanReleases,
        on_end: Callable[[Pull], None],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.lease = lease
        self.spec = spec  # None: handed back unread
        self.state = PullState.PAIRING
        self.peer: ProducerPeer | None = None
        self._orphans = orphans
        self._on_end = on_end
        self._reading: set[int] = set()  # producer ranks whose loads run
        self.let_go: set[int] = set()  # parts ended (producer ranks)
        self._orphaned = False  # the whole lease went to ``orphans``
        self.error: str | None = None
        self._clock = clock
        self.started = clock()
        self.seconds = 0.0  # from the start to the end
        self.nbytes = 0
        self.replied_at = 0.0  # wall clock, of the latest answer
        self.done_at = 0.0

    def __repr__(self) -> str:
        return f"pull of {self.lease.request_id} ({self.state.value})"

    # ---- what the consumer rank does ----

    def read(self, peer: ProducerPeer, deadline: float) -> None:
        """Read from ``peer``, the producer instance that issued the lease."""
        assert self.spec is not None and self.state == PullState.PAIRING
        self.peer = peer
        if not peer.holds(self.spec.remote_block_ids):
            return self.fail("the lease names blocks the producer lacks")
        self.state = PullState.READING
        self._reading = set(peer.submit(self.spec, deadline, self))

    def hand_back(self, peer: ProducerPeer | None) -> None:
        """The engine will not read the lease: let it go unread."""
        self.peer = peer
        self._end()

    def fail(self, reason: str) -> None:
        """It cannot go on (no producer to read from, a bug): recompute."""
        self.error = self.error or reason
        self._end()

    # ---- what links report ----

    def copying(self, load: Load) -> None:
        if self.state == PullState.READING:
            self.state = PullState.COPYING

    def ended(self, load: Load) -> None:
        """One producer rank's load ended; its part of the lease with it."""
        if self.state.ended or load.producer_rank not in self._reading:
            return  # the pull ended before (its parts let go then)
        self._reading.discard(load.producer_rank)
        self._account(load)
        self._let_go(load.producer_rank)
        if not self._reading:
            self._end()

    def _account(self, load: Load) -> None:
        assert self.peer is not None
        if load.error is not None:
            self.peer.count_copy_failure(load)
            self.error = self.error or load.error
            return
        self.peer.copy_succeeded(load)
        self.nbytes += load.nbytes
        self.replied_at = max(self.replied_at, load.replied_at)
        self.done_at = max(self.done_at, load.done_at)

    # ---- the end ----

    def _end(self) -> None:
        """Every part not let go yet ends now (the ranks only released on,
        reads cut short), then the pull, once."""
        if self.state.ended:
            return
        parts = sorted(self.peer.pairs) if self.peer is not None else [WHOLE_LEASE]
        for part in parts:
            self._let_go(part)
        self.state = PullState.FAILED if self.error is not None else PullState.DONE
        self.seconds = self._clock() - self.started
        if self.spec is not None:
            self._on_end(self)

    def _let_go(self, part: int) -> None:
        """The one place this rank's part of the lease ends, once per part."""
        if part in self.let_go:
            return
        self.let_go.add(part)
        peer = self.peer
        if peer is not None and not peer.closed:
            peer.release(self.lease, part)
        elif peer is None or not peer.gone:
            self._orphan()
        # else: nobody to tell, the lease went with its producer

    def _orphan(self) -> None:
        """No paired peer to release through: the whole lease over a
        short-lived link, once (its producer ranks end it at the first
        release: a pull that failed here is recomputed anyway)."""
        if not self._orphaned:
            self._orphaned = True
            self._orphans.release(self.lease)
