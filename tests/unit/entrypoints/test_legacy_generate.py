"""The legacy ``POST /generate`` replies, rebuilt from ``/v1/completions``
answers fed in as ASGI messages."""

from __future__ import annotations

import asyncio
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pdserve.entrypoints.legacy_generate import (
    BufferedReply,
    StreamingReply,
    to_completion_request,
)
from pdserve.entrypoints.middleware import PDServeMiddleware
from tests.unit.http_fakes import CONSUMER, PRODUCER, FakeVLLM, call, run, use_node

PROMPT = "Once upon"


class Recorder:
    def __init__(self) -> None:
        self.messages: list[dict] = []

    async def __call__(self, message: dict) -> None:
        self.messages.append(message)

    @property
    def start(self) -> dict:
        starts = [m for m in self.messages if m["type"] == "http.response.start"]
        assert len(starts) == 1
        assert self.messages[0] is starts[0]
        return starts[0]

    @property
    def bodies(self) -> list[dict]:
        return [m for m in self.messages if m["type"] == "http.response.body"]

    @property
    def body(self) -> bytes:
        bodies = self.bodies
        assert bodies, "no body sent"
        assert all(m.get("more_body", False) for m in bodies[:-1])
        assert not bodies[-1].get("more_body", False)
        return b"".join(m.get("body", b"") for m in bodies)

    def header(self, name: bytes) -> bytes:
        return dict(self.start["headers"])[name]


def drive(reply_cls, status: int, chunks: list[bytes], prompt: str = PROMPT):
    recorder = Recorder()
    reply = reply_cls(prompt, recorder)

    async def run() -> None:
        await reply({"type": "http.response.start", "status": status, "headers": []})
        for i, chunk in enumerate(chunks):
            await reply(
                {
                    "type": "http.response.body",
                    "body": chunk,
                    "more_body": i < len(chunks) - 1,
                }
            )

    asyncio.run(run())
    return recorder


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({min(c, len(data)) for c in cuts})
    edges = [0, *points, len(data)]
    return [data[a:b] for a, b in zip(edges, edges[1:], strict=False)]


# --- non-streaming -----------------------------------------------------------


def completion(texts: dict[int, str]) -> bytes:
    choices = [
        {"index": i, "text": t, "finish_reason": "length"} for i, t in texts.items()
    ]
    return json.dumps(
        {"id": "cmpl-1", "object": "text_completion", "choices": choices}
    ).encode()


def test_buffered_answer_is_prompt_plus_text():
    answer = completion({0: " a time"})
    recorder = drive(BufferedReply, 200, [answer[:10], answer[10:]])
    assert recorder.start["status"] == 200
    assert json.loads(recorder.body) == {"text": ["Once upon a time"]}
    assert recorder.header(b"content-type") == b"application/json"
    assert int(recorder.header(b"content-length")) == len(recorder.body)


def test_buffered_choices_sorted_by_index():
    answer = completion({2: " C", 0: " A", 1: " B"})
    recorder = drive(BufferedReply, 200, [answer])
    assert json.loads(recorder.body) == {
        "text": [PROMPT + " A", PROMPT + " B", PROMPT + " C"]
    }


def test_buffered_nothing_sent_before_the_last_chunk():
    recorder = Recorder()
    reply = BufferedReply(PROMPT, recorder)
    answer = completion({0: "x"})

    async def run() -> None:
        await reply({"type": "http.response.start", "status": 200, "headers": []})
        await reply(
            {"type": "http.response.body", "body": answer[:5], "more_body": True}
        )
        assert recorder.messages == []
        await reply({"type": "http.response.body", "body": answer[5:]})

    asyncio.run(run())
    assert json.loads(recorder.body) == {"text": [PROMPT + "x"]}


@pytest.mark.parametrize("status", [400, 404, 500, 503])
def test_buffered_error_passes_through(status):
    error = {"error": {"message": "bad", "type": "BadRequestError", "code": status}}
    recorder = drive(BufferedReply, status, [json.dumps(error).encode()])
    assert recorder.start["status"] == status
    assert json.loads(recorder.body) == error


# --- streaming ---------------------------------------------------------------


def sse(events: list[dict]) -> bytes:
    data = b"".join(b"data: " + json.dumps(e).encode() + b"\n\n" for e in events)
    return data + b"data: [DONE]\n\n"


EVENTS = [
    {"choices": [{"index": 0, "text": " a"}]},
    {"choices": [{"index": 1, "text": " b"}]},
    {"choices": [{"index": 0, "text": " time"}]},
    {"choices": [{"index": 1, "text": "ü", "finish_reason": "length"}]},
    {"choices": [{"index": 0, "text": "", "finish_reason": "stop"}]},
]
EXPECTED = [
    {"text": [PROMPT + " a"]},
    {"text": [PROMPT + " a", PROMPT + " b"]},
    {"text": [PROMPT + " a time", PROMPT + " b"]},
    {"text": [PROMPT + " a time", PROMPT + " bü"]},
    {"text": [PROMPT + " a time", PROMPT + " bü"]},
]


def ndjson(body: bytes) -> list[dict]:
    assert body.endswith(b"\n") or body == b""
    return [json.loads(line) for line in body.decode().splitlines()]


def test_streaming_whole_events():
    recorder = drive(StreamingReply, 200, [sse(EVENTS[:2]), sse(EVENTS[2:])])
    assert recorder.start["status"] == 200
    assert recorder.header(b"content-type") == b"application/x-ndjson"
    assert ndjson(recorder.body) == EXPECTED


def test_streaming_one_byte_at_a_time():
    data = sse(EVENTS)
    recorder = drive(StreamingReply, 200, [data[i : i + 1] for i in range(len(data))])
    assert ndjson(recorder.body) == EXPECTED


