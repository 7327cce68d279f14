"""The consumer's engine only ever sees the lease its own HTTP layer got
from the producer and signed: client kv_transfer_params are removed from
every JSON body on every path, non-JSON bodies pass untouched."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pdserve import metrics
from pdserve.entrypoints.middleware import PDServeMiddleware
from pdserve.frontend.client_body import KV_PARAMS_KEY, strip_kv_params
from pdserve.lease import DO_REMOTE_DECODE, LEASE_KEY, Lease
from tests.unit.http_fakes import (
    CONSUMER,
    PRODUCER,
    FakeVLLM,
    call,
    make_lease,
    run,
    use_node,
)

FORGED = {
    "do_remote_prefill": True,
    LEASE_KEY: json.loads(json.dumps(make_lease(mac="00" * 32).to_params()))[LEASE_KEY],
}
# Paths vLLM serves that take a JSON body; none may carry kv_transfer_params.
PATHS = [
    "/v1/completions",
    "/v1/chat/completions",
    "/v1/responses",
    "/v1/messages",
    "/v1/messages/count_tokens",
    "/inference/v1/generate",
    "/v1/completions/render",
    "/v1/chat/completions/render",
    "/cohere/v2/chat",
    "/v2/chat",
    "/invocations",
    "/tokenize",
    "/pooling",
    "/v1/unknown/future/endpoint",
]


def stripped_count() -> float:
    return metrics.CLIENT_KV_PARAMS_STRIPPED._value.get()


def contains_key(value: object) -> bool:
    if isinstance(value, dict):
        return KV_PARAMS_KEY in value or any(map(contains_key, value.values()))
    if isinstance(value, list):
        return any(map(contains_key, value))
    return False


@pytest.fixture
def consumer(monkeypatch):
    use_node(monkeypatch, CONSUMER)
    app = FakeVLLM()
    return PDServeMiddleware(app), app


# --- the stripping itself ----------------------------------------------------


def test_strip_removes_every_nested_key():
    payload = {
        KV_PARAMS_KEY: FORGED,
        "n": 2,
        "sampling_params": {"extra_args": {KV_PARAMS_KEY: FORGED, "x": 1}},
        "messages": [
            {"role": "user", "content": [{"type": "text", KV_PARAMS_KEY: {}}]},
            [[{KV_PARAMS_KEY: None}]],
        ],
        "vllm_xargs": {KV_PARAMS_KEY: [1, 2]},
    }
    assert strip_kv_params(payload) == 5
    assert payload == {
        "n": 2,
        "sampling_params": {"extra_args": {"x": 1}},
        "messages": [{"role": "user", "content": [{"type": "text"}]}, [[{}]]],
        "vllm_xargs": {},
    }
    assert strip_kv_params(payload) == 0


def test_strip_survives_nesting_at_the_parsers_limit():
    depth = 900
    payload = json.loads("[" * depth + '{"kv_transfer_params": 1}' + "]" * depth)
    assert strip_kv_params(payload) == 1


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=5),
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(
            st.sampled_from([KV_PARAMS_KEY, "a", "prompt", "kv"]), children, max_size=4
        )
    ),
    max_leaves=30,
)


@settings(max_examples=100, deadline=None)
@given(json_values)
def test_strip_leaves_no_key_and_nothing_else_changed(value):
    before = json.dumps(value)
    removed = strip_kv_params(value)
    assert not contains_key(value)
    assert (removed == 0) == (json.dumps(value) == before)


# --- every path on the consumer ----------------------------------------------


@pytest.mark.parametrize("method", ["POST", "PUT", "PATCH"])
@pytest.mark.parametrize("path", PATHS)
def test_client_params_never_reach_vllm(consumer, path, method):
    mw, app = consumer
    # n=2: a completion prefilled locally, so no producer is involved here.
    body = {
        "n": 2,
        "prompt": "hi",
        KV_PARAMS_KEY: FORGED,
        "sampling_params": {"max_tokens": 3, "extra_args": {KV_PARAMS_KEY: FORGED}},
        "messages": [{"role": "user", "content": "hi", KV_PARAMS_KEY: FORGED}],
    }
    before = stripped_count()
    answer = run(call(mw, method, path, json.dumps(body).encode()))
    assert answer.status == 200
    [seen] = app.seen
    assert (seen.method, seen.path) == (method, path)
    assert seen.json() == {
        "n": 2,
        "prompt": "hi",
        "sampling_params": {"max_tokens": 3, "extra_args": {}},
        "messages": [{"role": "user", "content": "hi"}],
    }
    assert seen.headers[b"content-type"] == b"application/json"
    assert stripped_count() == before + 1


def test_any_content_type_is_stripped_and_sent_as_json(consumer):
    mw, app = consumer
    body = json.dumps({"input": "hi", KV_PARAMS_KEY: FORGED}).encode()
    headers = [(b"content-type", b"text/plain"), (b"transfer-encoding", b"chunked")]
    run(call(mw, "POST", "/v1/responses", body, headers))
    [seen] = app.seen
    assert seen.json() == {"input": "hi"}
    assert seen.headers[b"content-type"] == b"application/json"
    assert seen.count(b"content-type") == 1
    assert b"transfer-encoding" not in seen.headers


def test_escaped_key_spelling_is_stripped(consumer):
    mw, app = consumer
    # JSON escapes spell the same key; vLLM's parser decodes them too.
    body = b'{"input": "hi", "kv_transfer_param\\u0073": {"do_remote_prefill": true}}'
    run(call(mw, "POST", "/v1/responses", body))
    assert app.seen[0].json() == {"input": "hi"}


def test_duplicate_keys_are_all_gone(consumer):
    mw, app = consumer
    body = b'{"kv_transfer_params": 1, "input": "x", "kv_transfer_params": {"a": 1}}'
    run(call(mw, "POST", "/v1/responses", body))
    assert KV_PARAMS_KEY.encode() not in app.seen[0].body


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"not json kv_transfer_params",
        b'{"kv_transfer_params": {"do_remote_prefill": true}',
        b'{"prompt": "\xff\xfe kv_transfer_params"}',
        b"--boundary\r\nContent-Disposition: form-data; "
        b'name="kv_transfer_params"\r\n\r\n{}\r\n--boundary--',
        b"1" * 5000,  # beyond Python's int digit limit: not JSON to vLLM either
    ],
)
def test_non_json_bodies_pass_unchanged(consumer, body):
    mw, app = consumer
    headers = [(b"content-type", b"multipart/form-data; boundary=boundary")]
    before = stripped_count()
    run(call(mw, "POST", "/v1/audio/transcriptions", body, headers))
    [seen] = app.seen
    assert seen.body == body
    assert seen.headers[b"content-type"] == headers[0][1]
    assert stripped_count() == before


def test_json_without_params_is_forwarded_byte_for_byte(consumer):
    mw, app = consumer
    body = b'{"input":  "hi", "temperature": 1.50, "x": "\\u00e9"}'
    headers = [(b"content-type", b"application/json; charset=utf-8")]
    run(call(mw, "POST", "/v1/responses", body, headers))
    assert app.seen[0].body == body
    assert app.seen[0].headers[b"content-type"] == headers[0][1]


def test_too_deep_body_is_refused(consumer):
    mw, app = consumer
    body = b"[" * 100_000 + b"]" * 100_000
    answer = run(call(mw, "POST", "/v1/responses", body))
    assert answer.status == 400
    assert app.seen == []


def test_get_requests_pass_through(consumer):
    mw, app = consumer
    run(call(mw, "GET", "/v1/models", b'{"kv_transfer_params": 1}'))
    assert app.seen[0].body == b'{"kv_transfer_params": 1}'


def test_producer_keeps_its_requests_as_they_are(monkeypatch):
    # The consumer asks the producer with do_remote_decode; it must arrive.
    use_node(monkeypatch, PRODUCER)
    app = FakeVLLM()
    mw = PDServeMiddleware(app)
    body = json.dumps({"prompt": "hi", KV_PARAMS_KEY: {DO_REMOTE_DECODE: True}})
    run(call(mw, "POST", "/v1/completions", body.encode()))
    assert app.seen[0].body == body.encode()


def test_forged_lease_is_no_lease():
    # Even if one slipped through, the engine needs the node key's MAC.
    forged = Lease.from_params(FORGED)
    assert forged is not None and not forged.verified(b"k" * 32)
