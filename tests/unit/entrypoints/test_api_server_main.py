"""What the entrypoint sets up before vLLM starts: a node key for its
processes, a producer's instance id, and the consumer's handshake with its
own API key, which goes nowhere else."""

from __future__ import annotations

import json
import os
import re
import socket

import pytest
import vllm

import pdserve
from pdserve.entrypoints import api_server, startup_producers
from pdserve.frontend import producer_metadata
from pdserve.frontend.producer_source import ProducerSource
from pdserve.lease import NODE_KEY_ENV_VAR
from pdserve.settings import ENV_VAR, KV_SECRET_ENV_VAR, ProducerAddress, Settings

PRODUCER = ["--kv-role", "producer", "--model", "m", "--kv-port", "9100"]
CONSUMER = ["--kv-role", "consumer", "--model", "m", "--producer-url", "http://p:1"]
KEY = "sk-main-5e1d"


class Started:
    """What vLLM would have been started with."""

    def __init__(self) -> None:
        self.args: list[str] = []
        self.env: dict[str, str] = {}
        self.metadata_headers: list[dict[str, str]] = []
        self.metadata_urls: list[str] = []
        self.hosts: list[str | None] = []

    def serve(self, args: list[str]) -> None:
        self.args = list(args)
        self.env = dict(os.environ)

    def fetch(self, url: str, timeout: float, headers=None) -> dict:
        headers = dict(headers or {})
        self.metadata_urls.append(url)
        self.hosts.append(headers.pop("Host", None))
        self.metadata_headers.append(headers)
        return {
            "role": "producer",
            "model": "m",
            "dtype": "auto",
            "tensor_parallel_size": 1,
            "kv_ports": [9100],
            "kv_auth": False,
            "instance_id": "0123456789abcdef",
            "protocol_version": pdserve.PROTOCOL_VERSION,
            "pdserve_version": pdserve.__version__,
            "vllm_version": vllm.__version__,
        }

    @property
    def settings(self) -> Settings:
        return Settings.from_json(self.env[ENV_VAR])

    def kv_transfer_config(self) -> str:
        return self.args[self.args.index("--kv-transfer-config") + 1]


@pytest.fixture
def started(monkeypatch):
    # Set first so that whatever main() sets is undone after the test.
    for name in (ENV_VAR, NODE_KEY_ENV_VAR, KV_SECRET_ENV_VAR, "VLLM_API_KEY"):
        monkeypatch.setenv(name, "")
    monkeypatch.delenv(KV_SECRET_ENV_VAR)
    monkeypatch.delenv("VLLM_API_KEY")
    record = Started()
    monkeypatch.setattr(api_server, "run_vllm_serve", record.serve)
    monkeypatch.setattr(producer_metadata, "fetch_metadata_once", record.fetch)
    # "p" (the consumer's --producer-url host) has one address.
    monkeypatch.setattr(ProducerSource, "resolve_blocking", lambda self: ["10.0.0.7"])
    return record


def node_key(record: Started) -> str:
    key = record.env[NODE_KEY_ENV_VAR]
    assert re.fullmatch(r"[0-9a-f]{64}", key)
    return key


@pytest.mark.parametrize("argv", [PRODUCER, CONSUMER])
def test_each_start_has_a_new_node_key(started, argv):
    api_server.main(argv)
    first = node_key(started)
    api_server.main(argv)
    assert node_key(started) != first
    # Only in the environment: not in anything vLLM logs or passes around.
    assert first not in json.dumps(started.args)


def test_producer_instance_id_is_new_each_start(started):
    api_server.main(PRODUCER)
    first = started.settings.instance_id
    assert re.fullmatch(r"[0-9a-f]{16}", first)
    assert first in started.kv_transfer_config()
    api_server.main(PRODUCER)
    assert started.settings.instance_id != first


@pytest.mark.parametrize(
    ("extra", "env_key", "sent"),
    [
        ([], None, {}),
        (["--api-key", KEY, "other"], None, {"Authorization": f"Bearer {KEY}"}),
        ([f"--api-key={KEY}"], "env-key", {"Authorization": f"Bearer {KEY}"}),
        ([], KEY, {"Authorization": f"Bearer {KEY}"}),
    ],
)
def test_handshake_sends_this_nodes_key(started, monkeypatch, extra, env_key, sent):
    if env_key is not None:
        monkeypatch.setenv("VLLM_API_KEY", env_key)
    api_server.main([*CONSUMER, *extra])
    assert started.metadata_headers == [sent]


@pytest.mark.parametrize("argv", [PRODUCER, CONSUMER])
def test_key_reaches_vllm_only_as_its_own_flag(started, argv):
    api_server.main([*argv, "--api-key", KEY])
    assert started.args.count(KEY) == 1
    assert KEY not in started.kv_transfer_config()
    # No environment variable of vLLM's processes carries it.
    assert not [name for name, value in started.env.items() if KEY in value]


def test_env_key_is_not_copied_anywhere(started, monkeypatch):
    monkeypatch.setenv("VLLM_API_KEY", KEY)
    api_server.main(CONSUMER)
    assert not [a for a in started.args if KEY in a]
    holders = [name for name, value in started.env.items() if KEY in value]
    assert holders == ["VLLM_API_KEY"]


def test_kv_secret_check_leaves_an_unreachable_port_to_the_ranks():
    # Refused connections are not a verdict: each rank retries at its start.
    with socket.create_server(("127.0.0.1", 0)) as s:
        port = s.getsockname()[1]
    producer = ProducerAddress(host="127.0.0.1", kv_ports=[port])
    api_server.try_kv_secret(producer, 2, b"secret")


def test_consumer_starts_with_the_producers_found(started):
    api_server.main(CONSUMER)
    # The name's address is called, with the URL's own Host header.
    assert started.metadata_urls == ["http://10.0.0.7:1"]
    assert started.hosts == ["p:1"]
    settings = started.settings
    assert settings.producer_urls == ["http://p:1"]
    assert settings.producers == [ProducerAddress(host="10.0.0.7", kv_ports=[9100])]


def test_kv_events_only_where_placement_can_use_them(tmp_path, monkeypatch):
    from pdserve.entrypoints import api_server
    from pdserve.settings import Settings

    never = Settings(role="consumer", model="m", local_prefill_max_tokens=0)
    assert api_server.follow_kv_events(never, []) == []
    assert never.kv_events == ""
    measured = Settings(role="consumer", model="m")
    extra = api_server.follow_kv_events(measured, [])
    assert extra[0] == "--kv-events-config" and measured.kv_events


def test_consumer_starts_while_every_producer_is_down(started, monkeypatch):
    def down(url: str, timeout: float, headers=None) -> dict:
        raise ConnectionRefusedError("nothing listens")

    monkeypatch.setattr(producer_metadata, "fetch_metadata_once", down)
    monkeypatch.setattr(startup_producers, "HANDSHAKE_RETRY_SECONDS", 0.01)
    api_server.main([*CONSUMER, "--producer-connect-timeout", "0.05"])
    # vLLM was started, with no producer to pair with at startup.
    assert started.args and started.settings.producers == []
    assert started.settings.producer_urls == ["http://p:1"]


def test_incompatible_producer_still_stops_the_consumer(started, monkeypatch):
    def other_model(url: str, timeout: float, headers=None) -> dict:
        return dict(started.fetch(url, timeout, headers), model="other")

    monkeypatch.setattr(producer_metadata, "fetch_metadata_once", other_model)
    with pytest.raises(SystemExit, match="model: consumer='m' producer='other'"):
        api_server.main(CONSUMER)
    assert started.args == []
