"""Why a producer cannot be used: the errors, and the one way mismatches are
told (the startup metadata check and the per-rank handshake both say it so)."""

from __future__ import annotations


class IncompatibleProducer(RuntimeError):
    pass


class InstanceGone(IncompatibleProducer):
    """The producer instance asked for is gone: another one serves at its
    address now (a restart). Not a mismatch: the new one may well pair."""


class KVAuthError(IncompatibleProducer):
    """The two nodes' KV secrets differ (or only one has one): never retried."""


NO_SECRET_HERE = "producer requires a KV secret (--kv-secret / PDSERVE_KV_SECRET)"
NO_SECRET_THERE = (
    "this consumer has a KV secret but the producer has none "
    "(give both the same --kv-secret / PDSERVE_KV_SECRET)"
)
SECRET_REJECTED = "KV secret rejected by producer (the nodes' secrets differ)"
PRODUCER_UNPROVEN = (
    "producer did not prove the KV secret (not the producer it claims to be, "
    "or the nodes' secrets differ)"
)


def check_kv_auth(has_secret: bool, producer_requires: bool) -> None:
    """Both nodes must agree on whether the KV side channel is authenticated."""
    if producer_requires and not has_secret:
        raise KVAuthError(NO_SECRET_HERE)
    if has_secret and not producer_requires:
        raise KVAuthError(NO_SECRET_THERE)


def describe_mismatches(pairs: list[tuple[str, object, object]]) -> list[str]:
    return [
        f"{name}: consumer={mine!r} producer={theirs!r}"
        for name, mine, theirs in pairs
        if mine != theirs
    ]


def raise_if(mismatches: list[str]) -> None:
    if mismatches:
        raise IncompatibleProducer(
            "consumer and producer do not match:\n  " + "\n  ".join(mismatches)
        )
