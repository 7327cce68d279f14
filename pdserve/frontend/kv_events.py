"""Follows the consumer engine's KV events into an index.

The engine publishes its KV cache events (``--kv-events-config``,
``vllm.distributed.kv_events``): a ZMQ PUB socket sends multipart messages
``(topic, seq as 8-byte big-endian, msgpack(KVEventBatch))``; an optional
ROUTER "replay" socket re-sends buffered batches from a sequence number
(request: ``[b"", start_seq]`` from a DEALER; answers
``[b"", topic, seq, payload]``, ending with seq -1). One publisher per engine
core, i.e. per data-parallel rank; tensor parallelism does not multiply events
(the scheduler publishes).

``KVEventSubscriber`` runs on a daemon thread: it is a control path, not the
KV data path, blocking ZMQ calls are simplest there, and it keeps working
whatever event loop the HTTP layer runs. Anything that may have lost an
event (a sequence gap the replay cannot fill, an undecodable batch) clears
the index: a forgotten block only costs a remote prefill, a remembered
evicted block would wrongly keep a long prompt local. It knows the index
only as an ``EventSink``.
"""

from __future__ import annotations

import threading
import time
from typing import Any, Protocol

import msgspec
import zmq

from pdserve.log import init_logger
from pdserve.timing import (
    KV_EVENTS_POLL_MS,
    KV_EVENTS_REPLAY_MS,
    KV_EVENTS_SYNC_SECONDS,
)
from pdserve.vllm_compat import replay_frame

logger = init_logger(__name__)

# The replay's last frame.
_END_SEQ = -1


class EventSink(Protocol):
    """What the subscriber feeds: batches in order, or "forget everything"."""

    def apply_batch(self, batch: Any) -> None: ...

    def clear(self) -> None: ...


class KVEventSubscriber:
    """Feeds an index (a ``PrefixIndex``) from the engine's events (a daemon
    thread).

    Follows sequence numbers: duplicates are dropped, a gap is filled from the
    replay endpoint if there is one, otherwise (or if the replay no longer
    holds the missing batches) the index is cleared and follows from there.
    On the first message it asks the replay for everything from 0: events the
    engine published before we subscribed (PUB drops them until the
    subscription reaches it).
    """

    def __init__(
        self,
        index: EventSink,
        endpoint: str,
        replay_endpoint: str | None = None,
        topic: str = "",
    ) -> None:
        self.index = index
        self.endpoint = endpoint
        self.replay_endpoint = replay_endpoint
        self.topic = topic.encode()
        self.batches = 0
        self.gaps = 0
        self.replayed = 0
        self.errors = 0
        self._next_seq: int | None = None
        self._sync_at = 0.0
        self._decoder: msgspec.msgpack.Decoder | None = None
        self._ctx = zmq.Context()
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._thread = threading.Thread(
            target=self._run, name="pdserve-kv-events", daemon=True
        )

    def start(self, wait: float = 5.0) -> KVEventSubscriber:
        self._thread.start()
        self._ready.wait(wait)
        return self

    def close(self, timeout: float = 2.0) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout)
        self._ctx.destroy(linger=0)

    def _run(self) -> None:
        from vllm.distributed.kv_events import KVEventBatch

        self._decoder = msgspec.msgpack.Decoder(type=KVEventBatch)
        sub = self._ctx.socket(zmq.SUB)
        try:
            sub.setsockopt(zmq.SUBSCRIBE, self.topic)
            sub.connect(self.endpoint)
            self._ready.set()
            while not self._stop.is_set():
                if not sub.poll(KV_EVENTS_POLL_MS):
                    # Idle: PUB drops what it sent before our subscription
                    # reached it, and a lost last batch shows no gap. Ask the
                    # replay for anything newer than what we hold.
                    if self.replay_endpoint and time.monotonic() >= self._sync_at:
                        self._sync_at = time.monotonic() + KV_EVENTS_SYNC_SECONDS
                        self._guarded(self._catch_up)
                    continue
                frames = sub.recv_multipart()
                self._sync_at = time.monotonic() + KV_EVENTS_SYNC_SECONDS
                self._guarded(self._on_message, frames)
        except zmq.ContextTerminated:
            pass
        finally:
            sub.close(linger=0)

    def _guarded(self, work: Any, *args: Any) -> None:
        try:
            work(*args)
        except zmq.ContextTerminated:
            raise
        except Exception:  # never let the thread die: forget instead
            self.errors += 1
            logger.exception("KV event handling failed; prefix index cleared")
            self.index.clear()

    def _catch_up(self) -> None:
        """Apply whatever the replay holds from the next expected batch on."""
        for seq, payload in self._replay(self._next_seq or 0):
            expected = self._next_seq or 0
            if seq < expected:
                continue
            if seq > expected:
                logger.warning(
                    "Missed KV events from %d; prefix index cleared", expected
                )
                self.index.clear()
            self._apply(seq, payload)
            self.replayed += 1

    def _on_message(self, frames: list[bytes]) -> None:
        if len(frames) != 3:
            self.errors += 1
            return
        _, seq_bytes, payload = frames
        seq = int.from_bytes(seq_bytes, "big", signed=True)
        if self._next_seq is None:
            self._next_seq = 0 if self.replay_endpoint else seq
        if seq < self._next_seq:
            return  # already applied (through a replay)
        if seq > self._next_seq:
            self.gaps += 1
            self._fill(self._next_seq, seq)
        self._apply(seq, payload)

    def _fill(self, start: int, end: int) -> None:
        """Apply batches start..end-1 from the replay, or clear the index."""
        got = self._replay(start) if self.replay_endpoint else []
        for seq, payload in got:
            if self._next_seq <= seq < end:
                if seq != self._next_seq:
                    break
                self._apply(seq, payload)
                self.replayed += 1
        if self._next_seq != end:
            if start > 0 or not self.replay_endpoint:
                logger.warning(
                    "Missed KV events %d..%d; prefix index cleared", start, end - 1
                )
            self.index.clear()
            self._next_seq = end

    def _replay(self, start: int) -> list[tuple[int, bytes]]:
        dealer = self._ctx.socket(zmq.DEALER)
        out: list[tuple[int, bytes]] = []
        try:
            dealer.connect(self.replay_endpoint)
            dealer.send_multipart([b"", start.to_bytes(8, "big")])
            while dealer.poll(KV_EVENTS_REPLAY_MS):
                frame = replay_frame(dealer.recv_multipart())
                if frame is None:
                    break
                seq = int.from_bytes(frame[0], "big", signed=True)
                if seq == _END_SEQ:
                    break
                out.append((seq, frame[1]))
        finally:
            dealer.close(linger=0)
        return out

    def _apply(self, seq: int, payload: bytes) -> None:
        assert self._decoder is not None
        self._next_seq = seq + 1
        try:
            batch = self._decoder.decode(payload)
        except msgspec.DecodeError:
            # It may have held removals: forget rather than over-count.
            self.errors += 1
            logger.warning("Undecodable KV event batch %d; prefix index cleared", seq)
            self.index.clear()
            return
        self.batches += 1
        self.index.apply_batch(batch)
