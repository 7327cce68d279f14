"""Prompt token ids through vLLM's own OnlineRenderer on the tiny model
(no engine), checked against the model's tokenizer."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest

from pdserve.frontend.prompt_tokens import prompt_token_ids


@pytest.fixture(scope="module")
def tiny():
    from transformers import AutoTokenizer
    from vllm.config import ModelConfig, VllmConfig
    from vllm.renderers.online_renderer import OnlineRenderer
    from vllm.renderers.registry import renderer_from_config

    from pdserve.tiny_model import ensure_tiny_model

    model = ensure_tiny_model()
    model_config = ModelConfig(model=model, dtype="float32", max_model_len=1024)
    renderer = OnlineRenderer(
        model_config,
        renderer_from_config(VllmConfig(model_config=model_config)),
        request_logger=None,
        chat_template=None,
        chat_template_content_format="auto",
    )
    # As vLLM's app holds it; the middleware passes its ASGI scope.
    scope = {"app": SimpleNamespace(state=SimpleNamespace(online_renderer=renderer))}
    return model, scope, AutoTokenizer.from_pretrained(model)


def ids(scope, path, payload):
    return asyncio.run(prompt_token_ids(scope, path, payload))


def test_completion_text_prompt(tiny):
    model, scope, tokenizer = tiny
    prompt = "The quick brown fox jumps over the lazy dog. " * 5
    got = ids(scope, "/v1/completions", {"model": model, "prompt": prompt})
    assert got == tokenizer(prompt)["input_ids"] and len(got) > 20


def test_completion_token_prompt_and_batches(tiny):
    model, scope, _ = tiny
    assert ids(scope, "/v1/completions", {"model": model, "prompt": [5, 6, 7]}) == [
        5,
        6,
        7,
    ]
    assert ids(scope, "/v1/completions", {"model": model, "prompt": ["a", "b"]}) is None


def test_chat_is_rendered_with_the_template(tiny):
    model, scope, tokenizer = tiny
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "hi there"},
    ]
    got = ids(scope, "/v1/chat/completions", {"model": model, "messages": messages})
    want = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True
    )
    if hasattr(want, "keys"):  # newer transformers return a BatchEncoding
        want = want["input_ids"]
    assert got == list(want)


def test_unsure_is_none(tiny):
    model, scope, _ = tiny
    assert ids(scope, "/v1/completions", {"model": model}) is None  # no prompt
    assert ids(scope, "/v1/embeddings", {"model": model, "input": "x"}) is None
    assert ids(scope, "/v1/completions", ["not", "a", "dict"]) is None
    assert ids({"app": object()}, "/v1/completions", {"prompt": "x"}) is None
