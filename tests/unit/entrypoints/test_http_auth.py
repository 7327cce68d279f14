"""vLLM's --api-key guards pdserve's own routes and is checked before the
consumer contacts its producer, decided exactly as vLLM decides it."""

from __future__ import annotations

import json

import msgspec
import pytest
from starlette.datastructures import Headers

from pdserve.entrypoints.auth import authorized
from pdserve.entrypoints.middleware import PDServeMiddleware
from pdserve.frontend.producer_metadata import METADATA_PATH
from pdserve.settings import ENV_VAR
from tests.unit.http_fakes import (
    CONSUMER,
    PRODUCER,
    FakeVLLM,
    app_state,
    call,
    fake_producer,
    make_lease,
    run,
    use_node,
)

try:  # vLLM 0.32
    from vllm.entrypoints.serve.middleware.authenticate import (
        AuthenticationMiddleware,
    )
except ImportError:  # vLLM 0.25
    from vllm.entrypoints.serve.utils.server_utils import AuthenticationMiddleware

KEY = "sk-test-1"
COMPLETION = json.dumps({"prompt": "Hello", "max_tokens": 2}).encode()


def bearer(value: str) -> list[tuple[bytes, bytes]]:
    return [
        (b"content-type", b"application/json"),
        (b"authorization", value.encode("latin-1")),
    ]


def scope_with(headers: list[tuple[bytes, bytes]], keys: list[str] | None) -> dict:
    return {"headers": headers, "app": app_state(api_key=keys)}


@pytest.mark.parametrize(
    "header",
    [
        None,
        f"Bearer {KEY}",
        f"bearer {KEY}",
        f"BEARER {KEY}",
        f"Bearer  {KEY}",
        f"Bearer {KEY} ",
        f"Basic {KEY}",
        KEY,
        f"Bearer {KEY}x",
        "Bearer sk-other",
        "Bearer ",
        "Bearer é",
    ],
)
@pytest.mark.parametrize("keys", [[KEY], ["sk-other", KEY], ["sk-other"]])
def test_same_decision_as_vllm(header, keys):
    headers = [] if header is None else [(b"authorization", header.encode("latin-1"))]
    vllm = AuthenticationMiddleware(app=None, tokens=keys)
    expected = vllm.verify_token(Headers(raw=headers))
    assert authorized(scope_with(headers, keys)) is expected


def test_no_keys_means_open(monkeypatch):
    monkeypatch.delenv("VLLM_API_KEY", raising=False)
    assert authorized(scope_with([], None))
    assert authorized(scope_with([], []))


def test_env_key_when_no_flag(monkeypatch):
    monkeypatch.setenv("VLLM_API_KEY", KEY)
    assert not authorized(scope_with([], None))
    assert authorized(scope_with(bearer(f"Bearer {KEY}"), None))


def test_flag_wins_over_env(monkeypatch):
    monkeypatch.setenv("VLLM_API_KEY", "sk-env")
    assert not authorized(scope_with(bearer("Bearer sk-env"), [KEY]))
    assert authorized(scope_with(bearer(f"Bearer {KEY}"), [KEY]))


def test_first_authorization_header_counts():
    headers = [
        (b"authorization", b"Bearer wrong"),
        (b"authorization", f"Bearer {KEY}".encode()),
    ]
    assert not authorized(scope_with(headers, [KEY]))


# --- routes ------------------------------------------------------------------


@pytest.fixture(params=["producer", "consumer"])
def node(request, monkeypatch):
    use_node(monkeypatch, PRODUCER if request.param == "producer" else CONSUMER)
    app = FakeVLLM()
    return PDServeMiddleware(app), app


@pytest.mark.parametrize(
    ("headers", "status"),
    [([], 401), (bearer("Bearer nope"), 401), (bearer(f"Bearer {KEY}"), 200)],
)
def test_metadata_needs_the_key(node, headers, status):
    mw, _ = node
    answer = run(call(mw, "GET", METADATA_PATH, b"", headers, app_state([KEY])))
    assert answer.status == status
    if status == 401:
        assert answer.json() == {"error": "Unauthorized"}
    else:
        assert answer.json()["model"] == "m"


