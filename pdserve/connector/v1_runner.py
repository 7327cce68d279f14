"""Continuing from the producer's first token on vLLM's V1 model runner.

The V2 model runner (vLLM's GPU default) receives a new request with all its
token ids, outputs included, so a request whose first output token was
appended in the scheduler simply computes that token's KV and samples the
second one. The V1 runner (vLLM's CPU build; GPUs without Triton, or with
``VLLM_USE_V2_MODEL_RUNNER=0``) receives only the prompt and starts the
request with no output: it would read the first token's position from a
stale slot. For it the scheduler's output is adjusted: the worker gets a copy
of the prompt with the first token appended (so the right token is computed
at the right position), a ``min_tokens`` one lower, and output counts one
lower (the worker's own output list lacks that token).

This is exact only where nothing in the worker counts output tokens or
draws random numbers per output: frequency and presence penalties,
``bad_words``, seeded random sampling (one generator draw per step: the
consumer's first draw would be aggregated vLLM's second), a thinking token
budget, custom logits processors. Requests using any of those take the path
where the consumer computes the first token itself (``fallback_reason``).
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from typing import Any

from vllm.sampling_params import SamplingType

# Labels of pdserve:first_token_fallbacks_total for the V1 runner.
PENALTIES = "v1_runner_penalties"
BAD_WORDS = "v1_runner_bad_words"
SEEDED = "v1_runner_seeded_sampling"
THINKING_BUDGET = "v1_runner_thinking_budget"
LOGITS_PROCESSORS = "v1_runner_logits_processors"


def fallback_reason(params: Any, custom_logits_processors: bool) -> str | None:
    """Why the V1 runner cannot continue this request exactly from the
    producer's first token; None if it can."""
    if custom_logits_processors:
        return LOGITS_PROCESSORS
    if params.frequency_penalty or params.presence_penalty:
        return PENALTIES
    if params.bad_words:
        return BAD_WORDS
    if params.sampling_type == SamplingType.RANDOM_SEED:
        return SEEDED
    if getattr(params, "thinking_token_budget", None) is not None:
        return THINKING_BUDGET
    return None


def adapt_new_request(new_request: Any, first_token_id: int) -> None:
    """The worker's view of a newly scheduled request that continues from
    ``first_token_id``: that token is its last prompt token. Copies: the
    scheduler's request keeps its own prompt and sampling parameters."""
    new_request.prompt_token_ids = [*new_request.prompt_token_ids, first_token_id]
    params = copy.copy(new_request.sampling_params)
    params.min_tokens = max(0, params.min_tokens - 1)
    new_request.sampling_params = params


def adapt_cached_requests(cached: Any, request_ids: Iterable[str]) -> None:
    """Output counts of running requests, as the worker counts them (without
    the first token): used when it rebuilds a resumed request's outputs."""
    ids = set(request_ids)
    for i, request_id in enumerate(cached.req_ids):
        if request_id in ids:
            cached.num_output_tokens[i] -= 1
