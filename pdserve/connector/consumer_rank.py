"""A consumer TP rank: pulls its part of each lease from the producer that
issued it, and lets the lease go.

Each load the scheduler hands over is a ``Pull`` (pull.py), and so is each
lease it hands back unread: the pull owns the lease's end on this rank. The
producers it reads from, their pairing and the watch over them are the
``ProducerRegistry``'s (producer_registry.py). This class keeps the book:
which pulls run, which ended (and the blocks of the failed ones) for vLLM,
and their statistics.
"""

from __future__ import annotations

import time

from pdserve.connector.cpu_pacing import pace
from pdserve.connector.producer_registry import ProducerRegistry
from pdserve.connector.pull import Pull
from pdserve.connector.stats import PDServeStats
from pdserve.incompatible import IncompatibleProducer
from pdserve.kv_cache import PagedKVCache
from pdserve.lease import Lease
from pdserve.log import init_logger
from pdserve.settings import Settings
from pdserve.side_channel.load_spec import LoadSpec
from pdserve.side_channel.protocol import RankInfo
from pdserve.timing import (
    CONSUMER_WAIT_SECONDS,
    WATCH_SECONDS,
    WATCH_TIMEOUT_SECONDS,
)

logger = init_logger(__name__)


class ConsumerRank:
    def __init__(
        self,
        settings: Settings,
        kv: PagedKVCache,
        info: RankInfo,
        tp_rank: int,
        secret: bytes | None,
        watch_seconds: float = WATCH_SECONDS,
        watch_timeout: float = WATCH_TIMEOUT_SECONDS,
    ) -> None:
        self.settings = settings
        self.kv = kv
        self.stats = PDServeStats()
        # The watch's period and patience: tests give short ones.
        self.producers = ProducerRegistry(
            settings, kv, info, tp_rank, secret, self.stats,
            watch_seconds, watch_timeout,
        )  # fmt: skip
        self._lock = self.producers.lock
        self._pulls: dict[str, Pull] = {}  # by the engine's request id
        self._done: set[str] = set()
        self._failed_blocks: set[int] = set()
        self.last_error: str | None = None  # why the latest pull failed

    def connect(self) -> None:
        """Startup: pair with the producers the entrypoint found, start the
        watch."""
        self.producers.connect()

    # ---- each engine step ----

    def start(
        self,
        loads: list[LoadSpec],
        releases: list[Lease],
        failed: list[tuple[str, list[int]]],
    ) -> None:
        with self._lock:
            self._start(loads, releases, failed)

    def _start(
        self,
        loads: list[LoadSpec],
        releases: list[Lease],
        failed: list[tuple[str, list[int]]],
    ) -> None:
        self.producers.install_paired()
        for request_id, block_ids in failed:
            self.stats.add("kv_load_failures")
            self._failed_blocks.update(block_ids)
            self._done.add(request_id)
        for spec in loads:
            pull = self._pulls[spec.request_id] = self._new_pull(spec.lease, spec)
            try:
                self._read(pull)
            except Exception as exc:  # never into vLLM's worker: recompute
                self.stats.add("kv_connector_errors")
                pull.fail(f"unexpected error: {exc!r}")
        for lease in releases:
            self._hand_back(lease)

    def _new_pull(self, lease: Lease, spec: LoadSpec | None) -> Pull:
        return Pull(lease, spec, self.producers.orphans, self._ended)

    def _read(self, pull: Pull) -> None:
        assert pull.spec is not None
        try:
            peer = self.producers.peer_for(pull.lease)
        except IncompatibleProducer as exc:
            return pull.fail(f"producer unusable: {exc}")
        pull.read(peer, time.monotonic() + self.settings.transfer_timeout)

    def _hand_back(self, lease: Lease) -> None:
        """A lease the engine will not read. One a pull still reads (the
        same lease twice) is that pull's to end."""
        if any(pull.lease == lease for pull in self._pulls.values()):
            return
        self._new_pull(lease, None).hand_back(self.producers.peer_of(lease))

    def poll(self) -> None:
        with self._lock:
            if self.producers.pump():
                pace(self.kv.device, CONSUMER_WAIT_SECONDS)

    def _ended(self, pull: Pull) -> None:
        """A pull ended (its lease let go on this rank): tell vLLM."""
        assert pull.spec is not None
        if self._pulls.get(pull.spec.request_id) is pull:
            del self._pulls[pull.spec.request_id]
        if pull.error is not None:
            return self._count_failure(pull.spec, pull.error)
        self.stats.add("kv_loads")
        self.stats.add("kv_bytes_received", pull.nbytes)
        self.stats.add("kv_blocks_received", len(pull.spec.local_block_ids))
        self.stats.observe("kv_transfer_seconds", pull.seconds)
        if pull.spec.scheduled_at:
            wait = pull.replied_at - pull.spec.scheduled_at
            self.stats.observe("ttft_transfer_wait_seconds", max(0.0, wait))
        self.stats.observe("ttft_transfer_copy_seconds", pull.done_at - pull.replied_at)
        self._done.add(pull.spec.request_id)

    def _count_failure(self, spec: LoadSpec, reason: str) -> None:
        logger.warning(
            "pdserve: pulling KV for %s failed (%s); recomputing locally",
            spec.request_id,
            reason,
        )
        self.stats.add("kv_load_failures")
        self.last_error = reason
        self._failed_blocks.update(spec.local_block_ids)
        self._done.add(spec.request_id)

    def take_done(self) -> tuple[set[str], set[int]]:
        """Requests whose pulls ended, and the blocks of the failed ones."""
        with self._lock:
            done, self._done = self._done, set()
            failed, self._failed_blocks = self._failed_blocks, set()
        return done, failed

    def take_stats(self) -> PDServeStats | None:
        with self._lock:
            return self.stats.take()

    def shutdown(self) -> None:
        self.producers.shutdown()
