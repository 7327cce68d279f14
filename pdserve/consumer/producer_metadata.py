"""A producer's ``/pdserve/metadata``: fetched, checked against this consumer,
typed once. Used at startup (blocking) and for producers that appear later."""

from __future__ import annotations

from typing import Annotated, Any

import aiohttp
import msgspec

import pdserve
from pdserve.consumer.producer_source import Endpoint
from pdserve.handshake import (
    METADATA_PATH,
    IncompatibleProducer,
    check_kv_auth,
    check_producer_metadata,
)
from pdserve.lease import MAX_ID_CHARS, MAX_PORTS, Port
from pdserve.settings import Settings, kv_secret


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
