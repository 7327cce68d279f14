"""The prefix index's event subscriber, fed through vLLM's own ZMQ
publisher (PUB + replay ROUTER)."""

from __future__ import annotations

import time

from vllm.distributed.kv_events import (
    AllBlocksCleared,
    KVEventBatch,
    ZmqEventPublisher,
)

from pdserve.frontend.kv_events import KVEventSubscriber
from pdserve.frontend.kv_events_config import DEFAULT_TOPIC
from pdserve.frontend.prefix_index import PrefixIndex
from tests.eventually import eventually
from tests.unit.block_events import BS, PROMPT, removed, stored


def _publisher(tmp_path, replay: bool = True) -> ZmqEventPublisher:
    return ZmqEventPublisher(
        data_parallel_rank=0,
        endpoint=f"ipc://{tmp_path}/ev.sock",
        replay_endpoint=f"ipc://{tmp_path}/replay.sock" if replay else None,
        topic=DEFAULT_TOPIC,
    )


def _published(pub: ZmqEventPublisher, count: int) -> None:
    """vLLM's publisher sends on a thread of its own; what it sent is in its
    replay buffer."""
    eventually(lambda: len(pub._buffer) >= count, 5, f"{count} batch(es) sent")


def _batch(*events) -> KVEventBatch:
    return KVEventBatch(ts=time.time(), events=list(events))


def test_over_zmq_with_replay_of_what_came_before_subscribing(short_tmp):
    pub = _publisher(short_tmp)
    try:
        # Published before anyone subscribed: only the replay has it.
        pub.publish(_batch(stored([1, 2], None, PROMPT[:8])))
        _published(pub, 1)
        index = PrefixIndex(BS)
        sub = KVEventSubscriber(
            index,
            f"ipc://{short_tmp}/ev.sock",
            f"ipc://{short_tmp}/replay.sock",
            DEFAULT_TOPIC,
        ).start()
        try:
            # PUB drops until the subscription is through: publish until seen.
            eventually(
                lambda: index.cached_tokens(PROMPT) == 12,
                10,
                "the live batch in the index",
                step=lambda: pub.publish(_batch(stored([3], 2, PROMPT[8:12]))),
                interval=0.05,
            )
            assert sub.replayed >= 1
            pub.publish(_batch(removed([2])))
            eventually(lambda: index.cached_tokens(PROMPT) == 4, 10, "the removal")
            pub.publish(_batch(AllBlocksCleared()))
            eventually(lambda: len(index) == 0, 10, "the index cleared")
        finally:
            sub.close()
    finally:
        pub.shutdown()


def test_a_lone_batch_published_before_subscribing_is_caught_up(short_tmp):
    pub = _publisher(short_tmp)
    index = PrefixIndex(BS)
    sub = KVEventSubscriber(
        index, f"ipc://{short_tmp}/ev.sock", f"ipc://{short_tmp}/replay.sock"
    )
    try:
        pub.publish(_batch(stored([1, 2], None, PROMPT[:8])))
        _published(pub, 1)
        sub.start()
        # Nothing else is published: only the idle catch-up can find it.
        eventually(lambda: index.cached_tokens(PROMPT) == 8, 10, "the catch-up")
        pub.publish(_batch(removed([1])))
        eventually(lambda: index.cached_tokens(PROMPT) == 0, 10, "the removal")
        assert sub.errors == 0
    finally:
        sub.close()
        pub.shutdown()


def test_gap_without_replay_clears_the_index(short_tmp):
    index = PrefixIndex(BS)
    sub = KVEventSubscriber(index, "ipc:///nonexistent/none.sock")
    encode = __import__("msgspec").msgpack.Encoder().encode
    from vllm.distributed.kv_events import KVEventBatch as B

    sub._decoder = __import__("msgspec").msgpack.Decoder(type=B)
    payload = encode(_batch(stored([1, 2], None, PROMPT[:8])))
    sub._on_message([b"", (0).to_bytes(8, "big"), payload])
    assert index.cached_tokens(PROMPT) == 8
    sub._on_message([b"", (0).to_bytes(8, "big"), payload])  # duplicate
    assert sub.batches == 1
    later = encode(_batch(stored([3], None, PROMPT[8:12])))
    sub._on_message([b"", (5).to_bytes(8, "big"), later])  # 1..4 lost
    assert sub.gaps == 1 and index.cached_tokens(PROMPT) == 0
    sub._on_message([b"", (6).to_bytes(8, "big"), b"\xff garbage"])
    assert sub.errors == 1
    sub.close()
