"""Transport sessions of a KV server, set up on a thread of their own.

Setting up a GPU-direct session takes long: ipc exports the KV tensors, nccl
starts a TCPStore, builds a process group and waits (up to 30 s) for the
consumer to join. None of that may hold an engine step or the server's lock,
so the server hands each accepted ``TransportHello`` here as a ``Setup`` and
queues it in its connection's answers: the welcome leaves, in order, once
the transport has made it; then this thread lets the transport finish with
the consumer (``after_welcome``). Setups run one at a time, and only a few
may wait: a flood of hellos is refused, not queued.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

from pdserve.kv_cache import PagedKVCache
from pdserve.log import init_logger
from pdserve.protocol import TransportHello, TransportWelcome
from pdserve.timing import WELCOME_SEND_SECONDS
from pdserve.transport import KVTransport

logger = init_logger(__name__)

# Setups waiting or running at once, per server.
MAX_SETUPS = 8


@dataclass(eq=False)
class Setup:
    """One hello being answered: shared by the setup thread (which fills in
    ``welcome``) and the server's pump (which sends it, or drops it with its
    connection)."""

    hello: TransportHello
    transport: KVTransport
    welcome: TransportWelcome | None = None
    sent: bool = False
    settled: threading.Event = field(default_factory=threading.Event)

    @property
    def key(self) -> tuple[str, str]:
        return self.hello.transport, self.hello.session

    def mark_sent(self) -> None:
        self.sent = True
        self.settled.set()

    def mark_dropped(self) -> None:
        self.settled.set()


class SessionSetups:
    def __init__(
        self, kv: PagedKVCache, name: str, finished: Callable[[Setup], None]
    ) -> None:
        self.kv = kv
        self._finished = finished
        self._queue: queue.Queue[Setup | None] = queue.Queue()
        self._pending = 0  # waiting or running
        self._lock = threading.Lock()
        threading.Thread(target=self._run, name=name, daemon=True).start()

    def submit(self, setup: Setup) -> bool:
        """Queue ``setup``; False when too many already wait."""
        with self._lock:
            if self._pending >= MAX_SETUPS:
                return False
            self._pending += 1
        self._queue.put(setup)
        return True

    def close(self) -> None:
        self._queue.put(None)

    def _run(self) -> None:
        while (setup := self._queue.get()) is not None:
            try:
                self._set_up(setup)
            except Exception:  # this thread must outlive any bug
                logger.exception("pdserve: KV session setup failed")
            finally:
                with self._lock:
                    self._pending -= 1
                self._finished(setup)

    def _set_up(self, setup: Setup) -> None:
        hello, transport = setup.hello, setup.transport
        try:
            welcome = transport.welcome(hello, self.kv)
        except Exception as exc:  # a refusal, never a dead server
            logger.warning("%s session setup failed: %s", hello.transport, exc)
            welcome = TransportWelcome(ok=False, error=str(exc))
        setup.welcome = welcome  # the server's next pump sends it
        if not welcome.ok:
            return
        try:
            if not (setup.settled.wait(WELCOME_SEND_SECONDS) and setup.sent):
                raise ConnectionError("the consumer left before its welcome")
            transport.after_welcome(hello.session)
        except Exception as exc:  # the consumer falls back
            logger.warning("%s session setup failed: %s", hello.transport, exc)
            transport.close_session(hello.session)