@settings(max_examples=50, deadline=None)
@given(st.lists(st.integers(min_value=0, max_value=2000), max_size=30))
def test_streaming_any_chunk_boundaries(cuts):
    data = sse(EVENTS)
    recorder = drive(StreamingReply, 200, split(data, cuts))
    assert ndjson(recorder.body) == EXPECTED
    # Each sent body holds whole lines only.
    for message in recorder.bodies:
        assert message["body"] == b"" or message["body"].endswith(b"\n")


def test_streaming_done_and_empty_events_ignored():
    data = b"data: [DONE]\n\n" + b"\n\n" + sse(EVENTS[:1])
    recorder = drive(StreamingReply, 200, [data])
    assert ndjson(recorder.body) == EXPECTED[:1]


def test_streaming_data_prefix_without_space():
    data = b'data:{"choices": [{"index": 0, "text": "!"}]}\n\n'
    recorder = drive(StreamingReply, 200, [data, b""])
    assert ndjson(recorder.body) == [{"text": [PROMPT + "!"]}]


def test_streaming_only_done():
    recorder = drive(StreamingReply, 200, [b"data: [DONE]\n\n"])
    assert recorder.body == b""
    assert recorder.start["status"] == 200


@pytest.mark.parametrize("status", [400, 500])
def test_streaming_error_is_a_json_answer(status):
    error = {"error": {"message": "too long", "code": status}}
    payload = json.dumps(error).encode()
    recorder = drive(StreamingReply, status, [payload[:7], payload[7:]])
    assert recorder.start["status"] == status
    assert recorder.header(b"content-type") == b"application/json"
    assert json.loads(recorder.body) == error


# --- request translation -----------------------------------------------------


def test_to_completion_request():
    payload = {"prompt": "hi", "max_tokens": 5, "temperature": 0}
    request = to_completion_request(payload)
    assert request == {
        "prompt": "hi",
        "max_tokens": 5,
        "temperature": 0,
        "stream": False,
    }
    assert "stream" not in payload
    assert to_completion_request({"prompt": "", "stream": 1})["stream"] is True


@pytest.mark.parametrize(
    "payload", [{}, {"prompt": ["a"]}, {"prompt": [1, 2]}, {"prompt": None}]
)
def test_to_completion_request_needs_string_prompt(payload):
    with pytest.raises(ValueError, match="prompt"):
        to_completion_request(payload)


@pytest.mark.parametrize("payload", [[["prompt", "hi"]], "hi", None, 3])
def test_to_completion_request_needs_an_object(payload):
    with pytest.raises(ValueError, match="JSON object"):
        to_completion_request(payload)


@pytest.mark.parametrize("reply_cls", [BufferedReply, StreamingReply])
def test_non_json_error_body_passes_through(reply_cls):
    recorder = drive(reply_cls, 500, [b"Internal Server Error"])
    assert recorder.start["status"] == 500


# --- through the middleware --------------------------------------------------

FORM = [(b"content-type", b"application/x-www-form-urlencoded")]


@pytest.fixture(params=["producer", "consumer"])
def node(request, monkeypatch):
    use_node(monkeypatch, PRODUCER if request.param == "producer" else CONSUMER)
    app = FakeVLLM(answer=json.loads(completion({0: " there"})))
    return PDServeMiddleware(app), app


@pytest.mark.parametrize("headers", [FORM, [], [(b"content-type", b"text/plain")]])
def test_curl_style_generate_reaches_vllm_as_json(node, headers):
    # curl -d '{"prompt": "hi", "max_tokens": 5}' http://host/generate
    mw, app = node
    body = b'{"prompt": "hi", "max_tokens": 5, "n": 2}'
    answer = run(call(mw, "POST", "/generate", body, headers))
    assert answer.status == 200
    assert answer.json() == {"text": ["hi there"]}
    [seen] = app.seen
    assert seen.path == "/v1/completions"
    assert seen.headers[b"content-type"] == b"application/json"
    assert seen.count(b"content-type") == seen.count(b"content-length") == 1
    assert seen.json() == {"prompt": "hi", "max_tokens": 5, "n": 2, "stream": False}


@pytest.mark.parametrize(
    "body", [b"prompt=hi", b"[]", b'["prompt", "hi"]', b'[["prompt", "hi"]]']
)
def test_generate_needs_a_json_object(node, body):
    mw, app = node
    answer = run(call(mw, "POST", "/generate", body, FORM))
    assert answer.status == 400
    assert app.seen == []


def test_consumer_generate_drops_client_kv_params(monkeypatch):
    use_node(monkeypatch, CONSUMER)
    app = FakeVLLM(answer=json.loads(completion({0: "!"})))
    body = {"prompt": "hi", "n": 2, "kv_transfer_params": {"do_remote_prefill": True}}
    run(call(PDServeMiddleware(app), "POST", "/generate", json.dumps(body).encode()))
    assert "kv_transfer_params" not in app.seen[0].json()


@pytest.mark.parametrize("method", ["PUT", "PATCH"])
def test_only_post_is_the_legacy_api(monkeypatch, method):
    use_node(monkeypatch, CONSUMER)
    app = FakeVLLM(status=405)
    body = b'{"prompt": "hi"}'
    answer = run(call(PDServeMiddleware(app), method, "/generate", body))
    assert answer.status == 405
    assert (app.seen[0].path, app.seen[0].body) == ("/generate", body)


def test_generate_under_a_root_path(node):
    # vllm serve --root-path /api: routes match below it, and so does ours.
    mw, app = node
    body = b'{"prompt": "hi", "n": 2}'
    answer = run(call(mw, "POST", "/api/generate", body, FORM, root_path="/api"))
    assert answer.status == 200
    assert app.seen[0].path == "/api/v1/completions"
