"""The consumer's prefix index, fed vLLM's own event structs: directly and
through vLLM's own ZMQ publisher (PUB + replay ROUTER)."""

from __future__ import annotations

import json
import time

import pytest
from vllm.distributed.kv_events import (
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    KVEventBatch,
    ZmqEventPublisher,
)

from pdserve.frontend.kv_events import KVEventSubscriber
from pdserve.frontend.kv_events_config import (
    DEFAULT_TOPIC,
    KV_EVENTS_FLAG,
    KVEventsConfigError,
    KVEventsSource,
    consumer_kv_events,
)
from pdserve.frontend.prefix_index import PrefixIndex
from tests.eventually import eventually

BS = 4


def stored(hashes, parent, tokens, block_size=BS, **kw) -> BlockStored:
    fields = dict(lora_id=None, medium="GPU", lora_name=None, group_idx=0)
    return BlockStored(
        block_hashes=list(hashes),
        parent_block_hash=parent,
        token_ids=list(tokens),
        block_size=block_size,
        **(fields | kw),
    )


def removed(hashes) -> BlockRemoved:
    return BlockRemoved(block_hashes=list(hashes), medium="GPU", group_idx=0)


PROMPT = list(range(100, 117))  # 17 tokens: 4 full blocks + 1


def test_chain_lookup_counts_full_blocks_and_never_the_last_token():
    index = PrefixIndex(BS)
    index.apply([stored([1, 2], None, PROMPT[:8]), stored([3], 2, PROMPT[8:12])])
    assert index.cached_tokens(PROMPT) == 12
    assert index.cached_tokens(PROMPT[:10]) == 8
    # vLLM recomputes the last prompt token: 12 tokens can hit 8 at most.
    assert index.cached_tokens(PROMPT[:12]) == 8
    assert index.cached_tokens(PROMPT[:13]) == 12
    # A partial trailing block never counts.
    assert index.cached_tokens(PROMPT[:11]) == 8
    assert index.entry(3) == (2, PROMPT[8:12])


def test_same_tokens_under_another_parent_do_not_match():
    index = PrefixIndex(BS)
    index.apply([stored([1, 2], None, [9, 9, 9, 9] + PROMPT[4:8])])
    assert index.cached_tokens(PROMPT) == 0
    other = [7, 7, 7, 7] + PROMPT[4:]
    assert index.cached_tokens(other) == 0


def test_removal_makes_children_unreachable_and_restore_revives_them():
    index = PrefixIndex(BS)
    index.apply([stored([1, 2, 3], None, PROMPT[:12])])
    index.apply([removed([2])])
    assert index.cached_tokens(PROMPT) == 4
    index.apply([removed([1])])
    assert index.cached_tokens(PROMPT) == 0
    # vLLM re-caches the evicted parents; the child it kept is reachable again.
    index.apply([stored([1, 2], None, PROMPT[:8])])
    assert index.cached_tokens(PROMPT) == 12


def test_child_of_unknown_parent_is_ignored():
    index = PrefixIndex(BS)
    index.apply([stored([5], 99, PROMPT[4:8])])
    assert len(index) == 0 and index.ignored_events == 1


def test_all_blocks_cleared():
    index = PrefixIndex(BS)
    index.apply([stored([1, 2], None, PROMPT[:8])])
    index.apply([AllBlocksCleared()])
    assert index.cached_tokens(PROMPT) == 0 and len(index) == 0


def test_other_block_sizes_groups_media_are_not_counted():
    index = PrefixIndex(BS)
    # vLLM's sub-block "partial" entry: one hash, block_size < the engine's.
    index.apply([stored([1], None, PROMPT[:2], block_size=2)])
    index.apply(
        [BlockStored(**{**_fields(stored([2], None, PROMPT[:4])), "group_idx": 1})]
    )
    index.apply(
        [BlockStored(**{**_fields(stored([3], None, PROMPT[:4])), "medium": "CPU"})]
    )
    # Hash/token mismatch (null blocks skipped): not indexable.
    index.apply([stored([4], None, PROMPT[:8])])
    assert len(index) == 0 and index.ignored_events == 4


def _fields(event) -> dict:
    return {f: getattr(event, f) for f in event.__struct_fields__}


