"""Where a consumer engine receives the producers' answers for tickets.

The engine-core process listens on a Unix socket in the node's private run
directory (only this node's own processes can reach it); each of the node's
API server processes keeps one connection and writes ``Delivery`` and
``Cancel`` frames (4-byte length, msgpack). A thread of ours reads them into
a queue the engine's thread drains each step: the engine never waits here,
and the HTTP layer never waits for the engine.
"""

from __future__ import annotations

import os
import selectors
import socket
import threading
from collections import deque

import msgspec

from pdserve.log import init_logger
from pdserve.ticket import Message

logger = init_logger(__name__)

SOCKET_NAME = "leases.sock"
# A frame holds one lease: its block ids bound it (1M blocks at most).
MAX_FRAME_BYTES = 16 << 20
# Answers received but not yet taken by the engine, at most (a bound; the
# engine takes them every step).
MAX_QUEUED = 1 << 16
MAX_CONNECTIONS = 64
_decoder = msgspec.msgpack.Decoder(Message)


def socket_path(run_dir: str) -> str:
    return os.path.join(run_dir, SOCKET_NAME)


class LeaseInbox:
    def __init__(self, run_dir: str) -> None:
        self.path = socket_path(run_dir)
        if os.path.exists(self.path):
            os.unlink(self.path)  # a previous engine's, on a restart
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listener.bind(self.path)
        self._listener.listen(MAX_CONNECTIONS)
        self._listener.setblocking(False)
        self._selector = selectors.DefaultSelector()
        self._selector.register(self._listener, selectors.EVENT_READ, None)
        self._lock = threading.Lock()
        self._queue: deque[Message] = deque()
        self._stopped = threading.Event()
        self._thread = threading.Thread(
            target=self._run, name="pdserve-lease-inbox", daemon=True
        )
        self._thread.start()

    def take(self) -> list[Message]:
        """Everything received since the last call (the engine's thread)."""
        with self._lock:
            taken = list(self._queue)
            self._queue.clear()
        return taken

    def close(self) -> None:
        self._stopped.set()
        self._thread.join(timeout=2)
        for key in list(self._selector.get_map().values()):
            key.fileobj.close()
        self._selector.close()
        if os.path.exists(self.path):
            os.unlink(self.path)

    # ---- the inbox thread ----

    def _run(self) -> None:
        while not self._stopped.is_set():
            try:
                events = self._selector.select(timeout=0.2)
            except OSError:
                return
            for key, _ in events:
                if key.data is None:
                    self._accept()
                else:
                    self._read(key.fileobj, key.data)

    def _accept(self) -> None:
        try:
            conn, _ = self._listener.accept()
        except OSError:
            return
        if len(self._selector.get_map()) > MAX_CONNECTIONS:
            conn.close()
            return
        conn.setblocking(False)
        self._selector.register(conn, selectors.EVENT_READ, _Frames())

    def _read(self, conn: socket.socket, frames: _Frames) -> None:
        try:
            data = conn.recv(1 << 20)
            if not data:
                raise ConnectionError("closed")
            for body in frames.feed(data):
                self._put(_decoder.decode(body))
        except (OSError, ValueError, msgspec.DecodeError) as exc:
            if not isinstance(exc, ConnectionError):
                logger.warning("pdserve: lease inbox dropped a connection: %s", exc)
            self._selector.unregister(conn)
            conn.close()

    def _put(self, message: Message) -> None:
        with self._lock:
            if len(self._queue) >= MAX_QUEUED:
                logger.warning("pdserve: lease inbox full; an answer is dropped")
                return
            self._queue.append(message)


class _Frames:
    """Length-prefixed frames of one connection, as they arrive."""

    def __init__(self) -> None:
        self._data = bytearray()

    def feed(self, data: bytes) -> list[bytes]:
        self._data += data
        bodies = []
        while len(self._data) >= 4:
            length = int.from_bytes(self._data[:4], "big")
            if length > MAX_FRAME_BYTES:
                raise ValueError(f"frame of {length} bytes")
            if len(self._data) < 4 + length:
                break
            bodies.append(bytes(self._data[4 : 4 + length]))
            del self._data[: 4 + length]
        return bodies


def encode(message: Message) -> bytes:
    body = msgspec.msgpack.encode(message)
    return len(body).to_bytes(4, "big") + body
