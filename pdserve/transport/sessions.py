"""A transport's sessions by id, with the bookkeeping that bounds them.

Each session may hold GPU memory and a communicator, so a producer keeps at
most one per consumer rank (a consumer that says hello again has given up
its older one: it re-paired) and at most ``limit`` in all. Closing comes
before the new session is built: on a full GPU both might not fit.

Two threads use a table: the KV server's session-setup thread adds (and
closes what a new session replaces), the engine's thread looks sessions up
and closes them. The table's own lock guards only its dicts; a session is
closed outside it (closing may wait for the session's GPU work), and the
session itself keeps its users and its closing apart.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

S = TypeVar("S")


class SessionTable(Generic[S]):
    def __init__(self, close: Callable[[S, str], None], limit: int) -> None:
        self._close = close
        self.limit = limit
        self._lock = threading.Lock()
        self._sessions: dict[str, S] = {}  # oldest first
        self._by_consumer: dict[str, str] = {}  # consumer id -> session id
        self._consumer_of: dict[str, str] = {}  # session id -> consumer id

    def __len__(self) -> int:
        with self._lock:
            return len(self._sessions)

    def __iter__(self) -> Iterator[str]:
        with self._lock:
            return iter(list(self._sessions))

    def get(self, session: str) -> S | None:
        with self._lock:
            return self._sessions.get(session)

    def make_room(self, session: str, consumer_id: str) -> None:
        """Before building ``session`` for ``consumer_id``: close what it
        replaces (the consumer's older session, one of the same id) and the
        oldest sessions beyond the limit."""
        with self._lock:
            closing = self._take_room(session, consumer_id)
        self._close_all(closing)

    def add(self, session: str, consumer_id: str, state: S) -> None:
        with self._lock:
            closing = self._take_room(session, consumer_id)  # no-op after
            self._sessions[session] = state  # the caller's own make_room
            if consumer_id:  # older consumers send none: nothing to replace by
                self._by_consumer[consumer_id] = session
                self._consumer_of[session] = consumer_id
        self._close_all(closing)

    def close(self, session: str, reason: str) -> None:
        with self._lock:
            state = self._pop(session)
        if state is not None:
            self._close(state, reason)

    def close_all(self, reason: str) -> None:
        for session in self:
            self.close(session, reason)

    # ---- under the lock ----

    def _take_room(self, session: str, consumer_id: str) -> list[tuple[S, str]]:
        closing: list[tuple[S, str]] = []

        def take(victim: str, reason: str) -> None:
            state = self._pop(victim)
            if state is not None:
                closing.append((state, reason))

        take(session, "session id reused")
        if consumer_id in self._by_consumer:
            take(self._by_consumer[consumer_id], "consumer said hello again")
        while self._sessions and len(self._sessions) >= self.limit:
            take(next(iter(self._sessions)), "too many sessions")
        return closing

    def _pop(self, session: str) -> S | None:
        state = self._sessions.pop(session, None)
        consumer_id = self._consumer_of.pop(session, None)
        if consumer_id is not None:
            del self._by_consumer[consumer_id]
        return state

    def _close_all(self, closing: list[tuple[S, str]]) -> None:
        for state, reason in closing:
            self._close(state, reason)
