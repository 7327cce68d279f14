"""A transport's sessions by id, with the bookkeeping that bounds them.

Each session may hold GPU memory and a communicator, so a producer keeps at
most one per consumer rank (a consumer that says hello again has given up
its older one: it re-paired) and at most ``limit`` in all. Closing comes
before the new session is built: on a full GPU both might not fit.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

S = TypeVar("S")


class SessionTable(Generic[S]):
    def __init__(self, close: Callable[[S, str], None], limit: int) -> None:
        self._close = close
        self.limit = limit
        self._sessions: dict[str, S] = {}  # oldest first
        self._by_consumer: dict[str, str] = {}  # consumer id -> session id
        self._consumer_of: dict[str, str] = {}  # session id -> consumer id

    def __len__(self) -> int:
        return len(self._sessions)

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._sessions))

    def get(self, session: str) -> S | None:
        return self._sessions.get(session)

    def make_room(self, session: str, consumer_id: str) -> None:
        """Before building ``session`` for ``consumer_id``: close what it
        replaces (the consumer's older session, one of the same id) and the
        oldest sessions beyond the limit."""
        self.close(session, "session id reused")
        if consumer_id in self._by_consumer:
            self.close(self._by_consumer[consumer_id], "consumer said hello again")
        while self._sessions and len(self._sessions) >= self.limit:
            self.close(next(iter(self._sessions)), "too many sessions")

    def add(self, session: str, consumer_id: str, state: S) -> None:
        self.make_room(session, consumer_id)  # no-op after the caller's own
        self._sessions[session] = state
        if consumer_id:  # older consumers send none: nothing to replace by
            self._by_consumer[consumer_id] = session
            self._consumer_of[session] = consumer_id

    def close(self, session: str, reason: str) -> None:
        state = self._sessions.pop(session, None)
        consumer_id = self._consumer_of.pop(session, None)
        if consumer_id is not None:
            del self._by_consumer[consumer_id]
        if state is not None:
            self._close(state, reason)

    def close_all(self, reason: str) -> None:
        for session in self:
            self.close(session, reason)
