"""Consumer engine: the producers' answers for ticketed requests.

A request admitted before its lease existed (``pdserve.ticket``) waits in
vLLM's waiting queue (the connector says "not yet") until the answer for its
ticket arrives from the HTTP layer: the lease, or why there is none. Answers
and requests can come in either order, and either may never come: an answer
whose request has ended (client gone, rejected) or never shows up is given
back (its lease released on the producer) at once or when it expires; a
request whose answer never comes prefills locally at its ticket's deadline.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable

from pdserve.lease import Lease
from pdserve.ticket import Cancel, Delivery, Message

# Answers or ended tickets remembered at most (bounds, never reached: the
# API server bounds the requests in flight).
MAX_REMEMBERED = 1 << 16


class TicketBook:
    def __init__(
        self,
        give_back: Callable[[Lease], None],
        hold_seconds: float,
        clock: Callable[[], float] = time.time,
        on_delivered: Callable[[float], None] | None = None,
    ) -> None:
        self._give_back = give_back
        self._hold = hold_seconds
        self._now = clock
        # Told how long each answer took from the HTTP layer to here.
        self._on_delivered = on_delivered
        # Answers not taken yet, by ticket: (answer, when it arrived here).
        self._answers: OrderedDict[str, tuple[Delivery, float]] = OrderedDict()
        # Tickets whose request ended before their answer: when to forget.
        self._ended: OrderedDict[str, float] = OrderedDict()

    def receive(self, message: Message) -> None:
        """An answer or a cancellation from the HTTP layer."""
        if isinstance(message, Cancel):
            self.ended(message.ticket_id)
            return
        if self._ended.pop(message.ticket_id, None) is not None:
            return self._release(message)
        if message.ticket_id in self._answers:
            return self._release(message)  # a second answer: not ours to keep
        now = self._now()
        self._answers[message.ticket_id] = (message, now)
        if self._on_delivered is not None and message.sent_at:
            self._on_delivered(max(0.0, now - message.sent_at))
        while len(self._answers) > MAX_REMEMBERED:
            self._release(self._answers.popitem(last=False)[1][0])

    def answer(self, ticket_id: str) -> tuple[Delivery, float] | None:
        """The answer for ``ticket_id`` and when it arrived, if it has."""
        return self._answers.get(ticket_id)

    def take(self, ticket_id: str) -> Delivery | None:
        found = self._answers.pop(ticket_id, None)
        return found[0] if found is not None else None

    def ended(self, ticket_id: str) -> None:
        """The ticket's request ended (or never reached the engine)."""
        found = self._answers.pop(ticket_id, None)
        if found is not None:
            self._release(found[0])
            return
        self._ended[ticket_id] = self._now() + self._hold
        while len(self._ended) > MAX_REMEMBERED:
            self._ended.popitem(last=False)

    def expire(self) -> None:
        """Let go of answers whose request never came, and forget old ends."""
        now = self._now()
        while self._answers:
            ticket_id, (delivery, arrived) = next(iter(self._answers.items()))
            if arrived + self._hold > now:
                break
            del self._answers[ticket_id]
            self._release(delivery)
        while self._ended and next(iter(self._ended.values())) <= now:
            self._ended.popitem(last=False)

    def _release(self, delivery: Delivery) -> None:
        if delivery.lease is not None:
            self._give_back(delivery.lease)
