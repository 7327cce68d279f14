"""What the consumer's own prefix cache holds, learned from vLLM's KV events.

The consumer's engine publishes its KV cache events (``--kv-events-config``,
``vllm.distributed.kv_events``): a ZMQ PUB socket sends multipart messages
``(topic, seq as 8-byte big-endian, msgpack(KVEventBatch))``; an optional
ROUTER "replay" socket re-sends buffered batches from a sequence number
(request: ``[b"", start_seq]`` from a DEALER; answers
``[b"", topic, seq, payload]``, ending with seq -1). One publisher per engine
core, i.e. per data-parallel rank; tensor parallelism does not multiply events
(the scheduler publishes).

``PrefixIndex`` mirrors the engine's cached full blocks. We cannot recompute
vLLM's block hashes (hash function and seed are the engine's), so each block
gets our own chain key, a digest of (parent's key, the block's token ids,
its extra keys); a prompt is walked block by block from its first token and
a block counts only if its key, hence its whole chain, is present, exactly
as vLLM's own lookup stops at the first miss.

``KVEventSubscriber`` feeds the index from a daemon thread: it is a control
path, not the KV data path, blocking ZMQ calls are simplest there, and it
keeps working whatever event loop the HTTP layer runs (the index is behind a
lock; a lookup is a short walk). Anything that may have lost an event — a
sequence gap the replay cannot fill, an undecodable batch — clears the index:
a forgotten block only costs a remote prefill, a remembered evicted block
would wrongly keep a long prompt local.

``consumer_kv_events`` builds the ``--kv-events-config`` pdserve passes to
``vllm serve`` on the consumer.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import threading
import time
import uuid
from array import array
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any, NamedTuple

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

# vLLM's types, imported lazily so this module (and its tests) import fast;
# the wire format is vLLM's KVEventBatch whatever we import.
_END_SEQ = -1
KV_EVENTS_FLAG = "--kv-events-config"
DEFAULT_TOPIC = "pdserve-kv"
# The medium vLLM's main block pool reports (also on the CPU backend);
# offload tiers report others, whose blocks would have to be loaded first.
MAIN_MEDIUM = "GPU"
# Unix socket paths are limited to 107 bytes.
_MAX_IPC_PATH = 100

BlockHash = bytes | int


class _Entry(NamedTuple):
    parent: BlockHash | None
    key: bytes
    # Compact copy of the block's tokens (4 bytes each): for inspection and
    # tests; lookups use ``key`` only.
    tokens: bytes


def _plain(value: Any) -> Any:
    """msgpack turns tuples into lists; direct calls keep tuples. One form."""
    if isinstance(value, list | tuple):
        return tuple(_plain(v) for v in value)
    return value


def chain_key(parent_key: bytes, token_ids: Sequence[int], extra: Any = None) -> bytes:
    """Our key of a block: its tokens and extra keys under its parent's key."""
    h = hashlib.blake2b(parent_key, digest_size=16)
    h.update(b"\x00" if extra is None else repr(_plain(extra)).encode())
    h.update(array("q", token_ids).tobytes())
    return h.digest()


ROOT_KEY = b""


