"""HTTP helpers for the end-to-end tests: requests, streaming, metrics."""

from __future__ import annotations

import json

import requests
from prometheus_client.parser import text_string_to_metric_families

from tests.eventually import Equal, eventually

TIMEOUT = 300


def post(url: str, path: str, body: dict | bytes, **kwargs) -> requests.Response:
    if isinstance(body, bytes):
        kwargs.setdefault("headers", {"content-type": "application/json"})
        return requests.post(url + path, data=body, timeout=TIMEOUT, **kwargs)
    return requests.post(url + path, json=body, timeout=TIMEOUT, **kwargs)


def greedy(prompt, max_tokens: int = 8, **extra) -> dict:
    return {
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0,
        "return_token_ids": True,
        **extra,
    }


def completion_tokens(url: str, body: dict) -> list[int]:
    response = post(url, "/v1/completions", body)
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["token_ids"]


def chat_text(url: str, body: dict) -> str:
    response = post(url, "/v1/chat/completions", body)
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["message"]["content"]


def sse_events(response: requests.Response) -> list[dict]:
    events = []
    for line in response.iter_lines():
        if not line.startswith(b"data:"):
            continue
        data = line.removeprefix(b"data:").strip()
        if data != b"[DONE]":
            events.append(json.loads(data))
    return events


def stream(url: str, path: str, body: dict) -> str:
    """Text of a streamed completion or chat completion."""
    with requests.post(
        url + path, json=dict(body, stream=True), stream=True, timeout=TIMEOUT
    ) as response:
        assert response.status_code == 200, response.text
        text = ""
        for event in sse_events(response):
            for choice in event.get("choices", []):
                delta = choice.get("delta") or {}
                text += choice.get("text") or delta.get("content") or ""
        return text


def metric(url: str, name: str, **labels: str) -> float:
    """Sum of the samples of ``name`` whose labels include ``labels``."""
    text = requests.get(url + "/metrics", timeout=30).text
    total = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(
                sample.labels.get(k) == v for k, v in labels.items()
            ):
                total += sample.value
    return total


def idle_state(url: str) -> tuple[float, float, float]:
    return (
        metric(url, "vllm:num_requests_running"),
        metric(url, "vllm:num_requests_waiting"),
        metric(url, "vllm:kv_cache_usage_perc"),
    )


def wait_idle(url: str, timeout: float = 20) -> tuple[float, float, float]:
    """Poll until no request runs or waits and no KV block is held; that
    state (running, waiting, KV usage)."""
    return eventually(
        lambda: Equal(idle_state(url), (0, 0, 0)),
        timeout,
        f"{url} idle (requests running, waiting, KV usage)",
        interval=0.25,
    ).got


def pd_counters(url: str) -> dict[str, float]:
    """What proves PD happened on a consumer: requests prefilled remotely or
    locally, pulls that completed or failed."""
    return {
        "remote": metric(url, "pdserve:remote_prefills_total"),
        "local": metric(url, "pdserve:local_prefills_total"),
        "loads": metric(url, "pdserve:kv_loads_total"),
        "failures": metric(url, "pdserve:kv_load_failures_total"),
    }


class RemotePath:
    """``with RemotePath(url, n) : ...`` asserts that the requests made in the
    block were all prefilled remotely and pulled (``loads`` per request: the
    TP size), none locally, none failed."""

    def __init__(self, url: str, requests: int, loads_per_request: int = 1) -> None:
        self.url = url
        self.expected = {
            "remote": requests,
            "local": 0,
            "loads": requests * loads_per_request,
            "failures": 0,
        }

    def __enter__(self) -> RemotePath:
        self.before = pd_counters(self.url)
        return self

    def __exit__(self, *exc: object) -> None:
        if exc[0] is None:
            after = pd_counters(self.url)
            moved = {k: v - self.before[k] for k, v in after.items()}
            assert moved == self.expected, f"not all prefilled remotely: {moved}"
