"""Which requests the consumer sends to the producer, and the body it sends."""

from __future__ import annotations

import copy

import pytest

from pdserve.consumer.remote_prefill import local_reason, prefill_body

COMPLETIONS = "/v1/completions"
CHAT = "/v1/chat/completions"
MESSAGES = [{"role": "user", "content": "Hello"}]


@pytest.mark.parametrize(
    ("path", "payload"),
    [
        (COMPLETIONS, {"prompt": "Hello"}),
        (COMPLETIONS, {"prompt": "Hello", "n": 1, "best_of": 1}),
        (COMPLETIONS, {"prompt": "Hello", "best_of": None}),
        (COMPLETIONS, {"prompt": [1, 2, 3]}),  # token ids
        (COMPLETIONS, {"prompt": [[1, 2, 3]]}),  # one prompt of token ids
        (COMPLETIONS, {"prompt": ["Hello"]}),  # one prompt in a list
        (COMPLETIONS, {"prompt": "Hello", "echo": False, "prompt_logprobs": None}),
        (COMPLETIONS, {"prompt": "Hello", "logprobs": 3, "stream": True}),
        (CHAT, {"messages": MESSAGES}),
        (CHAT, {"messages": MESSAGES, "logprobs": True, "top_logprobs": 2}),
    ],
)
def test_remote_prefill_allowed(path, payload):
    assert local_reason(path, payload) is None


@pytest.mark.parametrize(
    ("path", "payload", "reason"),
    [
        (COMPLETIONS, None, "malformed"),
        (COMPLETIONS, ["Hello"], "malformed"),
        (COMPLETIONS, "Hello", "malformed"),
        (COMPLETIONS, {"prompt": "Hi", "n": 2}, "multiple_choices"),
        (CHAT, {"messages": MESSAGES, "n": 3}, "multiple_choices"),
        (COMPLETIONS, {"prompt": "Hi", "best_of": 2}, "multiple_choices"),
        (COMPLETIONS, {"prompt": "Hi", "prompt_logprobs": 1}, "prompt_logprobs"),
        (COMPLETIONS, {"prompt": "Hi", "prompt_logprobs": -1}, "prompt_logprobs"),
        (CHAT, {"messages": MESSAGES, "prompt_logprobs": 2}, "prompt_logprobs"),
        (COMPLETIONS, {"prompt": "Hi", "echo": True}, "prompt_logprobs"),
        (COMPLETIONS, {"prompt": ["a", "b"]}, "batched_prompts"),
        (COMPLETIONS, {"prompt": [[1, 2], [3]]}, "batched_prompts"),
        (
            COMPLETIONS,
            {"prompt": "Hi", "kv_transfer_params": {"do_remote_prefill": True}},
            "client_kv_params",
        ),
        (CHAT, {"messages": MESSAGES, "kv_transfer_params": None}, "client_kv_params"),
    ],
)
def test_local_reason(path, payload, reason):
    assert local_reason(path, payload) == reason


def test_client_kv_params_win_over_other_reasons():
    payload = {"prompt": ["a", "b"], "n": 2, "kv_transfer_params": {}}
    assert local_reason(COMPLETIONS, payload) == "client_kv_params"


def test_zero_prompt_logprobs_prefills_locally():
    assert local_reason(COMPLETIONS, {"prompt": "Hi", "prompt_logprobs": 0}) == (
        "prompt_logprobs"
    )


def completion_payload() -> dict:
    return {
        "model": "m",
        "prompt": "Hello",
        "max_tokens": 200,
        "min_tokens": 10,
        "temperature": 0.7,
        "stream": True,
        "stream_options": {"include_usage": True},
        "stop": ["\n"],
        "logprobs": 2,
    }


def chat_payload() -> dict:
    return {
        "model": "m",
        "messages": copy.deepcopy(MESSAGES),
        "max_completion_tokens": 200,
        "stream": True,
        "stream_options": {"include_usage": True, "continuous_usage_stats": True},
        "response_format": {"type": "json_object"},
    }


def test_prefill_body_for_completions():
    payload = completion_payload()
    body = prefill_body(COMPLETIONS, payload)
    assert body["max_tokens"] == 1
    assert body["min_tokens"] == 0
    assert body["n"] == 1
    assert body["stream"] is False
    assert "stream_options" not in body
    assert "max_completion_tokens" not in body
    assert body["kv_transfer_params"] == {"do_remote_decode": True}
    # Everything that shapes the prompt or sampling is kept.
    for key in ("model", "prompt", "temperature", "stop", "logprobs"):
        assert body[key] == payload[key]


def test_prefill_body_for_chat():
    payload = chat_payload()
    body = prefill_body(CHAT, payload)
    assert body["max_completion_tokens"] == 1
    assert body["max_tokens"] == 1
    assert body["stream"] is False
    assert "stream_options" not in body
    assert body["kv_transfer_params"] == {"do_remote_decode": True}
    assert body["messages"] == MESSAGES
    assert body["response_format"] == {"type": "json_object"}


def test_prefill_body_without_stream_fields():
    body = prefill_body(COMPLETIONS, {"prompt": [1, 2, 3]})
    assert body == {
        "prompt": [1, 2, 3],
        "max_tokens": 1,
        "min_tokens": 0,
        "stream": False,
        "n": 1,
        "kv_transfer_params": {"do_remote_decode": True},
    }


@pytest.mark.parametrize(
    ("path", "make"), [(COMPLETIONS, completion_payload), (CHAT, chat_payload)]
)
def test_prefill_body_does_not_mutate_input(path, make):
    payload = make()
    before = copy.deepcopy(payload)
    body = prefill_body(path, payload)
    assert payload == before
    # Nothing is shared: editing the body leaves the request alone.
    for value in body.values():
        if isinstance(value, list):
            value.append("x")
        elif isinstance(value, dict):
            value["x"] = 1
    if "messages" in body:
        body["messages"][0]["content"] = "changed"
    assert payload == before
