"""The vLLM internals pdserve relies on that differ between the versions it
supports (0.25 – 0.32), in one place, each with the versions it serves.

Everything else pdserve uses of vLLM is the same across that range (checked
against the 0.25.0 and 0.32.0 sources); a version outside it is refused at
startup by the extras' pins, not here.
"""

from __future__ import annotations

from typing import Any

# The Scheduler method deciding whether a blocked waiting request (waiting
# for its KV, its grammar or more input) may be scheduled this step:
# 0.26 – 0.32 name it ``_handle_blocked_waiting_request``; 0.25
# ``_try_promote_blocked_waiting_request``. Both take the request and
# return True to schedule it now.
BLOCKED_WAITING_HOOKS = (
    "_handle_blocked_waiting_request",
    "_try_promote_blocked_waiting_request",
)


def blocked_waiting_hook(scheduler_cls: type) -> str:
    for name in BLOCKED_WAITING_HOOKS:
        if hasattr(scheduler_cls, name):
            return name
    raise RuntimeError(
        "this vLLM's scheduler has none of "
        f"{', '.join(BLOCKED_WAITING_HOOKS)}: unsupported version"
    )


def accept_output_tokens(scheduler: Any, request: Any, token_ids: list[int]) -> bool:
    """Advance a request's grammar with output tokens just appended, as the
    scheduler's update_from_output does; False if the grammar rejects them.
    0.32: ``StructuredOutputManager.accept_tokens``. 0.25: ``should_advance``
    (reasoning), ``trim_reasoning_for_advance``, then the grammar's own
    ``accept_tokens(request_id, tokens)``."""
    manager = scheduler.structured_output_manager
    if hasattr(manager, "accept_tokens"):
        return bool(manager.accept_tokens(request, token_ids))
    if not manager.should_advance(request):
        return True
    tokens = manager.trim_reasoning_for_advance(request, token_ids)
    grammar = request.structured_output_request.grammar
    return not tokens or bool(grammar.accept_tokens(request.request_id, tokens))


def finalize_prefill_stats(stats: Any, scheduler: Any, request: Any) -> Any:
    """A first output's prefill stats as the scheduler would send them:
    0.32 finalizes them with the cached tokens it estimates; 0.25 sends them
    as they are."""
    finalize = getattr(stats, "finalize", None)
    if stats is not None and finalize is not None:
        finalize(scheduler.kv_cache_manager.estimate_cached_tokens(request))
    return stats


def uses_v2_model_runner(vllm_config: Any) -> bool:
    """Whether the workers run vLLM's V2 model runner (its GPU default where
    Triton is available; the CPU build runs V1). The property exists from
    0.25 on; a vLLM without it runs V1."""
    return bool(getattr(vllm_config, "use_v2_model_runner", False))


def reuses_chat_prompt_ids() -> bool:
    """Whether vLLM's chat handler takes a prompt already rendered from
    ``kv_transfer_params["prompt_token_ids"]`` (0.26 – 0.32: decode-side
    token reuse; 0.25 renders the messages again and ignores the key)."""
    try:
        from vllm.renderers import online_renderer
    except ImportError:
        return False
    return hasattr(online_renderer, "_reused_prompt_token_ids")


def replay_frame(frames: list[bytes]) -> tuple[bytes, bytes] | None:
    """(sequence bytes, payload) of one frame of vLLM's KV-events replay as a
    DEALER receives it, or None for a frame of neither form: 0.26 – 0.32
    send (empty, topic, seq, payload); 0.25 (empty, seq, payload)."""
    if len(frames) == 4:
        return frames[2], frames[3]
    if len(frames) == 3:
        return frames[1], frames[2]
    return None
