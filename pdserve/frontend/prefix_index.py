"""What the consumer's own prefix cache holds, learned from vLLM's KV events.

``PrefixIndex`` mirrors the engine's cached full blocks. We cannot recompute
vLLM's block hashes (hash function and seed are the engine's), so each block
gets our own chain key, a digest of (parent's key, the block's token ids,
its extra keys); a prompt is walked block by block from its first token and
a block counts only if its key, hence its whole chain, is present, exactly
as vLLM's own lookup stops at the first miss. It is fed by
``kv_events.KVEventSubscriber`` (the index is behind a lock; a lookup is a
short walk).
"""

from __future__ import annotations

import hashlib
import threading
from array import array
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from typing import Any, NamedTuple

from pdserve.log import init_logger

logger = init_logger(__name__)

# The medium vLLM's main block pool reports (also on the CPU backend);
# offload tiers report others, whose blocks would have to be loaded first.
MAIN_MEDIUM = "GPU"

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
