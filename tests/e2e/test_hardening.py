"""Hostile input at the HTTP layer (issue 18), on real servers.

Its own two servers, both with ``--api-key``, no KV secret: a consumer
started while nothing listens on its producer's port (it starts, prefills
locally, says so in /health and the log), then a producer started on that
port (picked up: later requests prefilled there). On them: every producer
route but /health and /metrics needs the key (vLLM's /invocations too), the
key is checked before a body is read, and bodies over the limit are a 413.

On the session cluster (its producer has a KV secret, no key): a producer
leases KV only for a request a consumer proved it sent (a client's
``do_remote_decode`` gets none; a replayed proof a 403), and ids a client
chose never reach the producer."""

from __future__ import annotations

import json
import socket
import threading
from urllib.parse import urlparse

import pytest
import requests

from pdserve.lease import Lease
from pdserve.local_cluster import ServerProcess, free_port
from pdserve.request_proof import body_digest, make_proof, proof_key
from tests.e2e.conftest import (
    ALWAYS_REMOTE,
    CONSUMER_MAX_LEN,
    KV_SECRET,
    PRODUCER_MAX_LEN,
    consumer_env,
    engine_args,
    producer_env,
    random_prompt,
)
from tests.e2e.helpers import (
    RemotePath,
    completion_tokens,
    greedy,
    metric,
    post,
    wait_idle,
)
from tests.eventually import eventually

KEY = "sk-e2e-hardening-7d21"
AUTH = {"Authorization": f"Bearer {KEY}"}
# Small, so that an oversize chunked body is quick to send.
BODY_LIMIT = 1 << 20
LEASE_ASKED = {"kv_transfer_params": {"do_remote_decode": True}}


class Hardened:
    """The module's consumer, and its producer once started."""

    def __init__(self, model: str, log_dir, baseline: ServerProcess) -> None:
        self.model = model
        self.log_dir = log_dir
        self.baseline = baseline
        self.producer_port = free_port()  # nothing listens there yet
        self.consumer = ServerProcess.pdserve(
            "consumer-hardened",
            ["--model", model, "--kv-role", "consumer", "--api-key", KEY]
            + ["--producer-url", f"http://127.0.0.1:{self.producer_port}"]
            + ["--producer-connect-timeout", "2"]
            + ["--max-request-body-bytes", str(BODY_LIMIT)]
            + ALWAYS_REMOTE
            + engine_args(model, CONSUMER_MAX_LEN),
            log_dir,
            env=consumer_env(),
        )
        self.producer: ServerProcess | None = None

    def start_producer(self) -> ServerProcess:
        if self.producer is None:
            self.producer = ServerProcess.pdserve(
                "producer-hardened",
                ["--model", self.model, "--kv-role", "producer", "--api-key", KEY]
                + ["--max-request-body-bytes", str(BODY_LIMIT)]
                + engine_args(self.model, PRODUCER_MAX_LEN),
                self.log_dir,
                env=producer_env(),
                port=self.producer_port,
            )
            self.producer.wait_ready()
        return self.producer

    def stop(self) -> None:
        for server in (self.producer, self.consumer):
            if server is not None:
                server.stop()


@pytest.fixture(scope="module")
def hardened(cluster):
    servers = Hardened(cluster.model, cluster.log_dir, cluster.baseline)
    try:
        servers.consumer.wait_ready()
        yield servers
    finally:
        servers.stop()


def health(server: ServerProcess) -> dict:
    response = requests.get(server.url + "/health", timeout=30)
    assert response.status_code == 200
    return response.json()


def keyed_tokens(url: str, body: dict) -> list[int]:
    response = post(url, "/v1/completions", body, headers=AUTH)
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["token_ids"]


def local_prefills(url: str, reason: str) -> float:
    return metric(url, "pdserve:local_prefills_total", reason=reason)


# --- 15: a consumer starts while its producers are down ----------------------