class PrefixIndex:
    """The engine's cached full blocks: vLLM block hash → (parent hash, tokens).

    Thread-safe. ``block_size`` is the engine's (``cache_config.block_size``);
    if None, the first stored event's block size is adopted. Events for other
    block sizes (vLLM's sub-block "partial" entries), other KV cache groups
    (hybrid models, which pdserve refuses anyway), other media (offload
    tiers) or remote locality are ignored: they are never counted.
    """

    def __init__(self, block_size: int | None = None, max_blocks: int = 1 << 20):
        if block_size is not None and block_size <= 0:
            raise ValueError(f"block_size must be positive, got {block_size}")
        self.block_size = block_size
        # Guard only: the engine's cache bounds what events can store, but a
        # missed removal must not let the index grow without end.
        self.max_blocks = max_blocks
        self._lock = threading.Lock()
        # Oldest stored first: overflow drops the least recently stored.
        self._blocks: OrderedDict[BlockHash, _Entry] = OrderedDict()
        self._by_key: dict[bytes, BlockHash] = {}
        self.ignored_events = 0
        self.dropped_blocks = 0
        self.clears = 0

    def __len__(self) -> int:
        return len(self._blocks)

    def entry(self, block_hash: BlockHash) -> tuple[BlockHash | None, list[int]] | None:
        """(parent hash, token ids) of a cached block, or None."""
        with self._lock:
            e = self._blocks.get(block_hash)
        if e is None:
            return None
        return e.parent, array("I", e.tokens).tolist()

    # -- events -------------------------------------------------------------

    def apply_batch(self, batch: Any) -> None:
        """Apply a ``KVEventBatch`` (its ``events``, in order)."""
        with self._lock:
            for event in batch.events:
                self._apply(event)

    def apply(self, events: Iterable[Any]) -> None:
        with self._lock:
            for event in events:
                self._apply(event)

    def clear(self) -> None:
        with self._lock:
            self._clear()

    def _clear(self) -> None:
        self._blocks.clear()
        self._by_key.clear()
        self.clears += 1

    def _apply(self, event: Any) -> None:
        kind = type(event).__name__
        if kind == "BlockStored":
            self._stored(event)
        elif kind == "BlockRemoved":
            if self._ours(event):
                for h in event.block_hashes:
                    self._remove(h)
        elif kind == "AllBlocksCleared":
            self._clear()
        else:
            self.ignored_events += 1

    def _ours(self, event: Any) -> bool:
        return (
            getattr(event, "group_idx", None) in (None, 0)
            and getattr(event, "medium", None) in (None, MAIN_MEDIUM)
            and getattr(event, "locality", None) in (None, "LOCAL")
        )

    def _stored(self, event: Any) -> None:
        hashes = list(event.block_hashes)
        if not hashes or not self._ours(event):
            self.ignored_events += 1
            return
        if self.block_size is None:
            self.block_size = event.block_size
        bs = self.block_size
        # Null (skipped) blocks would break the hash ↔ tokens alignment.
        if event.block_size != bs or len(event.token_ids) != len(hashes) * bs:
            self.ignored_events += 1
            return
        extras = event.extra_keys or [None] * len(hashes)
        if len(extras) != len(hashes):
            self.ignored_events += 1
            return
        parent = event.parent_block_hash
        if parent is None:
            parent_key = ROOT_KEY
        else:
            known = self._blocks.get(parent)
            if known is None:
                # Parent unknown (evicted, or we missed it): the chain cannot
                # be keyed, and vLLM could not reach these blocks either
                # without re-storing the parent.
                self.ignored_events += 1
                return
            parent_key = known.key
        for i, h in enumerate(hashes):
            tokens = event.token_ids[i * bs : (i + 1) * bs]
            key = chain_key(parent_key, tokens, extras[i])
            self._store(h, _Entry(parent, key, array("I", tokens).tobytes()))
            parent, parent_key = h, key

    def _store(self, block_hash: BlockHash, entry: _Entry) -> None:
        old = self._blocks.get(block_hash)
        if old is not None:
            self._blocks.move_to_end(block_hash)
            if old.key == entry.key:
                return
            self._remove(block_hash)
        self._blocks[block_hash] = entry
        self._by_key[entry.key] = block_hash
        while len(self._blocks) > self.max_blocks:
            oldest, dropped = self._blocks.popitem(last=False)
            if self._by_key.get(dropped.key) == oldest:
                del self._by_key[dropped.key]
            self.dropped_blocks += 1

    def _remove(self, block_hash: BlockHash) -> None:
        # Children stay: a walk cannot reach them without this block, as in
        # vLLM, and their own BlockRemoved comes when they are evicted.
        entry = self._blocks.pop(block_hash, None)
        if entry is not None and self._by_key.get(entry.key) == block_hash:
            del self._by_key[entry.key]

    # -- lookup -------------------------------------------------------------

    def cached_tokens(
        self, token_ids: Sequence[int], cache_salt: str | None = None
    ) -> int:
        """Leading prompt tokens the engine would take from its prefix cache.

        Full blocks only, each with its whole chain present; like vLLM, never
        the prompt's last token (vLLM recomputes it to get logits), so at most
        ``(len - 1) // block_size`` blocks. ``cache_salt`` is the request's
        (vLLM mixes it into the first block). Requests with LoRA adapters or
        multimodal inputs hash extra keys we do not reproduce: their lookups
        find nothing (conservative), so callers may as well skip them.
        """
        bs = self.block_size
        if bs is None or len(token_ids) < 2:
            return 0
        limit = (len(token_ids) - 1) // bs
        key = ROOT_KEY
        matched = 0
        with self._lock:
            if not self._by_key:
                return 0
            for i in range(limit):
                extra = (cache_salt,) if (i == 0 and cache_salt) else None
                key = chain_key(key, token_ids[i * bs : (i + 1) * bs], extra)
                if key not in self._by_key:
                    break
                matched += 1
        return matched * bs


