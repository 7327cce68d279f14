"""What one request asks of a producer: how much prefill work, and which
prompt prefix (for prefix-cache affinity)."""

from __future__ import annotations

import json
from typing import Any

import msgspec

# Characters per token of ordinary text, for requests whose token count is
# unknown until the producer tokenizes them (a load estimate, never exact).
CHARS_PER_TOKEN = 4
# Requests agreeing on this many leading characters share a producer: about
# two KV blocks of 16 tokens at 4 characters a token, with room for chat
# templates' shared preambles. Long enough that unrelated prompts rarely
# agree, short enough that a shared system prompt or document does.
AFFINITY_PREFIX_CHARS = 512


class Demand(msgspec.Struct, frozen=True):
    work: float  # estimated prompt tokens to prefill
    affinity_key: bytes  # the prompt's leading characters


def demand_of(payload: dict[str, Any], prompt_tokens: int | None = None) -> Demand:
    text = prompt_text(payload)
    if prompt_tokens is None:
        prompt_tokens = token_count(payload.get("prompt"))
    work = prompt_tokens if prompt_tokens is not None else len(text) / CHARS_PER_TOKEN
    key = text[:AFFINITY_PREFIX_CHARS].encode("utf-8", "replace")
    return Demand(float(max(work, 1)), key)


def prompt_text(payload: dict[str, Any]) -> str:
    """The prompt as text: a completion's prompt, or a chat's messages as JSON
    (whose beginning is the system prompt and first turns)."""
    prompt = payload.get("prompt", payload.get("messages", ""))
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list):
        # Only the beginning counts: no need to dump a huge prompt whole.
        prompt = prompt[:AFFINITY_PREFIX_CHARS]
    try:
        return json.dumps(prompt, separators=(",", ":"), ensure_ascii=False)
    except (TypeError, ValueError, RecursionError):
        return ""


def token_count(prompt: Any) -> int | None:
    """The prompt's length if it is given as token ids, else None."""
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], list):
        prompt = prompt[0] if len(prompt) == 1 else None
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], int):
        return len(prompt)
    return None