def test_consumer_starts_without_producers_and_picks_one_up(hardened):
    consumer = hardened.consumer
    assert "starting without one" in consumer.log_path.read_text(errors="replace")
    assert health(consumer) == {
        "producers_known": 0,
        "producers_usable": 0,
        "remote_prefill": False,
    }
    body = greedy(random_prompt(40, 1801))
    expected = completion_tokens(hardened.baseline.url, body)
    before = local_prefills(consumer.url, "no_producer")
    assert keyed_tokens(consumer.url, body) == expected
    assert local_prefills(consumer.url, "no_producer") == before + 1

    hardened.start_producer()
    eventually(  # names are looked up every 5 s
        lambda: health(consumer)["remote_prefill"],
        60,
        "the producer to be picked up",
        interval=0.5,
    )
    assert health(consumer) == {
        "producers_known": 1,
        "producers_usable": 1,
        "remote_prefill": True,
    }
    later = greedy(random_prompt(40, 1802))
    with RemotePath(consumer.url, 1):
        assert keyed_tokens(consumer.url, later) == completion_tokens(
            hardened.baseline.url, later
        )


# --- 1: every producer route behind its key ----------------------------------


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("POST", "/invocations"),
        ("POST", "/v1/completions"),
        ("POST", "/tokenize"),
        ("GET", "/v1/models"),
        ("GET", "/pdserve/metadata"),
        ("GET", "/version"),
    ],
)
def test_producer_routes_need_the_key(hardened, method, path):
    producer = hardened.start_producer()
    body = dict(greedy("Hello", 2), **LEASE_ASKED)
    response = requests.request(method, producer.url + path, json=body, timeout=30)
    assert response.status_code == 401, response.text
    wrong = {"Authorization": "Bearer sk-wrong"}
    response = requests.request(
        method, producer.url + path, json=body, headers=wrong, timeout=30
    )
    assert response.status_code == 401, response.text


def test_producer_health_and_metrics_need_no_key(hardened):
    producer = hardened.start_producer()
    for path in ("/health", "/metrics"):
        assert requests.get(producer.url + path, timeout=30).status_code == 200


def test_invocations_with_the_key_answer(hardened):
    producer = hardened.start_producer()
    body = greedy(random_prompt(20, 1803), 3)
    response = post(producer.url, "/invocations", body, headers=AUTH)
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["token_ids"] == completion_tokens(
        hardened.baseline.url, body
    )


# --- 6: the key before the body; bodies over the limit ------------------------


def raw_post(
    url: str, headers: dict[str, str], chunks: list[bytes] = ()
) -> tuple[int, bytes]:
    """Status and body of a POST /v1/completions whose head is sent first
    and whose body (if any) is sent by another thread meanwhile."""
    parsed = urlparse(url)
    head = f"POST /v1/completions HTTP/1.1\r\nHost: {parsed.netloc}\r\n"
    head += "".join(f"{k}: {v}\r\n" for k, v in headers.items()) + "\r\n"
    with socket.create_connection((parsed.hostname, parsed.port), timeout=30) as conn:
        conn.sendall(head.encode())

        def send_body() -> None:
            try:
                for chunk in chunks:
                    conn.sendall(chunk)
            except OSError:
                pass  # the server answered and closed first

        sender = threading.Thread(target=send_body, daemon=True)
        sender.start()
        answer = conn.makefile("rb")
        status = int(answer.readline().split()[1])
        length = 0
        while (line := answer.readline().strip()) != b"":
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        body = answer.read(length)
        sender.join(timeout=30)
    return status, body


HUGE = {"Content-Type": "application/json", "Content-Length": str(100 * 2**30)}


@pytest.mark.parametrize("node", ["consumer", "producer"])
def test_unauthenticated_huge_body_is_refused_unread(hardened, node):
    server = hardened.consumer if node == "consumer" else hardened.start_producer()
    # 100 GiB declared, not a byte of it sent: answered at once.
    assert raw_post(server.url, HUGE)[0] == 401
    assert raw_post(server.url, HUGE | {"Authorization": "Bearer nope"})[0] == 401
    status, answer = raw_post(server.url, HUGE | AUTH)
    assert status == 413
    assert f"larger than {BODY_LIMIT} bytes" in json.loads(answer)["error"]


