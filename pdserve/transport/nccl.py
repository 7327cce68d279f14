"""Cross-host GPU transport: NCCL (RCCL on ROCm) point-to-point over a
dedicated two-party process group per producer/consumer rank pair, set up
through a TCPStore the producer rank hosts. Never touches the default group.

A read moves in chunks through one fixed staging buffer on each side
(allocated once per session, bounded): the producer gathers a chunk's blocks
of every layer in one launch and sends it; the consumer receives it and
scatters it in one launch, only after the receive has completed, so a failed
transfer never writes into its blocks. Reads of a session follow one another
(sends and receives always pair up). Nothing waits on the host: completion is
polled every engine step, and a transfer past its deadline aborts the pair's
communicator (never the process: the group is built without NCCL's
process-killing error handling) and the session is dropped.

Sessions: a producer keeps one per consumer rank. The hello names its
consumer rank; a consumer that says hello again (it paired anew) has given
up its older session, whose communicator, staging buffer and store the
producer closes before building the new one (sessions.py).

Streams: a session takes one stream of ours when it is built, on either
side, and uses it for every gather, scatter and NCCL call of all its reads
until it closes; its communicator adds NCCL's (RCCL's) own internal stream.
Nothing creates a stream per read or per chunk. That keeps the count small
and fixed, which matters on ROCm: HIP maps streams onto GPU_MAX_HW_QUEUES
hardware queues (4 by default), and streams beyond that share queues, so
their work serializes behind unrelated work. ``torch.cuda.Stream()`` takes
its stream from torch's fixed per-device pool (round-robin), so even
MAX_SESSIONS sessions never create more streams than that pool holds.
"""

from __future__ import annotations

import os
import threading
import time
from collections import deque
from contextlib import contextmanager
from typing import Any

import torch

from pdserve.channel import Channel
from pdserve.kv_cache import HeadRange, PagedKVCache
from pdserve.log import init_logger
from pdserve.protocol import RankInfo, ReadReply, TransportHello, TransportWelcome
from pdserve.timing import (
    NCCL_GROUP_TIMEOUT,
    NCCL_STORE_TIMEOUT,
    NCCL_TRANSFER_SECONDS,
)
from pdserve.transport.base import (
    Incoming,
    KVTransport,
    Outgoing,
    SessionLost,
    TransportUnavailable,
    greet,
    layer_sizes,
    require_gpus,
)
from pdserve.transport.block_copy import (
    BlockCopier,
    block_ids_on,
    block_layout,
    staging_layouts,
)
from pdserve.transport.sessions import SessionTable

logger = init_logger(__name__)

PRODUCER, CONSUMER = 0, 1
STAGING_BYTES = int(os.environ.get("PDSERVE_NCCL_STAGING_BYTES", str(64 << 20)))
# What a consumer accepts of a producer's chunk size.
MAX_STAGING_BYTES = 1 << 30
MAX_CHUNK_BLOCKS = 1 << 17
MAX_SESSIONS = 64
_env_lock = threading.Lock()


@contextmanager
def _no_error_teardown():
    """ProcessGroupNCCL reads its error handling mode when built: without
    this, a timed-out or aborted pair transfer would kill the whole worker."""
    with _env_lock:
        saved = os.environ.get("TORCH_NCCL_ASYNC_ERROR_HANDLING")
        os.environ["TORCH_NCCL_ASYNC_ERROR_HANDLING"] = "0"
        try:
            yield
        finally:
            if saved is None:
                del os.environ["TORCH_NCCL_ASYNC_ERROR_HANDLING"]
            else:
                os.environ["TORCH_NCCL_ASYNC_ERROR_HANDLING"] = saved


def pair_group(store: Any, rank: int, device: torch.device) -> Any:
    from torch.distributed import ProcessGroupNCCL

    options = ProcessGroupNCCL.Options()
    options._timeout = NCCL_GROUP_TIMEOUT
    with _no_error_teardown():
        group = ProcessGroupNCCL(store, rank, 2, options)
    return group


