"""Startup handshake: a consumer learns everything about its producers from
``--producer-url`` and refuses to start on any mismatch."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from typing import Any

from pdserve.identity import identity_pairs, serving_pairs
from pdserve.log import init_logger
from pdserve.protocol import LayerInfo, RankInfo
from pdserve.timing import HANDSHAKE_RETRY_SECONDS

logger = init_logger(__name__)

METADATA_PATH = "/pdserve/metadata"


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


def _raise_if(mismatches: list[str]) -> None:
    if mismatches:
        raise IncompatibleProducer(
            "consumer and producer do not match:\n  " + "\n  ".join(mismatches)
        )


def check_compatible(local: RankInfo, remote: RankInfo, whole: bool = True) -> None:
    """Refuse a producer rank whose KV this rank cannot read. ``whole``:
    blocks move whole (the ranks hold the same heads); otherwise some heads
    of each block move, and only the bytes of one head must agree."""
    pairs: list[tuple[str, object, object]] = [
        ("protocol version", local.protocol_version, remote.protocol_version),
        ("pdserve version", local.pdserve_version, remote.pdserve_version),
        ("vLLM version", local.vllm_version, remote.vllm_version),
        ("model", local.model, remote.model),
        ("dtype", local.dtype, remote.dtype),
        ("block size", local.block_size, remote.block_size),
        ("KV cache dtype", local.kv_cache_dtype, remote.kv_cache_dtype),
        ("number of KV layers", len(local.layers), len(remote.layers)),
        *identity_pairs(local.identity, remote.identity),
        *_layout_pairs(local, remote, whole),
    ]
    # Which producer rank holds which heads is the pairing's business
    # (tp_mapping); here only whether their bytes can be read.
    if local.tp_size != remote.tp_size:
        pairs.append(
            ("KV heads of the model", local.total_kv_heads, remote.total_kv_heads)
        )
    for mine, theirs in zip(local.layers, remote.layers, strict=False):
        pairs += [
            (f"{mine.name} block dim", mine.block_dim, theirs.block_dim),
            (f"{mine.name} dtype", mine.dtype, theirs.dtype),
            (
                f"{mine.name} KV layout (block dim as -1)",
                _layout(mine, whole),
                _layout(theirs, whole),
            ),
        ]
        if not whole:
            pairs.append((f"{mine.name} head dim", mine.head_dim, theirs.head_dim))
    if not whole and -1 in [layer.head_dim for layer in local.layers + remote.layers]:
        raise IncompatibleProducer(
            "the TP sizes differ, and this KV layout's heads cannot be told apart "
            "(packed head slots, or a backend pdserve cannot slice): start both "
            "nodes with the same --tensor-parallel-size"
        )
    _raise_if(describe_mismatches(pairs))


# What decides the meaning of a block's bytes beyond shapes and dtypes.
LAYOUT_FIELDS = {
    "attention_backend": "attention backend",
    "layout": "KV cache layout",
    "shuffled": "ROCm shuffled KV layout (VLLM_ROCM_SHUFFLE_KV_CACHE_LAYOUT)",
    "block_size": "KV block size",
    "kernel_block_size": "attention kernel block size",
    "head_slots": "KV head slots per page",
    "page_bytes": "bytes per KV page",
    "kv_cache_dtype": "KV cache dtype",
    "fp8_format": "fp8 format of the KV cache",
}


# Fields that scale with a rank's share of the heads.
PER_RANK_FIELDS = ("head_slots", "page_bytes")


def _layout_pairs(
    local: RankInfo, remote: RankInfo, whole: bool
) -> list[tuple[str, object, object]]:
    pairs = [
        (label, getattr(local.kv_layout, field), getattr(remote.kv_layout, field))
        for field, label in LAYOUT_FIELDS.items()
        if whole or field not in PER_RANK_FIELDS
    ]
    if not whole:
        pairs.append(
            ("bytes per KV head of a page", _head_bytes(local), _head_bytes(remote))
        )
    return pairs


def _head_bytes(info: RankInfo) -> float:
    slots = info.kv_layout.head_slots
    return info.kv_layout.page_bytes / slots if slots else 0.0


def _layout(layer: LayerInfo, whole: bool) -> list[int]:
    """The layer's shape with the block dim (and, moving heads, the head
    dim) as -1: those may differ between ranks."""
    loose = {layer.block_dim} if whole else {layer.block_dim, layer.head_dim}
    return [-1 if d in loose else size for d, size in enumerate(layer.shape)]


def wait_for_rank_info(client: Any, timeout: float) -> RankInfo:
    """Ask a producer rank for its RankInfo, retrying until ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return client.rank_info()
        except OSError as exc:
            if time.monotonic() >= deadline:
                raise TimeoutError(
                    f"producer KV port {client.host}:{client.port} not reachable "
                    f"within {timeout:.0f}s: {exc}"
                ) from exc
            time.sleep(HANDSHAKE_RETRY_SECONDS)


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    # urllib would resend the headers (the API key) to wherever it is sent.
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


