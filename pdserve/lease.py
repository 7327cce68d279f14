"""The lease: what a producer hands out for a finished prefill, typed once.

A lease travels producer engine → producer HTTP answer → consumer HTTP layer
→ consumer engine → consumer workers. It is parsed into ``Lease`` exactly
once at each process boundary (``Lease.from_params``); anything that does not
parse or verify means "prefill locally", never an exception.

Two MACs protect it, each keyed with a random per-node key that never leaves
the node (``NODE_KEY_ENV_VAR``, set by the entrypoint for its own processes):
- ``token``: the producer's HMAC of (request id, prompt hash). Its workers
  verify it on every read before any lease state is consulted, so reads of
  leases this producer never issued are refused at once.
- ``mac``: the consumer's HMAC of the whole lease, added by the HTTP layer
  that obtained it from the producer. Its engine decodes only on leases that
  carry it: client-supplied ``kv_transfer_params`` can never pose as one.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import os
import secrets
from typing import Annotated, Any, Literal

import msgspec

# kv_transfer_params keys. vLLM itself reads ``do_remote_prefill`` (metrics,
# rejection cleanup), so a consumer request carrying a lease sets it too.
DO_REMOTE_DECODE = "do_remote_decode"
DO_REMOTE_PREFILL = "do_remote_prefill"
LEASE_KEY = "pdserve_lease"
# A producer's answer without a lease says why (a short snake_case reason):
# the consumer prefills locally at once.
REFUSED_KEY = "pdserve_refused"

NODE_KEY_ENV_VAR = "PDSERVE_NODE_KEY"

# Bounds that keep a hostile or broken peer's lease from costing anything.
MAX_ID_CHARS = 256
MAX_BLOCKS = 1 << 20
MAX_PORTS = 1024

Id = Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_ID_CHARS)]
BlockId = Annotated[int, msgspec.Meta(ge=0, lt=1 << 40)]
Port = Annotated[int, msgspec.Meta(ge=1, le=65535)]
Digest = Annotated[str, msgspec.Meta(min_length=1, max_length=128)]


# Non-finite logprobs (a token masked to -inf) have no JSON number form.
NonFinite = Literal["inf", "-inf", "nan"]
TokenId = Annotated[int, msgspec.Meta(ge=0, lt=1 << 31)]
# vLLM caps logprobs per token (--max-logprobs, 20 by default); a row wider
# than this is refused rather than carried.
MAX_LOGPROBS_ROW = 1025


class LogprobsRow(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """The producer engine's logprobs of its first token, as vLLM's sampler
    gave them (its ``LogprobsLists`` row): the sampled token first, then the
    top ones; float32 values round-trip exactly through JSON."""

    token_ids: Annotated[list[TokenId], msgspec.Meta(max_length=MAX_LOGPROBS_ROW)]
    logprobs: Annotated[
        list[float | NonFinite], msgspec.Meta(max_length=MAX_LOGPROBS_ROW)
    ]
    rank: Annotated[int, msgspec.Meta(ge=0)]

    @classmethod
    def of(cls, token_ids: list[int], logprobs: list[float], rank: int) -> LogprobsRow:
        return cls(list(token_ids), [_finite_or_name(v) for v in logprobs], rank)

    def values(self) -> list[float]:
        return [float(v) for v in self.logprobs]


def _finite_or_name(value: float) -> float | str:
    return value if math.isfinite(value) else str(value)


class FirstToken(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """The token the producer sampled after the prompt: the consumer emits it
    as the request's first output and continues from it."""

    token_id: TokenId
    logprobs: LogprobsRow | None = None


