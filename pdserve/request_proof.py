"""Proof that an HTTP request to a producer comes from a consumer.

A producer leases KV (pins its blocks) for requests carrying
``do_remote_decode``; with a KV secret (shared by both nodes) only a consumer
may ask for that. The consumer adds ``x-pdserve-proof`` to each prefill it
sends: an HMAC, under a key derived from the secret (never the secret
itself), of a timestamp, a random nonce, the method, the route and the
SHA-256 of the exact body bytes. The producer accepts a proof only if it
verifies, its timestamp is within ``PROOF_FRESH_SECONDS`` of the producer's
clock, and its nonce was not accepted before (a bounded replay cache): no
client can make one, and one seen on the wire is good for nothing else (no
second use, no other route, no other body).
"""

from __future__ import annotations

import collections
import hashlib
import hmac
import re
import secrets
import time
from collections.abc import Callable

from pdserve.timing import PROOF_FRESH_SECONDS

PROOF_HEADER = "x-pdserve-proof"
# Nonces remembered at once: every proof accepted in the last
# 2 x PROOF_FRESH_SECONDS (one whose timestamp is still fresh may come back
# until then). Only proofs that verified are remembered, so only consumers fill
# it; when full, proofs are refused until the oldest are forgotten.
MAX_NONCES = 1 << 17
_KEY_LABEL = b"pdserve-http-request-proof-v1"
_FORMAT = re.compile(r"v1:(\d{1,12}):([0-9a-f]{32}):([0-9a-f]{64})")


class ProofRejected(ValueError):
    """The request's proof does not hold; the message says why."""


def proof_key(secret: bytes) -> bytes:
    """The key proofs are made with: derived from the KV secret, so a proof
    reveals nothing usable on the KV side channel, and the reverse."""
    return hmac.new(secret, _KEY_LABEL, hashlib.sha256).digest()


def body_digest(body: bytes) -> str:
    return hashlib.sha256(body).hexdigest()


def _mac(
    key: bytes, timestamp: int, nonce: str, method: str, route: str, digest: str
) -> str:
    fields = (str(timestamp), nonce, method.upper(), route, digest)
    message = b"pdserve-request\0" + "\0".join(fields).encode()
    return hmac.new(key, message, hashlib.sha256).hexdigest()


def make_proof(
    key: bytes,
    method: str,
    route: str,
    digest: str,
    wall: Callable[[], float] = time.time,
) -> str:
    """The header value for one request whose body has SHA-256 ``digest``."""
    timestamp = int(wall())
    nonce = secrets.token_hex(16)
    mac = _mac(key, timestamp, nonce, method, route, digest)
    return f"v1:{timestamp}:{nonce}:{mac}"


class ProofVerifier:
    """The producer's side: checks proofs, accepts each nonce once."""

    def __init__(
        self,
        key: bytes,
        wall: Callable[[], float] = time.time,
        clock: Callable[[], float] = time.monotonic,
        capacity: int = MAX_NONCES,
    ) -> None:
        self._key = key
        self._wall = wall
        self._clock = clock
        self._capacity = capacity
        # nonce -> when it may be forgotten; in insertion order, and every
        # entry is kept equally long, so the oldest is always first.
        self._seen: collections.OrderedDict[str, float] = collections.OrderedDict()

    def verify(self, header: str, method: str, route: str, digest: str) -> None:
        """Accept the proof (its nonce is used up) or raise ProofRejected."""
        match = _FORMAT.fullmatch(header.strip())
        if match is None:
            raise ProofRejected("malformed")
        timestamp, nonce, mac = int(match[1]), match[2], match[3]
        expected = _mac(self._key, timestamp, nonce, method, route, digest)
        if not hmac.compare_digest(expected, mac):
            raise ProofRejected("wrong MAC (another secret, route or body)")
        if abs(self._wall() - timestamp) > PROOF_FRESH_SECONDS:
            raise ProofRejected("stale (the nodes' clocks differ, or a replay)")
        now = self._clock()
        self._forget_old(now)
        if nonce in self._seen:
            raise ProofRejected("replayed")
        if len(self._seen) >= self._capacity:
            raise ProofRejected("too many proofs in flight")
        self._seen[nonce] = now + 2 * PROOF_FRESH_SECONDS

    def _forget_old(self, now: float) -> None:
        while self._seen:
            nonce, until = next(iter(self._seen.items()))
            if until > now:
                return
            del self._seen[nonce]

    def __len__(self) -> int:
        return len(self._seen)
