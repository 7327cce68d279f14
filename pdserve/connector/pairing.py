"""A consumer rank's pairings with producers, made off the engine's thread.

Pairing (rank handshakes, a transport session: an ipc mapping, an NCCL
communicator) can take seconds, or up to the transfer timeout against a
producer that does not answer. The engine thread never waits for it: a load
whose producer is not paired yet fails at once (its prompt is recomputed
here) and asks for the pairing, which runs on a thread of its own; the
engine thread installs finished pairings at its next step.

A failed attempt is not retried for ``backoff`` seconds counted from the
end of the attempt (a slow failure must not have used up its own backoff).
What each rank has paired with is published for the HTTP layer
(``pdserve.pairings``), which sends a producer work only once every rank
has paired with it.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from pdserve.connector.producer_peer import ProducerPeer
from pdserve.handshake import IncompatibleProducer, InstanceGone
from pdserve.log import init_logger
from pdserve.pairings import PairingTarget, PeerState, RankPairings, write_rank

logger = init_logger(__name__)

# Attempts in flight at once (each a thread): producers joining together
# pair together, and one slow producer delays no other.
MAX_ATTEMPTS = 16
# Failed attempts remembered (for backoff and the published state).
MAX_REMEMBERED = 256


class Pairer:
    def __init__(
        self,
        rank: int,
        pair: Callable[[PairingTarget], ProducerPeer],
        backoff: float,
        run_dir: str = "",
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.rank = rank
        self._pair = pair
        self._backoff = backoff
        self._run_dir = run_dir
        self._clock = clock
        self._lock = threading.Lock()
        # One writer at a time, so the file never goes back to older state.
        self._publish_lock = threading.Lock()
        self._attempts: set[PairingTarget] = set()
        self._ready: list[ProducerPeer] = []
        self._states: dict[PairingTarget, PeerState] = {}
        self._failed_at: dict[PairingTarget, float] = {}
        self._closed = False

    # ---- the engine's thread ----

    def want(self, target: PairingTarget) -> bool:
        """Start pairing with ``target`` unless it is paired, being paired or
        failed recently; never waits. True if an attempt started."""
        with self._lock:
            if self._closed or target in self._attempts:
                return False
            state = self._states.get(target)
            if state is not None and state.paired:
                return False
            failed_at = self._failed_at.get(target)
            if failed_at is not None and self._clock() - failed_at < self._backoff:
                return False
            if len(self._attempts) >= MAX_ATTEMPTS:
                return False
            self._attempts.add(target)
        threading.Thread(
            target=self._attempt,
            args=(target,),
            name=f"pdserve-pairing-{self.rank}",
            daemon=True,
        ).start()
        return True

    def take_ready(self) -> list[ProducerPeer]:
        """Peers paired since the last call (the caller installs them)."""
        with self._lock:
            ready, self._ready = self._ready, []
        return ready

    def failed_recently(self, target: PairingTarget) -> str | None:
        with self._lock:
            state = self._states.get(target)
            failed_at = self._failed_at.get(target)
        if state is None or failed_at is None or state.paired:
            return None
        if self._clock() - failed_at >= self._backoff:
            return None
        return state.error

    # ---- state, for the HTTP layer ----

    def paired(self, target: PairingTarget) -> None:
        """``target`` is paired (by startup pairing, or an attempt)."""
        self._set(PeerState(target, paired=True))

    def forget(self, target: PairingTarget) -> None:
        """The rank let go of ``target`` (gone, replaced, evicted)."""
        with self._lock:
            self._states.pop(target, None)
            self._failed_at.pop(target, None)
        self._publish()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            ready, self._ready = self._ready, []
        for peer in ready:
            peer.close("shutting down")

    # ---- the pairing threads ----

    def _attempt(self, target: PairingTarget) -> None:
        try:
            peer = self._pair(target)
        except (OSError, IncompatibleProducer) as exc:
            self._failed(target, exc)
            return
        except Exception as exc:  # a bug costs this pairing, never the rank
            logger.exception("pdserve: pairing with %s failed unexpectedly", target)
            self._failed(target, exc)
            return
        finally:
            with self._lock:
                self._attempts.discard(target)
        with self._lock:
            closed = self._closed
            if not closed:
                self._ready.append(peer)
                self._failed_at.pop(target, None)
        if closed:
            peer.close("shutting down")
            return
        self.paired(target)

    def _failed(self, target: PairingTarget, exc: Exception) -> None:
        gone = isinstance(exc, InstanceGone)
        incompatible = isinstance(exc, IncompatibleProducer) and not gone
        error = str(exc) or repr(exc)
        with self._lock:
            state = self._states.get(target)
        # Once per error: a producer that is down is tried again and again.
        log = (
            logger.debug
            if state is not None and state.error == error
            else (logger.warning)
        )
        log(
            "pdserve: consumer rank %d cannot pair with producer %s:%s "
            "(instance %s): %s",
            self.rank,
            target.host,
            list(target.kv_ports),
            target.instance_id,
            error,
        )
        with self._lock:
            # Counted from the end of the attempt: a slow failure waits too.
            self._failed_at[target] = self._clock()
            while len(self._failed_at) > MAX_REMEMBERED:
                self._failed_at.pop(next(iter(self._failed_at)))
        self._set(PeerState(target, False, error, incompatible, gone))

    def _set(self, state: PeerState) -> None:
        with self._lock:
            self._states[state.target] = state
            while len(self._states) > MAX_REMEMBERED:
                self._states.pop(next(iter(self._states)))
        self._publish()

    def _publish(self) -> None:
        if not self._run_dir:
            return
        with self._publish_lock:
            with self._lock:
                pairings = RankPairings(self.rank, list(self._states.values()))
            try:
                write_rank(self._run_dir, pairings)
            except OSError as exc:  # the HTTP layer then sees no change
                logger.warning("pdserve: cannot publish pairings: %s", exc)
