"""Request bodies on both nodes, with the client's kv_transfer_params gone.

Both engines act on ``kv_transfer_params``: the consumer's pulls KV for a
lease, the producer's leases (pins) KV for ``do_remote_decode``. So every
key of that name is removed from every JSON body, wherever it is nested:
vLLM reads it at the top level of several request types and inside
``sampling_params``/``extra_args``, and new endpoints may add more. On the
consumer only a lease its own HTTP layer obtained from a producer is put
back; on the producer only ``do_remote_decode``, and only for a request that
asked for it and proved it may (see the middleware).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from pdserve import metrics
from pdserve.lease import DO_REMOTE_DECODE, request_wants_lease
from pdserve.log import init_logger

logger = init_logger(__name__)

KV_PARAMS_KEY = "kv_transfer_params"
# Bodies larger than this are parsed and encoded on a worker thread: on the
# event loop a large JSON body would hold every other request meanwhile.
OFF_LOOP_BYTES = 1 << 20
T = TypeVar("T")


async def off_loop(size: int, work: Callable[..., T], *args: Any) -> T:
    """``work(*args)``, on a worker thread if ``size`` bytes make it slow."""
    if size > OFF_LOOP_BYTES:
        return await asyncio.to_thread(work, *args)
    return work(*args)


class BodyTooDeep(ValueError):
    """JSON nested beyond what Python's parser (and so vLLM's) accepts."""


def strip_kv_params(value: Any) -> int:
    """Remove every ``kv_transfer_params`` key in place; returns how many.

    Iterative: a body nested up to the parser's limit must not overflow
    the stack here."""
    removed = 0
    pending = [value]
    while pending:
        node = pending.pop()
        if isinstance(node, dict):
            if KV_PARAMS_KEY in node:
                del node[KV_PARAMS_KEY]
                removed += 1
            pending.extend(node.values())
        elif isinstance(node, list):
            pending.extend(node)
    return removed


@dataclass(frozen=True)
class Body:
    """What to forward to vLLM: ``data``; ``payload`` is its JSON, if any."""

    data: bytes
    payload: Any = None
    is_json: bool = False
    # ``data`` is pdserve's own serialization: it goes out as JSON.
    rewritten: bool = False

    @classmethod
    def of(cls, payload: Any) -> Body:
        return cls(encode(payload), payload, is_json=True, rewritten=True)


def encode(payload: Any) -> bytes:
    try:
        return json.dumps(payload).encode()
    except RecursionError as exc:
        raise BodyTooDeep("request body is nested too deeply") from exc


def parse_json(data: bytes) -> tuple[bool, Any]:
    """(True, value) if ``data`` is JSON to Python's parser, the one
    Starlette (so vLLM) uses; else (False, None)."""
    try:
        return True, json.loads(data)
    except RecursionError as exc:
        raise BodyTooDeep("request body is nested too deeply") from exc
    except ValueError:
        return False, None


def for_producer(data: bytes, may_lease: bool) -> Body:
    """A producer's request body, without kv_transfer_params, except
    ``do_remote_decode`` where the body asked for it (top level, as vLLM
    reads it) and ``may_lease``; non-JSON unchanged."""
    is_json, payload = parse_json(data)
    if not is_json:
        return Body(data)
    asked = isinstance(payload, dict) and request_wants_lease(
        payload.get(KV_PARAMS_KEY)
    )
    removed = strip_kv_params(payload)
    if asked and may_lease:
        payload[KV_PARAMS_KEY] = {DO_REMOTE_DECODE: True}
    elif not removed:
        return Body(data, payload, is_json=True)
    return Body.of(payload)


def from_client(data: bytes, path: str) -> Body:
    """The client's body, without kv_transfer_params; non-JSON unchanged."""
    is_json, payload = parse_json(data)
    if not is_json:
        return Body(data)
    removed = strip_kv_params(payload)
    if not removed:
        return Body(data, payload, is_json=True)
    metrics.CLIENT_KV_PARAMS_STRIPPED.inc()
    logger.debug("Removed %d client kv_transfer_params from %s", removed, path)
    return Body.of(payload)