def test_metadata_key_from_env(node, monkeypatch):
    mw, _ = node
    monkeypatch.setenv("VLLM_API_KEY", KEY)
    assert run(call(mw, "GET", METADATA_PATH, b"", [], app_state())).status == 401
    ok = run(call(mw, "GET", METADATA_PATH, b"", bearer(f"Bearer {KEY}")))
    assert ok.status == 200


def test_metadata_open_without_keys(node):
    mw, _ = node
    assert run(call(mw, "GET", METADATA_PATH, b"", [])).status == 200


def test_producer_metadata_has_instance_id(monkeypatch):
    use_node(monkeypatch, PRODUCER)
    answer = run(call(PDServeMiddleware(FakeVLLM()), "GET", METADATA_PATH, b"", []))
    assert answer.json()["instance_id"] == PRODUCER.instance_id == "e1"


@pytest.mark.parametrize("headers", [[], bearer("Bearer nope"), bearer("Basic x")])
def test_generate_needs_the_key(node, headers):
    mw, app = node
    body = json.dumps({"prompt": "hi", "max_tokens": 2}).encode()
    answer = run(call(mw, "POST", "/generate", body, headers, app_state([KEY])))
    assert answer.status == 401
    assert answer.json() == {"error": "Unauthorized"}
    assert app.seen == []


def test_generate_with_the_key(node):
    mw, app = node
    body = json.dumps({"prompt": "hi", "max_tokens": 2, "n": 2}).encode()
    headers = bearer(f"bearer {KEY}")
    answer = run(call(mw, "POST", "/generate", body, headers, app_state([KEY])))
    assert answer.status == 200
    assert app.seen[0].path == "/v1/completions"


def consumer_call(monkeypatch, headers, keys, path="/v1/completions", env_key=None):
    """A completion on a consumer whose producer leases; what each saw."""
    use_node(monkeypatch, CONSUMER)
    if env_key is not None:
        monkeypatch.setenv("VLLM_API_KEY", env_key)

    async def scenario():
        answer = {"kv_transfer_params": make_lease().to_params()}
        async with fake_producer(lambda _: answer) as producer:
            settings = msgspec.structs.replace(CONSUMER, producer_urls=[producer.url])
            monkeypatch.setenv(ENV_VAR, settings.to_json())
            app = FakeVLLM()
            mw = PDServeMiddleware(app)
            try:
                got = await call(mw, "POST", path, COMPLETION, headers, app_state(keys))
            finally:
                await mw.prefill.close()
            return got, producer, app

    return run(scenario())


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
@pytest.mark.parametrize("headers", [[], bearer("Bearer nope")])
def test_completion_without_key_never_reaches_the_producer(monkeypatch, path, headers):
    answer, producer, app = consumer_call(monkeypatch, headers, [KEY], path)
    assert answer.status == 401
    assert answer.json() == {"error": "Unauthorized"}
    assert producer.requests == []
    assert app.seen == []


def test_completion_without_env_key_never_reaches_the_producer(monkeypatch):
    answer, producer, app = consumer_call(monkeypatch, [], None, env_key=KEY)
    assert answer.status == 401
    assert producer.requests == []


@pytest.mark.parametrize("client_key", [KEY, "sk-second"])
def test_producer_is_called_with_this_nodes_own_key(monkeypatch, client_key):
    headers = bearer(f"Bearer {client_key}")
    answer, producer, app = consumer_call(monkeypatch, headers, [KEY, "sk-second"])
    assert answer.status == 200
    [(_, _, sent)] = producer.requests
    # This node's first key, whichever key the client used.
    assert {k.lower(): v for k, v in sent.items()}["authorization"] == f"Bearer {KEY}"
    # vLLM here still sees the client's own header.
    assert app.seen[0].headers[b"authorization"] == f"Bearer {client_key}".encode()


# --- the producer: every route behind its key ---------------------------------


class UnreadBody:
    """A receive that fails the test if the body is read at all."""

    def __init__(self) -> None:
        self.calls = 0

    async def __call__(self) -> dict:
        self.calls += 1
        raise AssertionError("the body was read")


