"""A producer's ``/pdserve/metadata``: fetched, checked against this consumer,
typed once. Used at startup (blocking) and for producers that appear later."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from typing import Annotated, Any

import aiohttp
import msgspec

import pdserve
from pdserve.frontend.producer_source import Endpoint
from pdserve.identity import serving_pairs
from pdserve.incompatible import (
    IncompatibleProducer,
    check_kv_auth,
    describe_mismatches,
    raise_if,
)
from pdserve.lease import MAX_ID_CHARS, MAX_PORTS, Port
from pdserve.settings import Settings, kv_secret

METADATA_PATH = "/pdserve/metadata"


class ProducerMetadata(msgspec.Struct, frozen=True):
    """What the consumer keeps of a compatible producer's metadata."""

    kv_ports: Annotated[list[Port], msgspec.Meta(min_length=1, max_length=MAX_PORTS)]
    instance_id: Annotated[str, msgspec.Meta(max_length=MAX_ID_CHARS)] = ""
    tensor_parallel_size: int = 1
    model: str = ""


def own_metadata(settings: Settings) -> dict[str, Any]:
    """What a producer must agree with, as this consumer was started."""
    import vllm

    return {
        "protocol_version": pdserve.PROTOCOL_VERSION,
        "pdserve_version": pdserve.__version__,
        "vllm_version": vllm.__version__,
        "model": settings.model,
        "dtype": settings.dtype,
        "tensor_parallel_size": settings.tensor_parallel_size,
        "serving_identity": settings.serving_identity,
    }


def checked(mine: dict[str, Any], theirs: Any) -> ProducerMetadata:
    """``theirs`` typed, or IncompatibleProducer saying why it cannot serve."""
    if not isinstance(theirs, dict):
        raise IncompatibleProducer("producer metadata is not a JSON object")
    check_producer_metadata(mine, theirs)
    check_kv_auth(kv_secret() is not None, bool(theirs.get("kv_auth")))
    try:
        return msgspec.convert(theirs, type=ProducerMetadata)
    except msgspec.ValidationError as exc:
        raise IncompatibleProducer(f"producer metadata: {exc}") from exc


async def fetch(
    session: aiohttp.ClientSession,
    endpoint: Endpoint,
    headers: dict[str, str],
    timeout: float,
) -> Any:
    """One GET of the metadata. A 3xx/4xx answer is a verdict
    (IncompatibleProducer: wrong API key, not pdserve); anything else that
    fails raises aiohttp/OS errors, to be retried later."""
    async with session.get(
        endpoint.base_url + METADATA_PATH,
        headers=headers | endpoint.headers(),
        timeout=aiohttp.ClientTimeout(total=timeout),
        # The API key goes to this producer only.
        allow_redirects=False,
    ) as response:
        if 300 <= response.status < 500:
            raise IncompatibleProducer(
                f"producer {endpoint.key} refused the handshake: HTTP {response.status}"
            )
        response.raise_for_status()
        return await response.json(content_type=None)


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
    raise_if(describe_mismatches(pairs))


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
