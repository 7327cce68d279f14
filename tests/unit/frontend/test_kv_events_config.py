"""--kv-events-config: the consumer's own events socket, or the user's."""

from __future__ import annotations

import json

import pytest

from pdserve.frontend.kv_events_config import (
    DEFAULT_TOPIC,
    KV_EVENTS_FLAG,
    KVEventsConfigError,
    KVEventsSource,
    consumer_kv_events,
)


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
