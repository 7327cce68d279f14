"""The HTTP layer's side of the lease inbox (``connector/lease_inbox.py``):
it sends its engine the producer's answer for a ticket as soon as it has it.

One connection per API server process, opened on first use; a send that
fails says so (the engine then prefills that request locally at its
ticket's deadline, and the caller releases the lease itself)."""

from __future__ import annotations

import asyncio
import os

from pdserve.connector.lease_inbox import encode, socket_path
from pdserve.log import init_logger
from pdserve.ticket import Message

logger = init_logger(__name__)

CONNECT_TIMEOUT_SECONDS = 1.0


class LeaseOutbox:
    def __init__(self, run_dir: str) -> None:
        self.path = socket_path(run_dir) if run_dir else ""
        self._writer: asyncio.StreamWriter | None = None
        self._lock = asyncio.Lock()

    def available(self) -> bool:
        """Whether this node's engine has an inbox to send answers to."""
        return bool(self.path) and os.path.exists(self.path)

    async def send(self, message: Message) -> bool:
        async with self._lock:
            try:
                writer = await self._connected()
                writer.write(encode(message))
                await writer.drain()
                return True
            except (OSError, asyncio.TimeoutError) as exc:
                logger.warning("pdserve: cannot reach the engine's inbox: %r", exc)
                self._close()
                return False

    async def _connected(self) -> asyncio.StreamWriter:
        if self._writer is None or self._writer.is_closing():
            _, self._writer = await asyncio.wait_for(
                asyncio.open_unix_connection(self.path), CONNECT_TIMEOUT_SECONDS
            )
        return self._writer

    def _close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    async def close(self) -> None:
        async with self._lock:
            self._close()