class Lease(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """KV blocks a producer holds for one consumer request."""

    # The producer's own request id (vLLM adds a random suffix to ids).
    request_id: Id
    token: Digest
    # The producer instance that issued it: a restarted producer is new.
    instance_id: Id
    block_ids: Annotated[
        list[BlockId], msgspec.Meta(min_length=1, max_length=MAX_BLOCKS)
    ]
    prompt_hash: Digest
    num_prompt_tokens: Annotated[int, msgspec.Meta(ge=1)]
    # One side-channel port per producer TP rank.
    kv_ports: Annotated[list[Port], msgspec.Meta(min_length=1, max_length=MAX_PORTS)]
    # Where the producer's part of the time to first token went, and when
    # (wall clock) it issued the lease: the answer's way back is timed from it.
    producer_queue_seconds: Annotated[float, msgspec.Meta(ge=0)] = 0.0
    producer_prefill_seconds: Annotated[float, msgspec.Meta(ge=0)] = 0.0
    issued_at: Annotated[float, msgspec.Meta(ge=0)] = 0.0
    # The producer's first output token (and its logprobs, when asked).
    first_token: FirstToken | None = None
    # Where the consumer reaches the producer's KV ports (an IP address):
    # set by the consumer's HTTP layer, which chose the producer, before it
    # signs; whatever a producer puts here is replaced.
    kv_host: Annotated[str, msgspec.Meta(max_length=MAX_ID_CHARS)] = ""
    # When (wall clock) the consumer's HTTP layer handed the request to its
    # own vLLM: the engine times its frontend from it. Set before signing.
    handed_at: Annotated[float, msgspec.Meta(ge=0)] = 0.0
    # The consumer's MAC; empty until its HTTP layer adds it.
    mac: Annotated[str, msgspec.Meta(max_length=128)] = ""

    # ---- at process boundaries ----

    def to_params(self) -> dict[str, Any]:
        """kv_transfer_params that carry this lease."""
        return {DO_REMOTE_PREFILL: True, LEASE_KEY: msgspec.to_builtins(self)}

    @classmethod
    def from_params(cls, params: object) -> Lease | None:
        """The lease in ``params``, or None if there is none or it is malformed."""
        if not isinstance(params, dict):
            return None
        try:
            return msgspec.convert(params.get(LEASE_KEY), type=cls)
        except (msgspec.ValidationError, TypeError, ValueError):
            return None

    @classmethod
    def checked(cls, lease: Lease) -> Lease:
        """``lease`` as a consumer will parse it; raises ValidationError if
        it would not parse there (structs are not validated when built)."""
        return msgspec.convert(msgspec.to_builtins(lease), type=cls)

    # ---- the consumer's MAC ----

    def signed(self, key: bytes, kv_host: str, handed_at: float = 0.0) -> Lease:
        """This consumer's lease: the producer's, read at ``kv_host``."""
        lease = msgspec.structs.replace(
            self, kv_host=kv_host, handed_at=handed_at, mac=""
        )
        return msgspec.structs.replace(lease, mac=lease._mac(key))

    def verified(self, key: bytes) -> bool:
        return bool(self.mac) and hmac.compare_digest(
            self.mac.encode(), self._mac(key).encode()
        )

    def _mac(self, key: bytes) -> str:
        body = _encoder.encode(msgspec.structs.replace(self, mac=""))
        return hmac.new(key, b"pdserve-lease:" + body, hashlib.sha256).hexdigest()


_encoder = msgspec.msgpack.Encoder()


def refusal(reason: str) -> dict[str, Any]:
    """kv_transfer_params of a prefill answered without a lease."""
    return {REFUSED_KEY: reason}


def request_wants_lease(params: object) -> bool:
    """Producer: whether a request asked to be prefilled for a consumer."""
    return isinstance(params, dict) and params.get(DO_REMOTE_DECODE) is True


def lease_token(key: bytes, request_id: str, prompt_hash: str) -> str:
    """The producer's read capability for one lease; its workers recompute it."""
    message = b"pdserve-token:" + request_id.encode() + b"\0" + prompt_hash.encode()
    return hmac.new(key, message, hashlib.sha256).hexdigest()


def token_valid(key: bytes, request_id: str, prompt_hash: str, token: str) -> bool:
    expected = lease_token(key, request_id, prompt_hash).encode()
    return hmac.compare_digest(expected, token.encode("utf-8", "replace"))


def node_key() -> bytes:
    """This node's lease key, created by the entrypoint for its processes."""
    key = os.environ.get(NODE_KEY_ENV_VAR, "")
    if not key:
        raise RuntimeError(f"{NODE_KEY_ENV_VAR} is not set (start through pdserve)")
    return bytes.fromhex(key)


def new_node_key() -> str:
    return secrets.token_hex(32)