async def call_unread(
    mw: PDServeMiddleware, method: str, path: str, headers, keys
) -> tuple[int, UnreadBody]:
    """A request declaring a huge body that is never sent."""
    scope = {
        "type": "http",
        "method": method,
        "path": path,
        "raw_path": path.encode(),
        "root_path": "",
        "query_string": b"",
        "headers": [*headers, (b"content-length", str(10**12).encode())],
        "app": app_state(keys),
    }
    receive = UnreadBody()
    starts = []

    async def send(message: dict) -> None:
        if message["type"] == "http.response.start":
            starts.append(message["status"])

    await mw(scope, receive, send)
    return starts[0], receive


PRODUCER_ROUTES = [
    ("POST", "/invocations"),
    ("POST", "/v1/completions"),
    ("POST", "/v1/chat/completions"),
    ("POST", "/tokenize"),
    ("POST", "/ping"),
    ("PUT", "/anything"),
    ("PATCH", "/v1/anything"),
    ("GET", "/v1/models"),
    ("GET", "/version"),
    ("GET", "/metrics/extra"),
    ("POST", "/health"),
    ("POST", "/metrics"),
    ("OPTIONS", "/v1/completions"),
    ("GET", METADATA_PATH),
]


@pytest.fixture
def producer(monkeypatch):
    use_node(monkeypatch, PRODUCER)
    app = FakeVLLM()
    return PDServeMiddleware(app), app


@pytest.mark.parametrize(("method", "path"), PRODUCER_ROUTES)
@pytest.mark.parametrize("headers", [[], bearer("Bearer nope")])
def test_every_producer_route_needs_its_key(producer, method, path, headers):
    mw, app = producer
    status, receive = run(call_unread(mw, method, path, headers, [KEY]))
    assert status == 401
    assert receive.calls == 0 and app.seen == []


@pytest.mark.parametrize(("method", "path"), PRODUCER_ROUTES)
def test_producer_routes_with_the_key(producer, method, path):
    mw, app = producer
    answer = run(
        call(mw, method, path, b"{}", bearer(f"Bearer {KEY}"), app_state([KEY]))
    )
    assert answer.status == 200


@pytest.mark.parametrize("path", ["/health", "/metrics"])
def test_producer_health_and_metrics_are_open(producer, path):
    mw, app = producer
    answer = run(call(mw, "GET", path, b"", [], app_state([KEY])))
    assert answer.status == 200
    assert [seen.path for seen in app.seen] == [path]


def test_producer_routes_open_without_a_key(producer):
    mw, app = producer
    assert run(call(mw, "POST", "/invocations", b"{}", [])).status == 200
    assert app.seen[0].path == "/invocations"


async def websocket(mw: PDServeMiddleware, headers, keys) -> list[dict]:
    scope = {
        "type": "websocket",
        "path": "/v1/realtime",
        "root_path": "",
        "headers": headers,
        "app": app_state(keys),
    }
    sent: list[dict] = []

    async def receive() -> dict:
        return {"type": "websocket.connect"}

    async def send(message: dict) -> None:
        sent.append(message)

    await mw(scope, receive, send)
    return sent


def test_producer_websockets_need_its_key(monkeypatch):
    use_node(monkeypatch, PRODUCER)
    reached = []

    async def app(scope, receive, send) -> None:
        reached.append(scope["path"])

    mw = PDServeMiddleware(app)
    closed = run(websocket(mw, [], [KEY]))
    assert closed == [{"type": "websocket.close", "code": 1008}] and reached == []
    assert run(websocket(mw, bearer(f"Bearer {KEY}"), [KEY])) == []
    assert reached == ["/v1/realtime"]


# --- the key before any body --------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("POST", "/v1/completions"),
        ("POST", "/tokenize"),
        ("POST", "/invocations"),
        ("PUT", "/x"),
        ("PATCH", "/x"),
        ("POST", "/generate"),
    ],
)
def test_no_body_is_read_before_the_key(node, method, path):
    mw, app = node
    status, receive = run(call_unread(mw, method, path, [], [KEY]))
    assert status == 401
    assert receive.calls == 0 and app.seen == []


def test_consumer_leaves_other_routes_to_vllm(monkeypatch):
    # GETs whose body pdserve does not read: vLLM's own check decides.
    use_node(monkeypatch, CONSUMER)
    app = FakeVLLM()
    mw = PDServeMiddleware(app)
    assert run(call(mw, "GET", "/v1/models", b"", [], app_state([KEY]))).status == 200
    assert [seen.path for seen in app.seen] == ["/v1/models"]
