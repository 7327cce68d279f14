"""A consumer request admitted to its engine before its lease exists.

The consumer's HTTP layer hands a request to its own vLLM at once, carrying
a ticket instead of a lease, and asks the producer meanwhile: vLLM's handler
renders and tokenizes and the engine takes the request while the producer
prefills, so nothing of the consumer's own path waits for the producer's
answer. The answer reaches the engine as a ``Delivery`` for the ticket (the
lease, or why there is none); a ``Cancel`` says the ticket's request will
never reach the engine (vLLM rejected it).

Both travel through vLLM's own way of handing an engine KV-transfer
parameters outside a request (``notify_kv_transfer_request_rejected``: a
request aborted on arrival, whose connector ``request_finished`` runs): it
needs nothing of ours between the processes, and it wakes an idle engine.

Tickets and answers are signed with the node's key like a lease: client
``kv_transfer_params`` can never pose as either. A ticket carries a deadline
(wall clock): an engine that has heard nothing by then prefills locally.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from typing import Annotated, Any

import msgspec

from pdserve.lease import DO_REMOTE_PREFILL, Lease

TICKET_KEY = "pdserve_ticket"
ANSWER_KEY = "pdserve_answer"
TicketId = Annotated[str, msgspec.Meta(pattern="^[0-9a-f]{32}$")]
Mac = Annotated[str, msgspec.Meta(max_length=128)]


class Ticket(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    id: TicketId
    deadline: Annotated[float, msgspec.Meta(ge=0)]
    # When (wall clock) the HTTP layer handed the request to its own vLLM:
    # the engine times its frontend from it.
    handed_at: Annotated[float, msgspec.Meta(ge=0)] = 0.0
    mac: Mac = ""

    @classmethod
    def issue(cls, key: bytes, deadline: float, handed_at: float) -> Ticket:
        return _signed(cls(secrets.token_hex(16), deadline, handed_at), key)

    def verified(self, key: bytes) -> bool:
        return _verified(self, key)

    def to_params(self) -> dict[str, Any]:
        """kv_transfer_params of a request waiting for its lease."""
        return {DO_REMOTE_PREFILL: True, TICKET_KEY: msgspec.to_builtins(self)}

    @classmethod
    def from_params(cls, params: object) -> Ticket | None:
        if not isinstance(params, dict) or TICKET_KEY not in params:
            return None
        try:
            return msgspec.convert(params[TICKET_KEY], type=cls)
        except (msgspec.ValidationError, TypeError, ValueError):
            return None


class Delivery(msgspec.Struct, tag=True, frozen=True, forbid_unknown_fields=True):
    """The producer's answer for a ticket: its lease (signed by the HTTP
    layer), or why there is none (the engine then prefills locally)."""

    ticket_id: TicketId
    lease: Lease | None = None
    refused: Annotated[str, msgspec.Meta(max_length=64)] = ""
    # When (wall clock) the HTTP layer sent it: the hop to the engine is
    # timed from it.
    sent_at: Annotated[float, msgspec.Meta(ge=0)] = 0.0
    mac: Mac = ""


class Cancel(msgspec.Struct, tag=True, frozen=True, forbid_unknown_fields=True):
    """The ticket's request is over (vLLM rejected it, its client left): a
    lease delivered for it, or delivered later, goes back at once."""

    ticket_id: TicketId
    mac: Mac = ""


Message = Delivery | Cancel


def message_params(key: bytes, message: Message) -> dict[str, Any]:
    """kv_transfer_params that carry ``message`` to the engine, signed."""
    signed = _signed(message, key)
    return {DO_REMOTE_PREFILL: True, ANSWER_KEY: msgspec.to_builtins(signed)}


def message_from_params(params: object, key: bytes) -> Message | None:
    """The signed message in ``params``, or None (none, malformed, forged)."""
    if not isinstance(params, dict) or ANSWER_KEY not in params:
        return None
    try:
        message = msgspec.convert(params[ANSWER_KEY], type=Message)
    except (msgspec.ValidationError, TypeError, ValueError):
        return None
    return message if _verified(message, key) else None


def _signed(value: Any, key: bytes) -> Any:
    return msgspec.structs.replace(value, mac=_mac(value, key))


def _verified(value: Any, key: bytes) -> bool:
    return bool(value.mac) and hmac.compare_digest(
        value.mac.encode(), _mac(value, key).encode()
    )


def _mac(value: Any, key: bytes) -> str:
    body = msgspec.msgpack.encode(msgspec.structs.replace(value, mac=""))
    name = type(value).__name__.encode()
    return hmac.new(key, b"pdserve-" + name + b":" + body, hashlib.sha256).hexdigest()
