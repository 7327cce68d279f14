"""A non-blocking side-channel connection: queued writes, incremental reads.

Both ends of the KV side channel drive their connections from the engine's
own thread, a little each step, so nothing here ever blocks: ``pump_out``
writes what the socket takes now, ``pump_in`` reads what has arrived.

Once both ends proved the KV secret (``secure``), every frame sent is sealed
and every frame received checked, raw payload bytes included (protocol.py).
"""

from __future__ import annotations

import socket
from collections import deque

from pdserve.protocol import (
    FrameBuffer,
    Message,
    PayloadEnd,
    StreamMac,
    encode_frame,
)

RECV_BYTES = 1 << 20


class Channel:
    def __init__(self, sock: socket.socket, max_frame: int) -> None:
        sock.setblocking(False)
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass  # not TCP (a socketpair in tests)
        self.sock = sock
        self.frames = FrameBuffer(max_frame)
        self._out: deque[memoryview] = deque()
        self._seal: StreamMac | None = None
        self.bytes_sent = 0  # how far the peer has taken what we send
        self.closed = False

    def fileno(self) -> int:
        return self.sock.fileno()

    def secure(self, send: StreamMac, receive: StreamMac) -> None:
        """Both ends proved the KV secret: tag what goes from now on, check
        what comes (frames already queued went before, untagged)."""
        self._seal = send
        self.frames.mac = receive

    @property
    def secured(self) -> bool:
        return self._seal is not None

    # ---- writing ----

    def send(self, message: Message) -> None:
        self._out.append(memoryview(encode_frame(message, self._seal)))

    def send_raw(self, data: bytes | bytearray | memoryview) -> None:
        if len(data):
            view = memoryview(data).cast("B")
            if self._seal is not None:
                self._seal.absorb(view)
            self._out.append(view)

    def end_payload(self) -> None:
        """A payload's last bytes were queued: on a secured connection, the
        frame whose tag covers them."""
        if self._seal is not None:
            self.send(PayloadEnd())

    @property
    def pending_out(self) -> int:
        return sum(len(chunk) for chunk in self._out)

    def pump_out(self) -> None:
        """Write as much as the socket takes without blocking."""
        while self._out:
            chunk = self._out[0]
            try:
                n = self.sock.send(chunk)
            except (BlockingIOError, InterruptedError):
                return
            self.bytes_sent += n
            if n < len(chunk):
                self._out[0] = chunk[n:]
                return
            self._out.popleft()

    # ---- reading ----

    def pump_in(self) -> None:
        """Buffer what has arrived, up to one largest frame (the rest waits in
        the socket: a peer cannot make us hold more); raises ConnectionError
        when the peer closed the connection."""
        while (room := self.frames.limit + 5 - len(self.frames)) > 0:
            want = min(RECV_BYTES, room)
            try:
                data = self.sock.recv(want)
            except (BlockingIOError, InterruptedError):
                return
            if not data:
                raise ConnectionError("peer closed the connection")
            self.frames.feed(data)
            if len(data) < want:
                return

    def next_message(self) -> Message | None:
        return self.frames.next_message()

    def read_raw_into(self, view: memoryview) -> int:
        """Fill ``view`` from buffered, then arriving, bytes; returns how many
        (possibly fewer than asked). Raises ConnectionError on close."""
        n = self.frames.take_raw(view)
        while n < len(view):
            try:
                got = self.sock.recv_into(view[n:])
            except (BlockingIOError, InterruptedError):
                return n
            if got == 0:
                raise ConnectionError("peer closed the connection")
            if self.frames.mac is not None:
                self.frames.mac.absorb(view[n : n + got])
            n += got
        return n

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self._out.clear()
            try:
                self.sock.close()
            except OSError:
                pass
