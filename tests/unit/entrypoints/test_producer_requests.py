"""What reaches a producer's vLLM: never a client's kv_transfer_params;
``do_remote_decode`` (a lease: pinned KV) only for a request that asked for
it and may have it. With a KV secret: only with a consumer's proof (a wrong,
stale or replayed one is a 403). Without: any request that passed the key."""

from __future__ import annotations

import json

import pytest

from pdserve.entrypoints.middleware import PDServeMiddleware
from pdserve.request_proof import body_digest, make_proof, proof_key
from pdserve.settings import KV_SECRET_ENV_VAR
from tests.unit.http_fakes import PRODUCER, FakeVLLM, app_state, call, run, use_node

SECRET = "producer-test-secret"
ROUTE = "/v1/completions"
KEY = "sk-producer"
ASKING = {
    "prompt": "Hello",
    "max_tokens": 1,
    "kv_transfer_params": {"do_remote_decode": True},
    "vllm_xargs": {"kv_transfer_params": {"do_remote_decode": True}},
}
LEASE = {"do_remote_decode": True}


def producer(monkeypatch, secret: str | None) -> tuple[PDServeMiddleware, FakeVLLM]:
    use_node(monkeypatch, PRODUCER)
    if secret is None:
        monkeypatch.delenv(KV_SECRET_ENV_VAR, raising=False)
    else:
        monkeypatch.setenv(KV_SECRET_ENV_VAR, secret)
    app = FakeVLLM()
    return PDServeMiddleware(app), app


def proven(body: bytes, route: str = ROUTE, secret: str = SECRET) -> tuple:
    proof = make_proof(proof_key(secret.encode()), "POST", route, body_digest(body))
    return (b"x-pdserve-proof", proof.encode())


def send(mw, body: bytes, *extra, route: str = ROUTE, keys=None):
    headers = [(b"content-type", b"application/json"), *extra]
    return run(call(mw, "POST", route, body, headers, app_state(keys)))


def forwarded(app: FakeVLLM) -> dict:
    [seen] = app.seen
    return seen.json()


def test_proven_request_gets_exactly_do_remote_decode(monkeypatch):
    mw, app = producer(monkeypatch, SECRET)
    body = json.dumps(ASKING).encode()
    assert send(mw, body, proven(body)).status == 200
    got = forwarded(app)
    assert got["kv_transfer_params"] == LEASE
    assert got["vllm_xargs"] == {}  # nested ones never pass


@pytest.mark.parametrize("route", [ROUTE, "/invocations", "/v1/chat/completions"])
def test_without_proof_no_lease(monkeypatch, route):
    mw, app = producer(monkeypatch, SECRET)
    assert send(mw, json.dumps(ASKING).encode(), route=route).status == 200
    got = forwarded(app)
    assert "kv_transfer_params" not in got and got["vllm_xargs"] == {}
    assert got["prompt"] == "Hello"


def test_proof_does_not_ask_by_itself(monkeypatch):
    # A proven body that did not ask for a lease does not get one.
    mw, app = producer(monkeypatch, SECRET)
    body = json.dumps({"prompt": "Hello"}).encode()
    assert send(mw, body, proven(body)).status == 200
    assert forwarded(app) == {"prompt": "Hello"}


@pytest.mark.parametrize(
    "header",
    [
        lambda body: proven(body, secret="another secret"),
        lambda body: proven(body, route="/invocations"),
        lambda body: proven(body + b" "),
        lambda body: (b"x-pdserve-proof", b"v1:0:" + b"0" * 32 + b":" + b"0" * 64),
        lambda body: (b"x-pdserve-proof", b"made up"),
    ],
    ids=["other-secret", "other-route", "other-body", "stale", "malformed"],
)
def test_a_proof_that_does_not_hold_is_refused(monkeypatch, header):
    mw, app = producer(monkeypatch, SECRET)
    body = json.dumps(ASKING).encode()
    answer = send(mw, body, header(body))
    assert answer.status == 403
    assert answer.json()["error"].startswith("pdserve proof:")
    assert app.seen == []


def test_a_replayed_proof_is_refused(monkeypatch):
    mw, app = producer(monkeypatch, SECRET)
    body = json.dumps(ASKING).encode()
    header = proven(body)
    assert send(mw, body, header).status == 200
    answer = send(mw, body, header)
    assert answer.status == 403 and "replayed" in answer.json()["error"]
    assert len(app.seen) == 1


def test_without_secret_a_request_that_passed_the_key_may_lease(monkeypatch):
    mw, app = producer(monkeypatch, None)
    authorized = (b"authorization", f"Bearer {KEY}".encode())
    assert send(mw, json.dumps(ASKING).encode(), authorized, keys=[KEY]).status == 200
    assert forwarded(app)["kv_transfer_params"] == LEASE
    assert forwarded(app)["vllm_xargs"] == {}


def test_without_key_or_secret_anyone_may_lease(monkeypatch):
    mw, app = producer(monkeypatch, None)
    assert send(mw, json.dumps(ASKING).encode()).status == 200
    assert forwarded(app)["kv_transfer_params"] == LEASE


@pytest.mark.parametrize(
    "params",
    [
        {"do_remote_decode": "yes"},
        {"do_remote_prefill": True, "pdserve_lease": {"request_id": "x"}},
        [{"do_remote_decode": True}],
        None,
    ],
)
def test_anything_but_a_lease_request_is_removed(monkeypatch, params):
    mw, app = producer(monkeypatch, None)
    body = json.dumps({"prompt": "Hello", "kv_transfer_params": params}).encode()
    assert send(mw, body).status == 200
    assert forwarded(app) == {"prompt": "Hello"}


def test_untouched_body_is_forwarded_byte_for_byte(monkeypatch):
    mw, app = producer(monkeypatch, SECRET)
    body = b'{"prompt":  "Hello"}'
    assert send(mw, body).status == 200
    assert app.seen[0].body == body


def test_non_json_bodies_pass_unchanged(monkeypatch):
    mw, app = producer(monkeypatch, SECRET)
    body = b"--boundary\r\nnot json"
    assert send(mw, body, route="/v1/audio/transcriptions").status == 200
    assert app.seen[0].body == body
