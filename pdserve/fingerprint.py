"""What a lease's KV was computed from, as one digest both nodes compute.

A consumer decodes on a producer's KV only if it was computed for exactly
its own request's inputs. For the same prompt token ids the KV still differs
with a LoRA adapter, and with multimodal inputs or prompt embeddings (their
placeholder token ids are the same for any image of a size, and each node
fetches and processes them itself). The digest covers token ids and the
adapter; inputs it does not cover yet are never leased (prefilled on the
consumer), so no KV computed for other inputs can reach a decode.
"""

from __future__ import annotations

from typing import Any

from pdserve.side_channel.protocol import prompt_hash

# Why a request's KV cannot be covered (``None`` when it can).
MULTIMODAL = "multimodal"
PROMPT_EMBEDS = "prompt_embeds"
NO_TOKEN_IDS = "no_token_ids"


def uncovered(request: Any) -> str | None:
    """Why ``request``'s KV depends on more than the digest covers, or None."""
    if getattr(request, "mm_features", None):
        return MULTIMODAL
    if getattr(request, "prompt_embeds", None) is not None:
        return PROMPT_EMBEDS
    if request.prompt_token_ids is None:
        return NO_TOKEN_IDS
    return None


def adapter_of(request: Any) -> str:
    """The LoRA adapter a request runs with, by name and path ("" = none)."""
    lora = getattr(request, "lora_request", None)
    if lora is None:
        return ""
    return f"{lora.lora_name}\0{getattr(lora, 'lora_path', '') or ''}"


def kv_fingerprint(request: Any) -> str | None:
    """The digest of what shaped ``request``'s prompt KV; None if uncovered."""
    if uncovered(request) is not None:
        return None
    return prompt_hash(list(request.prompt_token_ids), adapter_of(request))