def chunked(total: int, size: int = 1 << 16) -> list[bytes]:
    chunks = [b"%x\r\n" % size + b" " * size + b"\r\n" for _ in range(total // size)]
    return [*chunks, b"0\r\n\r\n"]


@pytest.mark.parametrize("node", ["consumer", "producer"])
def test_oversize_bodies_are_413(hardened, node):
    server = hardened.consumer if node == "consumer" else hardened.start_producer()
    declared = {"Content-Type": "application/json", "Content-Length": "1048577"}
    assert raw_post(server.url, declared | AUTH)[0] == 413
    # No length declared: counted while read.
    streamed = {"Content-Type": "application/json", "Transfer-Encoding": "chunked"}
    oversize = chunked(BODY_LIMIT + (1 << 16))
    assert raw_post(server.url, streamed | AUTH, oversize)[0] == 413
    # Both nodes still serve.
    body = greedy(random_prompt(20, 1804), 2)
    assert keyed_tokens(server.url, body) == completion_tokens(
        hardened.baseline.url, body
    )


# --- 1: a lease only with a consumer's proof (session producer: KV secret) ----


@pytest.mark.parametrize("path", ["/v1/completions", "/invocations"])
def test_client_cannot_get_a_lease(cluster, path):
    body = dict(greedy(random_prompt(64, 1805), 2), **LEASE_ASKED)
    response = post(cluster.producer.url, path, body)
    assert response.status_code == 200, response.text
    assert Lease.from_params(response.json().get("kv_transfer_params")) is None
    # Nothing pinned: a lease would hold its blocks for 30 s.
    assert wait_idle(cluster.producer.url, timeout=5) == (0, 0, 0)


def proof_headers(body: bytes, secret: str = KV_SECRET) -> dict[str, str]:
    key = proof_key(secret.encode())
    proof = make_proof(key, "POST", "/v1/completions", body_digest(body))
    return {"content-type": "application/json", "x-pdserve-proof": proof}


def test_proofs_are_checked_and_used_once(cluster):
    # vLLM refuses this body (n is no number) after the proof is checked:
    # no prefill, no lease, whatever the proof.
    body = json.dumps({"prompt": "hi", "n": "x", **LEASE_ASKED}).encode()
    headers = proof_headers(body)
    first = post(cluster.producer.url, "/v1/completions", body, headers=headers)
    assert first.status_code == 400, first.text  # proof accepted, vLLM's 400
    again = post(cluster.producer.url, "/v1/completions", body, headers=headers)
    assert again.status_code == 403 and "replayed" in again.text
    forged = proof_headers(body, secret="not-the-secret")
    wrong = post(cluster.producer.url, "/v1/completions", body, headers=forged)
    assert wrong.status_code == 403 and "MAC" in wrong.text


# --- 2: ids a client chose stay on the consumer --------------------------------


def test_client_request_ids_stay_on_the_consumer(cluster):
    body = dict(greedy(random_prompt(48, 1806), 6), request_id="r" * 300)
    expected = completion_tokens(cluster.baseline.url, greedy(body["prompt"], 6))
    released = metric(cluster.producer.url, "pdserve:kv_leases_released_total")
    expired = metric(cluster.producer.url, "pdserve:kv_leases_expired_total")
    with RemotePath(cluster.consumer.url, 1):
        response = post(
            cluster.consumer.url,
            "/v1/completions",
            body,
            headers={"X-Request-Id": "x" * 300},
        )
        assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["token_ids"] == expected
    # The consumer's own vLLM took the client's id, as vLLM does.
    assert "x" * 300 in response.json()["id"]
    producer = cluster.producer.url
    eventually(
        lambda: metric(producer, "pdserve:kv_leases_released_total") != released,
        10,
        "the producer's lease to be released",
        interval=0.2,
    )
    assert metric(cluster.producer.url, "pdserve:kv_leases_expired_total") == expired


# --- 15: beam search is prefilled here ------------------------------------------


def test_beam_search_is_prefilled_locally(cluster):
    body = dict(greedy(random_prompt(30, 1807), 3), use_beam_search=True)
    before = local_prefills(cluster.consumer.url, "beam_search")
    remote = metric(cluster.consumer.url, "pdserve:remote_prefills_total")
    response = post(cluster.consumer.url, "/v1/completions", body)
    assert response.status_code == 200, response.text
    assert local_prefills(cluster.consumer.url, "beam_search") == before + 1
    assert metric(cluster.consumer.url, "pdserve:remote_prefills_total") == remote