def fetch_metadata_once(
    producer_url: str, timeout: float, headers: dict[str, str] | None = None
) -> dict[str, Any]:
    """One GET of the producer's metadata. A 3xx/4xx answer is a verdict
    (IncompatibleProducer); OSError/ValueError mean "not up yet".

    ``headers`` may hold the API key: sent to ``producer_url`` only (no
    redirects followed), never logged; and a Host header, kept by urllib."""
    url = producer_url.rstrip("/") + METADATA_PATH
    opener = urllib.request.build_opener(_NoRedirect)
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with opener.open(request, timeout=timeout) as response:
            return json.load(response)
    except urllib.error.HTTPError as exc:
        if 300 <= exc.code < 500:
            hint = (
                " (give both nodes the same --api-key / VLLM_API_KEY)"
                if exc.code in (401, 403)
                else ""
            )
            raise IncompatibleProducer(
                f"producer {producer_url} refused the handshake: HTTP {exc.code}{hint}"
            ) from exc
        raise OSError(f"HTTP {exc.code}") from exc


def fetch_producer_metadata(
    producer_url: str, timeout: float, headers: dict[str, str] | None = None
) -> dict[str, Any]:
    """GET the producer's metadata, retrying while it starts up."""
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    logged = False
    while time.monotonic() < deadline:
        try:
            remaining = max(deadline - time.monotonic(), 0.1)
            return fetch_metadata_once(producer_url, min(10, remaining), headers)
        except (OSError, ValueError) as exc:
            last_error = exc
            if not logged:
                logger.info("Waiting for producer at %s (%s)", producer_url, exc)
                logged = True
            time.sleep(HANDSHAKE_RETRY_SECONDS)
    raise TimeoutError(
        f"producer {producer_url} not reachable within {timeout:.0f}s: {last_error}"
    )


def check_producer_metadata(mine: dict[str, Any], theirs: dict[str, Any]) -> None:
    """Compare what both nodes were started with, before any engine starts."""
    pairs: list[tuple[str, object, object]] = [
        (key, mine.get(key), theirs.get(key))
        for key in ("protocol_version", "pdserve_version", "vllm_version", "model")
    ]
    # Tensor parallel sizes may differ: the engine pairs ranks of different
    # sizes (its per-rank handshake checks the KV layouts).
    if theirs.get("role") != "producer":
        pairs.append(("role", "producer", theirs.get("role")))
    # "auto" resolves inside the engine; the per-rank handshake checks it then.
    if "auto" not in (mine.get("dtype"), theirs.get("dtype")):
        pairs.append(("dtype", mine.get("dtype"), theirs.get("dtype")))
    pairs += serving_pairs(
        mine.get("serving_identity") or {}, theirs.get("serving_identity")
    )
    _raise_if(describe_mismatches(pairs))
