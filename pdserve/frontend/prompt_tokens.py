"""A request's prompt token ids, as the consumer's own vLLM would see them.

The cheapest exact way in vLLM's OpenAI server (0.32): its ``OnlineRenderer``
(``app.state.online_renderer``), the object its completion and chat handlers
call to validate, render (chat template, tools) and tokenize a request
(``render_completion`` / ``render_chat``) before the engine gets it. We call
it on our own copy of the request: same template, tokenizer, special-token
handling and truncation as the handler that will serve it, in process, no
HTTP round trip and no engine. The handler renders again later: tokenizing
twice is the price (a few ms for long prompts; the tokenizer runs off the
event loop in vLLM's renderer).

Anything unsure answers None, and the caller treats the prompt as unknown:
no renderer (older vLLM, other app), a body vLLM would reject, several
prompts, prompt embeddings.
"""

from __future__ import annotations

from typing import Any

from pdserve.log import init_logger

logger = init_logger(__name__)

CHAT_PATH = "/v1/chat/completions"
MAX_TOKEN_ID = 1 << 31
COMPLETIONS_PATH = "/v1/completions"


def _renderer(app_state_or_scope: Any) -> Any:
    """vLLM's OnlineRenderer from an ASGI scope, an app, its state, or itself."""
    target = app_state_or_scope
    if isinstance(target, dict):  # an ASGI scope: vLLM's app is in it
        target = target.get("app")
    for candidate in (target, getattr(target, "state", None)):
        renderer = getattr(candidate, "online_renderer", None)
        if renderer is not None:
            return renderer
    if hasattr(target, "render_completion") and hasattr(target, "render_chat"):
        return target
    return None


async def prompt_token_ids(
    app_state_or_scope: Any, path: str, payload: Any
) -> list[int] | None:
    """Token ids of the single prompt of a completions or chat request, or None."""
    renderer = _renderer(app_state_or_scope)
    if renderer is None or not isinstance(payload, dict):
        return None
    if payload.get("prompt_embeds") is not None:
        return None
    try:
        if path.endswith(CHAT_PATH):
            from vllm.entrypoints.openai.chat_completion.protocol import (
                ChatCompletionRequest,
            )

            request = ChatCompletionRequest.model_validate(payload)
            result = await renderer.render_chat(request, skip_mm_cache=True)
            if not isinstance(result, tuple):
                return None  # vLLM's ErrorResponse: its handler will say why
            _, inputs = result
        elif path.endswith(COMPLETIONS_PATH):
            from vllm.entrypoints.openai.completion.protocol import CompletionRequest

            request = CompletionRequest.model_validate(payload)
            inputs = await renderer.render_completion(request, skip_mm_cache=True)
            if not isinstance(inputs, list):
                return None
        else:
            return None
    except Exception as exc:  # invalid body, template error: vLLM answers it
        logger.debug("Prompt not rendered for placement: %r", exc)
        return None
    if len(inputs) != 1:
        return None
    from vllm.renderers.inputs.preprocess import extract_prompt_components

    components = extract_prompt_components(renderer.model_config, inputs[0])
    if components.embeds is not None or components.token_ids is None:
        return None
    ids = list(components.token_ids)
    # Ids no vocabulary has: vLLM's handler refuses them; nothing to place.
    if not all(isinstance(i, int) and 0 <= i < MAX_TOKEN_ID for i in ids):
        return None
    return ids
