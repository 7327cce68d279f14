"""The consumer's proof on its prefills (with a KV secret): verifiable only
with the secret, bound to method, route and body, fresh, used once; the
nonces remembered are bounded. Time is the test's."""

from __future__ import annotations

import hashlib
import hmac

import pytest

from pdserve.request_proof import (
    ProofRejected,
    ProofVerifier,
    body_digest,
    make_proof,
    proof_key,
)
from pdserve.timing import PROOF_FRESH_SECONDS

SECRET = b"kv-secret-for-tests"
ROUTE = "/v1/completions"
BODY = body_digest(b'{"prompt": "hi"}')


class Clock:
    def __init__(self, now: float = 1_800_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


def verifier(clock: Clock, capacity: int = 1000) -> ProofVerifier:
    return ProofVerifier(proof_key(SECRET), wall=clock, clock=clock, capacity=capacity)


def proof(clock: Clock, key: bytes = proof_key(SECRET), **changes) -> str:
    fields = {"method": "POST", "route": ROUTE, "digest": BODY} | changes
    return make_proof(key, wall=clock, **fields)


def test_a_proof_is_accepted_once(clock):
    check = verifier(clock)
    made = proof(clock)
    check.verify(made, "POST", ROUTE, BODY)
    with pytest.raises(ProofRejected, match="replayed"):
        check.verify(made, "POST", ROUTE, BODY)
    # A new proof for the very same request is a new nonce.
    check.verify(proof(clock), "POST", ROUTE, BODY)


@pytest.mark.parametrize(
    ("method", "route", "digest"),
    [
        ("GET", ROUTE, BODY),
        ("POST", "/invocations", BODY),
        ("POST", "/v1/chat/completions", BODY),
        ("POST", ROUTE, body_digest(b'{"prompt": "hi", "max_tokens": 9}')),
    ],
)
def test_bound_to_method_route_and_body(clock, method, route, digest):
    with pytest.raises(ProofRejected, match="MAC"):
        verifier(clock).verify(proof(clock), method, route, digest)


def test_other_secret_or_the_secret_itself_does_not_prove(clock):
    for key in (proof_key(b"another secret"), SECRET):
        with pytest.raises(ProofRejected, match="MAC"):
            verifier(clock).verify(proof(clock, key=key), "POST", ROUTE, BODY)


def test_key_is_derived_not_the_secret():
    key = proof_key(SECRET)
    assert key != SECRET and SECRET not in key
    label = b"pdserve-http-request-proof-v1"
    assert key == hmac.new(SECRET, label, hashlib.sha256).digest()


@pytest.mark.parametrize("skew", [-PROOF_FRESH_SECONDS - 1, PROOF_FRESH_SECONDS + 1])
def test_stale_or_future_proofs_refused(clock, skew):
    made = proof(Clock(clock.now + skew))
    with pytest.raises(ProofRejected, match="stale"):
        verifier(clock).verify(made, "POST", ROUTE, BODY)


@pytest.mark.parametrize("skew", [-PROOF_FRESH_SECONDS + 1, PROOF_FRESH_SECONDS - 1])
def test_clocks_within_the_window_agree(clock, skew):
    verifier(clock).verify(proof(Clock(clock.now + skew)), "POST", ROUTE, BODY)


@pytest.mark.parametrize(
    "header",
    [
        "",
        "garbage",
        "v2:1:" + "0" * 32 + ":" + "0" * 64,
        "v1:abc:" + "0" * 32 + ":" + "0" * 64,
        "v1:1800000000:" + "0" * 31 + ":" + "0" * 64,
        "v1:1800000000:" + "0" * 32 + ":" + "0" * 65,
        "v1:1800000000:" + "G" * 32 + ":" + "0" * 64,
        "v1:" + "9" * 400 + ":" + "0" * 32 + ":" + "0" * 64,
    ],
)
def test_malformed_proofs_refused(clock, header):
    with pytest.raises(ProofRejected, match="malformed"):
        verifier(clock).verify(header, "POST", ROUTE, BODY)


def test_replay_within_the_whole_freshness_of_its_timestamp(clock):
    """A nonce is remembered as long as its timestamp could still pass."""
    check = verifier(clock)
    # Made at the future edge of the window: fresh for 2 x PROOF_FRESH_SECONDS.
    made = proof(Clock(clock.now + PROOF_FRESH_SECONDS))
    check.verify(made, "POST", ROUTE, BODY)
    clock.now += 2 * PROOF_FRESH_SECONDS - 1
    check.verify(proof(clock), "POST", ROUTE, BODY)  # forgets nothing yet
    with pytest.raises(ProofRejected, match="replayed"):
        check.verify(made, "POST", ROUTE, BODY)


def test_nonces_are_forgotten_and_bounded(clock):
    check = verifier(clock, capacity=3)
    for _ in range(3):
        check.verify(proof(clock), "POST", ROUTE, BODY)
    with pytest.raises(ProofRejected, match="too many"):
        check.verify(proof(clock), "POST", ROUTE, BODY)
    assert len(check) == 3
    clock.now += 2 * PROOF_FRESH_SECONDS
    check.verify(proof(clock), "POST", ROUTE, BODY)
    assert len(check) == 1


def test_rejected_proofs_use_no_memory(clock):
    check = verifier(clock, capacity=2)
    for _ in range(10):
        with pytest.raises(ProofRejected):
            check.verify(proof(clock, key=proof_key(b"x")), "POST", ROUTE, BODY)
    assert len(check) == 0
