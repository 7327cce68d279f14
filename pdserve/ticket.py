"""A consumer request admitted to its engine before its lease exists.

The consumer's HTTP layer hands a request to its own vLLM at once, carrying
a ticket instead of a lease, and asks the producer meanwhile: vLLM's handler
renders and tokenizes and the engine takes the request while the producer
prefills, so nothing of the consumer's own path waits for the producer's
answer. The answer reaches the engine as a ``Delivery`` for the ticket (the
lease, or why there is none) through the node's lease inbox.

A ticket is signed with the node's key like a lease: client
``kv_transfer_params`` can never pose as one. It carries a deadline (wall
clock): an engine that has heard nothing by then prefills locally.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from typing import Annotated, Any

import msgspec

from pdserve.lease import DO_REMOTE_PREFILL, Lease

TICKET_KEY = "pdserve_ticket"
TicketId = Annotated[str, msgspec.Meta(pattern="^[0-9a-f]{32}$")]


class Ticket(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    id: TicketId
    deadline: Annotated[float, msgspec.Meta(ge=0)]
    # When (wall clock) the HTTP layer handed the request to its own vLLM:
    # the engine times its frontend from it.
    handed_at: Annotated[float, msgspec.Meta(ge=0)] = 0.0
    mac: Annotated[str, msgspec.Meta(max_length=128)] = ""

    @classmethod
    def issue(cls, key: bytes, deadline: float, handed_at: float) -> Ticket:
        ticket = cls(secrets.token_hex(16), deadline, handed_at)
        return msgspec.structs.replace(ticket, mac=ticket._mac(key))

    def verified(self, key: bytes) -> bool:
        return bool(self.mac) and hmac.compare_digest(
            self.mac.encode(), self._mac(key).encode()
        )

    def _mac(self, key: bytes) -> str:
        body = f"pdserve-ticket:{self.id}:{self.deadline!r}:{self.handed_at!r}"
        body = body.encode()
        return hmac.new(key, body, hashlib.sha256).hexdigest()

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


class Cancel(msgspec.Struct, tag=True, frozen=True, forbid_unknown_fields=True):
    """The ticket's request will never reach the engine (vLLM's handler
    rejected it): a lease delivered for it goes back at once."""

    ticket_id: TicketId


Message = Delivery | Cancel