def test_block_size_adopted_from_first_event():
    index = PrefixIndex()
    index.apply([stored([1], None, PROMPT[:4])])
    assert index.block_size == BS and index.cached_tokens(PROMPT) == 4


def test_cache_salt_and_lora_extra_keys():
    index = PrefixIndex(BS)
    index.apply([stored([1, 2], None, PROMPT[:8], extra_keys=[("salt-a",), None])])
    assert index.cached_tokens(PROMPT) == 0
    assert index.cached_tokens(PROMPT, cache_salt="salt-b") == 0
    assert index.cached_tokens(PROMPT, cache_salt="salt-a") == 8
    lora = PrefixIndex(BS)
    lora.apply([stored([1], None, PROMPT[:4], lora_name="ad", extra_keys=[("ad",)])])
    assert lora.cached_tokens(PROMPT) == 0


def test_restore_is_idempotent_and_memory_is_bounded():
    index = PrefixIndex(BS, max_blocks=3)
    index.apply([stored([1, 2], None, PROMPT[:8])])
    index.apply([stored([1, 2], None, PROMPT[:8])])  # "full" report mode re-store
    assert len(index) == 2
    index.apply([stored([3, 4], 2, PROMPT[8:16])])
    assert len(index) == 3 and index.dropped_blocks == 1
    # The oldest (block 1, the root) went: nothing is reachable.
    assert index.cached_tokens(PROMPT) == 0


# -- through vLLM's own publisher -------------------------------------------


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


@pytest.fixture
def short_tmp(tmp_path_factory):
    # ipc paths must stay under ~100 bytes; pytest's basetemp may be long.
    import tempfile

    with tempfile.TemporaryDirectory(prefix="pi-", dir="/tmp") as d:
        yield d


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


# -- --kv-events-config -----------------------------------------------------


def test_default_config_is_private_ipc_with_replay(short_tmp):
    args, source = consumer_kv_events(
        ["--max-model-len", "1024"], runtime_dir=short_tmp
    )
    assert args[0] == KV_EVENTS_FLAG
    config = json.loads(args[1])
    assert config["enable_kv_cache_events"] and config["publisher"] == "zmq"
    assert config["endpoint"].startswith(f"ipc://{short_tmp}/")
    assert source == KVEventsSource(
        config["endpoint"], config["replay_endpoint"], DEFAULT_TOPIC
    )
    assert KVEventsSource.from_json(source.to_json()) == source
    # vLLM accepts it.
    from vllm.config.kv_events import KVEventsConfig

    KVEventsConfig(**config)
    # Two nodes never share sockets.
    assert consumer_kv_events([], runtime_dir=short_tmp)[1] != source


def test_runtime_dir_is_private():
    import os
    import stat

    _, source = consumer_kv_events([])
    directory = os.path.dirname(source.endpoint.removeprefix("ipc://"))
    assert stat.S_IMODE(os.stat(directory).st_mode) == 0o700
    os.rmdir(directory)


def test_user_config_is_kept_and_subscribed_when_possible():
    user = {"enable_kv_cache_events": True, "endpoint": "tcp://*:6000", "topic": "t"}
    args, source = consumer_kv_events([KV_EVENTS_FLAG, json.dumps(user)])
    assert args == [] and source == KVEventsSource("tcp://127.0.0.1:6000", None, "t")
    off = {"enable_kv_cache_events": False}
    assert consumer_kv_events([f"{KV_EVENTS_FLAG}={json.dumps(off)}"]) == ([], None)
    out = {"enable_kv_cache_events": True, "endpoint": "tcp://router:5557"}
    assert consumer_kv_events([KV_EVENTS_FLAG, json.dumps(out)]) == ([], None)
    with pytest.raises(KVEventsConfigError):
        consumer_kv_events([KV_EVENTS_FLAG, "{not json"])
    with pytest.raises(KVEventsConfigError):
        consumer_kv_events([f"{KV_EVENTS_FLAG}.endpoint=ipc:///x"])


def test_no_events_without_prefix_caching_or_with_dp():
    assert consumer_kv_events(["--no-enable-prefix-caching"]) == ([], None)
    assert consumer_kv_events(["--data-parallel-size", "2"]) == ([], None)