def producer_store(host: str) -> Any:
    """The TCPStore a pair rendezvouses through; the consumer connects."""
    from torch.distributed import TCPStore

    return TCPStore(
        host, 0, 2, is_master=True, timeout=NCCL_STORE_TIMEOUT, wait_for_workers=False
    )


def abort_group(group: Any) -> None:
    for name in ("abort", "_abort", "shutdown", "_shutdown"):
        method = getattr(group, name, None)
        if method is not None:
            try:
                method()
            except Exception as exc:  # already broken: nothing more to do
                logger.debug("NCCL pair group %s failed: %s", name, exc)
            return


def chunk_blocks_for(kv: PagedKVCache) -> int:
    """Blocks a chunk holds on this node (the producer's count is the pair's)."""
    return max(1, STAGING_BYTES // kv.bytes_per_block())


class _Session:
    def __init__(
        self, group: Any, store: Any, kv: PagedKVCache, chunk_blocks: int
    ) -> None:
        self.group = group
        self.store = store  # kept alive: the group rendezvoused through it
        self.kv = kv
        # The session's one stream, reused by all its reads (module docstring).
        self.stream = torch.cuda.Stream(device=kv.device)
        per_block = kv.bytes_per_block()
        # Both sides cut a read into the same chunks, or sends and receives
        # would not match: the consumer takes the producer's size.
        self.chunk_blocks = chunk_blocks
        self.staging = torch.empty(
            self.chunk_blocks * per_block, dtype=torch.uint8, device=kv.device
        )
        self.local = [
            block_layout(t, d) for t, d in zip(kv.layers, kv.block_dims, strict=True)
        ]
        self.broken = False
        # One transfer at a time, in the order reads were answered: sends
        # and receives of the pair always match.
        self.queue: deque[_Chunked] = deque()
        # A read's step on the engine's thread and closing from the session
        # setup thread (a consumer's new session replaces this one) never
        # interleave: closing frees the staging buffer a step writes.
        self.lock = threading.RLock()

    def staged(self, num: int) -> list:
        shape = [(len(lay.segment_offsets), lay.segment_bytes) for lay in self.local]
        return staging_layouts(self.staging.data_ptr(), shape, num)

    def copier(self, to_staging: bool, num: int) -> BlockCopier:
        staged = self.staged(num)
        src, dst = (self.local, staged) if to_staging else (staged, self.local)
        return BlockCopier(src, dst, anchor=self.kv.layers[0])

    def staging_view(self, num: int) -> torch.Tensor:
        return self.staging[: num * self.kv.bytes_per_block()]

    def connect(self, rank: int) -> None:
        """Build the communicator now (NCCL does it on a pair's first
        transfer, which both sides must enter): one byte, producer to
        consumer, bounded by the store timeout."""
        byte = torch.zeros(1, dtype=torch.uint8, device=self.kv.device)
        with torch.cuda.device(self.kv.device), torch.cuda.stream(self.stream):
            if rank == PRODUCER:
                work = self.group.send([byte], CONSUMER, 0)
            else:
                work = self.group.recv([byte], PRODUCER, 0)
        deadline = time.monotonic() + NCCL_STORE_TIMEOUT.total_seconds()
        while not work.is_completed():
            if time.monotonic() > deadline:
                raise TimeoutError("NCCL pair setup timed out")
            time.sleep(0.001)

    def abort(self, reason: str) -> None:
        with self.lock:
            if not self.broken:
                logger.warning("pdserve: NCCL pair session aborted: %s", reason)
                self.broken = True
                abort_group(self.group)
            self.queue.clear()

    def close(self, reason: str) -> None:
        """Abort, and let go of the staging buffer and the store now: a read
        still holding the session sees it broken and never touches them."""
        with self.lock:
            self.abort(reason)
            # No gather or scatter of a read may still use the staging memory
            # when the allocator hands it to someone else.
            self.stream.synchronize()
            self.staging = torch.empty(0, dtype=torch.uint8, device=self.kv.device)
            self.store = None


def _ids(block_ids: list[int] | range, device: torch.device) -> torch.Tensor:
    return block_ids_on(block_ids, device)


class _Chunked:
    """A read in chunks of ``session.chunk_blocks`` blocks, one at a time."""

    def __init__(self, session: _Session, block_ids: list[int]) -> None:
        self.session = session
        self.block_ids = block_ids  # this side's blocks
        self.next = 0
        self.work: Any = None
        self.deadline = 0.0  # set when its turn comes
        session.queue.append(self)

    def _my_turn(self) -> bool:
        if self.session.broken:
            raise ConnectionError("NCCL pair session is broken")
        if not self.session.queue or self.session.queue[0] is not self:
            return False
        if not self.deadline:
            self.deadline = time.monotonic() + NCCL_TRANSFER_SECONDS
        return True

    def _done(self) -> bool:
        if self.next < len(self.block_ids):
            return False
        self.session.queue.popleft()
        return True

    def _chunk(self) -> list[int]:
        return self.block_ids[self.next : self.next + self.session.chunk_blocks]

    def _waiting(self) -> bool:
        """Whether the current chunk's NCCL work is still running."""
        if self.work is None:
            return False
        if self.session.broken:
            raise ConnectionError("NCCL pair session is broken")
        try:
            done = self.work.is_completed()
        except Exception as exc:
            self.session.abort(str(exc))
            raise ConnectionError(f"NCCL transfer failed: {exc}") from exc
        if not done and time.monotonic() > self.deadline:
            self.session.abort("transfer timed out")
            raise TimeoutError("NCCL transfer timed out")
        return not done


class _Sending(_Chunked, Outgoing):
    def advance(self) -> bool:
        with self.session.lock:
            return self._advance()

    def _advance(self) -> bool:
        try:
            if not self._my_turn():
                return False
            while not self._waiting():
                if self.work is not None:
                    self.work = None
                    self.next += self.session.chunk_blocks
                if self._done():
                    return True
                self._send_chunk()
            return False
        except (ConnectionError, TimeoutError):
            return True  # aborted: nothing will read the blocks any more

    def _send_chunk(self) -> None:
        session = self.session
        blocks = self._chunk()
        device = session.kv.device
        with torch.cuda.device(device), torch.cuda.stream(session.stream):
            slots = _ids(range(len(blocks)), device)
            copier = session.copier(True, len(blocks))
            copier.copy(_ids(blocks, device), slots, session.stream)
            view = session.staging_view(len(blocks))
            self.work = session.group.send([view], CONSUMER, 0)

    def abort(self) -> None:
        self.session.abort("connection closed mid-transfer")


class _Receiving(_Chunked, Incoming):
    def __init__(self, session: _Session, block_ids: list[int]) -> None:
        super().__init__(session, block_ids)
        self.scattered: torch.cuda.Event | None = None

    def poll(self) -> bool:
        with self.session.lock:
            return self._poll()

    def _poll(self) -> bool:
        if not self._my_turn():
            return False
        if self.scattered is not None:
            if not self.scattered.query():
                return False
            self.scattered = None
            self.next += self.session.chunk_blocks
        if self._waiting():
            return False
        if self.work is not None:
            # Received completely: only now may it go into our blocks.
            self._scatter()
            self.work = None
            return False
        if self._done():
            return True
        self._receive_chunk()
        return False

    def _receive_chunk(self) -> None:
        session = self.session
        view = session.staging_view(len(self._chunk()))
        with torch.cuda.device(session.kv.device), torch.cuda.stream(session.stream):
            self.work = session.group.recv([view], PRODUCER, 0)

    def _scatter(self) -> None:
        session = self.session
        blocks = self._chunk()
        device = session.kv.device
        with torch.cuda.device(device), torch.cuda.stream(session.stream):
            self.work.wait()  # orders the stream after the receive
            slots = _ids(range(len(blocks)), device)
            copier = session.copier(False, len(blocks))
            copier.copy(slots, _ids(blocks, device), session.stream)
            self.scattered = torch.cuda.Event()
            self.scattered.record(session.stream)

    def abort(self) -> None:
        self.session.abort("load abandoned")


class NcclTransport(KVTransport):
    name = "nccl"
    needs_secret = True

    def __init__(self, host: str = "0.0.0.0") -> None:
        self.host = host
        self._sessions: SessionTable[_Session] = SessionTable(
            lambda pair, reason: pair.close(reason), MAX_SESSIONS
        )

    # ---- producer ----

    def welcome(self, hello: TransportHello, kv: PagedKVCache) -> TransportWelcome:
        if kv.device.type != "cuda":
            return TransportWelcome(ok=False, error="producer KV is not on a GPU")
        self._sessions.make_room(hello.session, hello.consumer_id)
        store = producer_store(self.host)
        group = pair_group(store, PRODUCER, kv.device)
        chunk = chunk_blocks_for(kv)
        pair = _Session(group, store, kv, chunk)
        self._sessions.add(hello.session, hello.consumer_id, pair)
        return TransportWelcome(
            ok=True, payload={"store_port": store.port, "chunk_blocks": chunk}
        )

    def after_welcome(self, session: str) -> None:
        pair = self._sessions.get(session)
        if pair is not None:
            pair.connect(PRODUCER)

    def serve(
        self,
        channel: Channel,
        kv: PagedKVCache,
        block_ids: list[int],
        session: str,
        heads: HeadRange = None,
    ) -> Outgoing:
        assert heads is None, "whole blocks only (moves_heads is False)"
        pair = self._sessions.get(session)
        if pair is None or pair.broken:
            raise SessionLost("unknown or broken nccl session")
        channel.send(ReadReply(ok=True, layer_nbytes=layer_sizes(kv, len(block_ids))))
        return _Sending(pair, list(block_ids))

    def close_session(self, session: str) -> None:
        self._sessions.close(session, "session closed")

    # ---- consumer ----

    def open_session(
        self, client, kv: PagedKVCache, remote: RankInfo, consumer_id: str = ""
    ) -> str:
        require_gpus(self.name, kv, remote)
        import torch.distributed as dist

        if not dist.is_nccl_available():
            raise TransportUnavailable("this torch build has no NCCL/RCCL")
        session, welcome = greet(self.name, client, kv, remote, consumer_id)
        chunk = welcome.payload.get("chunk_blocks")
        if not isinstance(chunk, int) or not 1 <= chunk <= MAX_CHUNK_BLOCKS:
            raise TransportUnavailable(f"producer's NCCL chunk of {chunk!r} blocks")
        if chunk * kv.bytes_per_block() > MAX_STAGING_BYTES:
            raise TransportUnavailable(
                f"producer's NCCL chunk of {chunk} blocks needs more staging "
                f"than {MAX_STAGING_BYTES} bytes"
            )
        store = dist.TCPStore(
            client.host,
            welcome.payload["store_port"],
            2,
            is_master=False,
            timeout=NCCL_STORE_TIMEOUT,
        )
        pair = _Session(pair_group(store, CONSUMER, kv.device), store, kv, chunk)
        try:
            pair.connect(CONSUMER)
        except Exception as exc:
            pair.abort(str(exc))
            raise TransportUnavailable(f"NCCL pair setup failed: {exc}") from exc
        self._sessions.add(session, "", pair)
        return session

    def receive(
        self,
        kv: PagedKVCache,
        remote_block_ids: list[int],
        local_block_ids: list[int],
        session: str,
        heads: HeadRange = None,
    ) -> Incoming:
        assert heads is None, "whole blocks only (moves_heads is False)"
        pair = self._sessions.get(session)
        if pair is None or pair.broken:
            raise ConnectionError("nccl session is unknown or broken")
        return _Receiving(pair, list(local_block_ids))

    def healthy(self, session: str) -> bool:
        pair = self._sessions.get(session)
        return pair is not None and not pair.broken

    def drop_sessions(self) -> None:
        self._sessions.close_all("session closed")
