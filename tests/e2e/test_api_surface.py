"""The consumer serves vLLM's API (completions, chat, streaming, models,
health, metrics) and the legacy /generate, with the baseline's answers."""

from __future__ import annotations

import json

import requests

from tests.e2e.conftest import random_prompt
from tests.e2e.helpers import TIMEOUT, RemotePath, chat_text, post, stream

PROMPT = "The weather today is sunny and the network"


def chat_body(max_tokens: int = 10) -> dict:
    return {
        "messages": [
            {"role": "system", "content": "You answer briefly."},
            {"role": "user", "content": "How do I cook rice on a cold day?"},
        ],
        "max_tokens": max_tokens,
        "temperature": 0,
    }


def text_body(max_tokens: int = 10) -> dict:
    return {"prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0}


def test_chat_equals_baseline(cluster):
    expected = chat_text(cluster.baseline.url, chat_body())
    with RemotePath(cluster.consumer.url, 1):
        assert chat_text(cluster.consumer.url, chat_body()) == expected


def test_streaming_chat_equals_baseline(cluster):
    expected = chat_text(cluster.baseline.url, chat_body(12))
    with RemotePath(cluster.consumer.url, 1):
        got = stream(cluster.consumer.url, "/v1/chat/completions", chat_body(12))
    assert got == expected


def test_streaming_completion_equals_baseline(cluster):
    body = text_body(12)
    expected = post(cluster.baseline.url, "/v1/completions", body).json()
    with RemotePath(cluster.consumer.url, 1):
        got = stream(cluster.consumer.url, "/v1/completions", body)
    assert got == expected["choices"][0]["text"]


def test_models_health_metrics(cluster):
    models = requests.get(cluster.consumer.url + "/v1/models", timeout=30).json()
    assert [m["id"] for m in models["data"]] == [cluster.model]
    assert requests.get(cluster.consumer.url + "/health", timeout=30).status_code == 200
    text = requests.get(cluster.consumer.url + "/metrics", timeout=30).text
    assert "pdserve:remote_prefills_total" in text
    assert "vllm:prompt_tokens_by_source_total" in text


def baseline_text(cluster, max_tokens: int = 10) -> str:
    answer = post(cluster.baseline.url, "/v1/completions", text_body(max_tokens))
    return answer.json()["choices"][0]["text"]


def test_legacy_generate(cluster):
    expected = {"text": [PROMPT + baseline_text(cluster)]}
    with RemotePath(cluster.consumer.url, 1):
        response = post(
            cluster.consumer.url,
            "/generate",
            {"prompt": PROMPT, "max_tokens": 10, "temperature": 0},
        )
    assert response.status_code == 200
    assert response.json() == expected


def test_legacy_curl_without_json_content_type(cluster):
    """`curl -d '{"prompt": ...}' .../generate` sends a form content type;
    vLLM's retired api_server answered it, and so does the consumer."""
    expected = {"text": [PROMPT + baseline_text(cluster)]}
    data = json.dumps({"prompt": PROMPT, "max_tokens": 10, "temperature": 0})
    with RemotePath(cluster.consumer.url, 1):
        response = requests.post(
            cluster.consumer.url + "/generate",
            data=data.encode(),
            headers={"content-type": "application/x-www-form-urlencoded"},
            timeout=TIMEOUT,
        )
    assert response.status_code == 200, response.text
    assert response.json() == expected


def test_legacy_generate_streaming(cluster):
    expected = PROMPT + baseline_text(cluster)
    with (
        RemotePath(cluster.consumer.url, 1),
        requests.post(
            cluster.consumer.url + "/generate",
            json={"prompt": PROMPT, "max_tokens": 10, "temperature": 0, "stream": True},
            stream=True,
            timeout=TIMEOUT,
        ) as response,
    ):
        assert response.status_code == 200
        # The streaming format (a buffered answer is one application/json).
        assert response.headers["content-type"] == "application/x-ndjson"
        lines = [json.loads(line) for line in response.iter_lines() if line]
    texts = [line["text"][0] for line in lines]
    assert texts[-1] == expected
    assert all(text.startswith(PROMPT) for text in texts)
    # Each line the whole text so far. How many lines is vLLM's to say: it
    # merges a stream's pending tokens into one chunk when its reader is
    # behind, which a starved 2-core machine can make all 10 (CI run 4).
    assert [len(t) for t in texts] == sorted(len(t) for t in texts)


def test_legacy_generate_bad_request(cluster):
    response = post(cluster.consumer.url, "/generate", {"prompt": random_prompt(3, 1)})
    assert response.status_code == 400
