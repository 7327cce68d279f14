"""The ``--kv-events-config`` pdserve passes to ``vllm serve`` on the consumer,
and where its HTTP layer subscribes to the events (``kv_events``)."""

from __future__ import annotations

import json
import os
import tempfile
import uuid
from dataclasses import asdict, dataclass

from pdserve.log import init_logger

logger = init_logger(__name__)

KV_EVENTS_FLAG = "--kv-events-config"
DEFAULT_TOPIC = "pdserve-kv"
# Unix socket paths are limited to 107 bytes.
_MAX_IPC_PATH = 100


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
