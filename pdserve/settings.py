"""pdserve's own settings, shared by the entrypoint, the HTTP middleware and
the connector halves (which receive them through vLLM's
``kv_connector_extra_config``)."""

from __future__ import annotations

import os
import secrets
from typing import Any, Literal

import msgspec

ENV_VAR = "PDSERVE_SETTINGS"
EXTRA_CONFIG_KEY = "pdserve"
# The KV side channel's shared secret travels only in this variable: Settings
# end up in vLLM's logged config and in every process's command line.
KV_SECRET_ENV_VAR = "PDSERVE_KV_SECRET"

Role = Literal["producer", "consumer"]


class ProducerAddress(msgspec.Struct, frozen=True):
    """One producer instance as this consumer reaches it."""

    host: str  # an IP address: engine threads never wait for DNS
    kv_ports: list[int]  # one per producer TP rank


class Settings(msgspec.Struct, kw_only=True):
    role: Role
    model: str
    dtype: str = "auto"
    tensor_parallel_size: int = 1
    max_model_len: int | None = None
    transport: str = "auto"
    # Producer: where its ranks' side-channel servers listen (one port a rank).
    kv_host: str = "0.0.0.0"
    kv_ports: list[int] = []
    lease_seconds: float = 30.0
    # Producer: leases hold at most this share of its KV cache blocks; past
    # it a prefill is answered without a lease (the consumer prefills).
    max_leased_fraction: float = 0.5
    # Producer: this instance's id; a restarted producer has a new one.
    # Made once where Settings are made; every engine process reads the same.
    instance_id: str = msgspec.field(default_factory=lambda: secrets.token_hex(8))
    # Consumer: its producers as given (--producer-url, each a name that may
    # have several addresses), the ones found at startup (each engine rank
    # pairs with them before serving; others are paired with on their first
    # lease), and how long to wait for them.
    producer_urls: list[str] = []
    producers: list[ProducerAddress] = []
    connect_timeout: float = 120.0
    # Consumer: a producer with more prefills than this outstanding is
    # saturated; when all are, placement may prefill locally instead.
    producer_saturation_requests: int = 8
    # Consumer: prefill locally when at most this many prompt tokens are not
    # in its own prefix cache; -1: from the measured cost model.
    local_prefill_max_tokens: int = -1
    # Consumer: where its HTTP layer follows its engine's KV cache events
    # (KVEventsSource as JSON; "" = no prefix index).
    kv_events: str = ""
    prefill_timeout: float = 60.0
    transfer_timeout: float = 30.0
    # What this node's API server renders and constrains with (chat
    # template digest, LoRA adapters, parsers): peers must agree.
    serving_identity: dict[str, str] = {}
    # Consumer: this node's private directory, shared by its HTTP layer and
    # engine ranks (which producers each rank has paired with); "" = none.
    run_dir: str = ""
    # Both nodes: the largest request body the HTTP layer reads (413 above
    # it). Multimodal requests carry images as base64 in JSON: room for a few.
    max_request_body_bytes: int = 64 * 1024 * 1024

    def to_json(self) -> str:
        return msgspec.json.encode(self).decode()

    @classmethod
    def from_json(cls, data: str | bytes) -> Settings:
        return msgspec.json.decode(data, type=cls)

    @classmethod
    def from_extra_config(cls, extra: dict) -> Settings:
        return msgspec.convert(extra[EXTRA_CONFIG_KEY], type=cls)

    @classmethod
    def from_env(cls) -> Settings | None:
        data = os.environ.get(ENV_VAR)
        return cls.from_json(data) if data else None


def default(name: str) -> Any:
    """Settings field ``name``'s default, a fresh one where a factory makes it
    (``msgspec.NODEFAULT`` if it has none): flags take theirs from here."""
    for field in msgspec.structs.fields(Settings):
        if field.name == name:
            factory = field.default_factory
            return field.default if factory is msgspec.NODEFAULT else factory()
    raise KeyError(name)


def kv_secret() -> bytes | None:
    """The KV side channel's shared secret, or None if none was given."""
    secret = os.environ.get(KV_SECRET_ENV_VAR, "")
    return secret.encode() if secret else None