class KVEventSubscriber:
    """Feeds a ``PrefixIndex`` from the engine's event publisher (daemon thread).

    Follows sequence numbers: duplicates are dropped, a gap is filled from the
    replay endpoint if there is one, otherwise (or if the replay no longer
    holds the missing batches) the index is cleared and follows from there.
    On the first message it asks the replay for everything from 0: events the
    engine published before we subscribed (PUB drops them until the
    subscription reaches it).
    """

    def __init__(
        self,
        index: PrefixIndex,
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


# -- the consumer's --kv-events-config --------------------------------------


@dataclass(frozen=True)
class KVEventsSource:
    """Where the consumer's HTTP layer subscribes to its engine's events."""

    endpoint: str
    replay_endpoint: str | None
    topic: str

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> KVEventsSource:
        return cls(**json.loads(text))


class KVEventsConfigError(ValueError):
    pass


def _flag_value(rest: list[str], flag: str) -> tuple[bool, str | None]:
    """(given, last value) of ``flag`` in vLLM's argument list."""
    given, value = False, None
    for i, arg in enumerate(rest):
        if arg == flag:
            given, value = True, rest[i + 1] if i + 1 < len(rest) else None
        elif arg.startswith(flag + "="):
            given, value = True, arg.split("=", 1)[1]
        elif arg.startswith(flag + "."):
            raise KVEventsConfigError(
                f"{arg.split('=', 1)[0]}: pdserve reads {flag} only as one JSON "
                f"value, e.g. {flag} '{{\"enable_kv_cache_events\": true, ...}}'"
            )
    return given, value


def _subscribable(endpoint: str) -> str | None:
    """The address to subscribe to a publisher that binds ``endpoint``, or
    None where it connects out (vLLM binds wildcard, ipc and inproc only)."""
    if endpoint.startswith("ipc://"):
        return endpoint
    if endpoint.startswith("tcp://*:"):
        return "tcp://127.0.0.1:" + endpoint.rsplit(":", 1)[1]
    return None


def _runtime_dir() -> str:
    """A private (0700) directory for the sockets: events carry prompt token
    ids, so only this user may connect."""
    base = tempfile.gettempdir()
    if len(base) > _MAX_IPC_PATH - 60:
        base = "/tmp"
    return tempfile.mkdtemp(prefix="pdserve-", dir=base)


def consumer_kv_events(
    rest: list[str], runtime_dir: str | None = None
) -> tuple[list[str], KVEventsSource | None]:
    """The ``vllm serve`` arguments to add on the consumer and where to
    subscribe (None: no prefix index, placement then assumes nothing cached).

    - No ``--kv-events-config`` given: pdserve enables zmq events on ipc
      sockets in a fresh private directory (unique per node; ipc binds, so
      no port to race for, and nothing is exposed on the network, unlike
      vLLM's default ``tcp://*:5557``), with a replay socket, topic
      ``pdserve-kv``.
    - The user gave one (JSON form): theirs is kept unchanged (another
      subscriber, e.g. a router, may rely on it; PUB serves any number of
      subscribers) and pdserve subscribes to it if it can: enabled zmq
      publisher binding ipc or ``tcp://*:PORT`` (subscribed on 127.0.0.1).
      Otherwise — disabled, null publisher, or a publisher connecting out —
      no index, logged. The dotted form (``--kv-events-config.endpoint=...``)
      is refused: pdserve could not tell the resulting config.
    - Prefix caching off (``--no-enable-prefix-caching``): nothing to index,
      no events; or data parallelism (vLLM offsets ports per DP rank and
      cannot offset ipc paths): no events added either.
    """
    given, value = _flag_value(rest, KV_EVENTS_FLAG)
    if given:
        try:
            config = json.loads(value or "")
            if not isinstance(config, dict):
                raise ValueError("not a JSON object")
        except ValueError as exc:
            raise KVEventsConfigError(
                f"{KV_EVENTS_FLAG}: invalid JSON ({exc})"
            ) from exc
        enabled = bool(config.get("enable_kv_cache_events"))
        publisher = config.get("publisher") or ("zmq" if enabled else "null")
        endpoint = _subscribable(config.get("endpoint", "tcp://*:5557"))
        if not enabled or publisher != "zmq" or endpoint is None:
            logger.warning(
                "%s given without a zmq publisher this node can subscribe to: "
                "no prefix index, placement assumes nothing is cached locally",
                KV_EVENTS_FLAG,
            )
            return [], None
        replay = config.get("replay_endpoint")
        replay = _subscribable(replay) if replay else None
        return [], KVEventsSource(endpoint, replay, config.get("topic", ""))
    if "--no-enable-prefix-caching" in rest:
        return [], None
    dp_given, dp = _flag_value(rest, "--data-parallel-size")
    if not dp_given:
        dp_given, dp = _flag_value(rest, "-dp")
    if dp_given and dp not in (None, "1"):
        logger.warning("Data parallelism: no prefix index on this consumer")
        return [], None
    directory = runtime_dir or _runtime_dir()
    tag = uuid.uuid4().hex[:8]
    endpoint = f"ipc://{os.path.join(directory, f'kv-events-{tag}.sock')}"
    replay = f"ipc://{os.path.join(directory, f'kv-replay-{tag}.sock')}"
    if len(endpoint) > _MAX_IPC_PATH:
        raise KVEventsConfigError(f"socket path too long: {endpoint}")
    config = {
        "enable_kv_cache_events": True,
        "publisher": "zmq",
        "endpoint": endpoint,
        "replay_endpoint": replay,
        "topic": DEFAULT_TOPIC,
        # Batches per engine step kept for a subscriber that missed some.
        "buffer_steps": 10_000,
    }
    return [KV_EVENTS_FLAG, json.dumps(config)], KVEventsSource(
        endpoint, replay, DEFAULT_TOPIC
    )
