"""The KV side channel's shared secret: a producer rank with a secret serves
only peers that prove it, refuses the others one connection at a time, and
both ends name the cause of a mismatch without revealing the secret."""

from __future__ import annotations

import json
import logging
import socket
import time

import pytest

from pdserve.connector.kv_client import BlockingClient
from pdserve.connector.kv_server import (
    AUTH_SECONDS,
    NONCE_BYTES,
    KVServer,
)
from pdserve.connector.leases import LeaseTable
from pdserve.entrypoints.api_server import export_kv_secret
from pdserve.entrypoints.cli_args import parse
from pdserve.entrypoints.middleware import node_metadata
from pdserve.handshake import KVAuthError, check_kv_auth, wait_for_rank_info
from pdserve.protocol import (
    MAX_UNAUTHENTICATED_FRAME_BYTES,
    Ack,
    AuthProof,
    GetRankInfo,
    RankInfo,
    ServerHello,
    auth_mac,
    recv_message,
    send_message,
)
from pdserve.settings import KV_SECRET_ENV_VAR, Settings, kv_secret
from tests.unit.side_channel import (
    blocks_equal,
    empty_like,
    link_to,
    load_of,
    make_lease,
    paged_kv,
    pump,
    start_server,
)

SECRET = b"correct horse battery staple"


def serve(secret: bytes | None) -> KVServer:
    leases = LeaseTable(30)
    server = start_server(paged_kv(), leases, secret)
    lease = make_lease("req", [1, 2], server.port)
    leases.grant("req", lease.block_ids, lease.prompt_hash)
    return server


@pytest.fixture
def server():
    kv_server = serve(SECRET)
    yield kv_server
    kv_server.close()


@pytest.fixture
def open_server():
    kv_server = serve(None)
    yield kv_server
    kv_server.close()


def client(port: int, secret: bytes | None) -> BlockingClient:
    return BlockingClient("127.0.0.1", port, timeout=5, secret=secret)


def serves_right_secret(port: int) -> bool:
    return client(port, SECRET).rank_info().model == "m"


def test_right_secret_reads_and_releases(server):
    mine = empty_like(server.kv)
    link = link_to(server, mine, secret=SECRET)
    lease = make_lease("req", [1, 2], server.port)
    link.submit(load_of(lease, [5, 6]))
    (load,) = pump(link, server, lambda f: len(f) == 1)
    assert load.error is None
    assert load.nbytes == 2 * server.kv.bytes_per_block()
    assert blocks_equal(server.kv, [1, 2], mine, [5, 6])
    pump(link, server, lambda _: server.leases.take_released() == 1)
    link.close()


def test_link_with_wrong_secret_fails_its_loads(server):
    link = link_to(server, empty_like(server.kv), connect=False, secret=b"wrong")
    link.submit(load_of(make_lease("req", [1, 2], server.port), [5, 6]))
    (load,) = pump(link, server, lambda f: len(f) == 1)
    assert "KV secret rejected" in load.error
    assert serves_right_secret(server.port)
    link.close()


def test_client_without_secret_refused(server):
    with pytest.raises(KVAuthError, match="producer requires a KV secret"):
        client(server.port, None).rank_info()
    assert serves_right_secret(server.port)


def test_wrong_secret_refused(server):
    with pytest.raises(KVAuthError, match="KV secret rejected by producer"):
        client(server.port, b"wrong").rank_info()
    assert serves_right_secret(server.port)


def test_secret_against_open_producer_refused(open_server):
    with pytest.raises(KVAuthError, match="the producer has none"):
        client(open_server.port, SECRET).rank_info()


def test_refusal_is_not_retried_by_the_rank_handshake(server):
    # A TimeoutError here would mean the handshake retried until its deadline.
    with pytest.raises(KVAuthError, match="rejected"):
        wait_for_rank_info(client(server.port, b"wrong"), timeout=30)


def hello(conn: socket.socket) -> ServerHello:
    greeting = recv_message(conn)
    assert isinstance(greeting, ServerHello)
    return greeting


def closed(conn: socket.socket) -> bool:
    try:
        return conn.recv(1) == b""
    except ConnectionResetError:
        return True


def test_request_without_proof_gets_nothing(server):
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as conn:
        greeting = hello(conn)
        assert greeting.auth and len(greeting.nonce) == NONCE_BYTES
        send_message(conn, GetRankInfo())
        assert recv_message(conn) == Ack(ok=False, error="KV secret required")
        assert closed(conn)
    assert serves_right_secret(server.port)


def test_replayed_proof_refused(server):
    """A proof is bound to its connection's nonce: recording one is useless."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as conn:
        recorded = AuthProof(auth_mac(SECRET, hello(conn).nonce))
        send_message(conn, recorded)
        assert recv_message(conn) == Ack(ok=True)
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as conn:
        assert hello(conn).nonce != b""
        send_message(conn, recorded)
        assert recv_message(conn) == Ack(ok=False, error="KV secret rejected")
        assert closed(conn)


def test_unauthenticated_peer_may_send_only_tiny_frames(server):
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as conn:
        hello(conn)
        length = MAX_UNAUTHENTICATED_FRAME_BYTES + 1
        conn.sendall(length.to_bytes(4, "big") + b"y" * 100)  # over the cap
        assert closed(conn)
    assert serves_right_secret(server.port)


def test_authentication_has_one_deadline(server, monkeypatch):
    """A peer that trickles bytes never finishes proving: the connection is
    closed once its one deadline passes, however active it is."""
    import pdserve.connector.kv_server as kv_server

    monkeypatch.setattr(kv_server, "AUTH_SECONDS", 0.5)
    restarted = serve(SECRET)
    try:
        with socket.create_connection(("127.0.0.1", restarted.port), timeout=5) as c:
            hello(c)
            started = time.monotonic()
            gone = False
            while time.monotonic() - started < 5 and not gone:
                try:
                    c.sendall(b"\x00")  # part of a length prefix, never a frame
                    time.sleep(0.1)
                except OSError:
                    gone = True
            assert gone or closed(c)
            assert time.monotonic() - started < 3
    finally:
        restarted.close()
    assert AUTH_SECONDS >= 1  # the module default stays sane


def test_refusal_logged_without_the_secret(server, caplog):
    wrong = b"a-wrong-secret"
    with caplog.at_level(logging.WARNING, logger="pdserve"):
        with pytest.raises(KVAuthError) as refused:
            client(server.port, wrong).rank_info()
        assert serves_right_secret(server.port)
    assert "wrong KV secret" in caplog.text
    for secret in (SECRET, wrong):
        assert secret.decode() not in caplog.text
        assert secret.decode() not in str(refused.value)


def test_open_producer_greets_without_nonce(open_server):
    with socket.create_connection(("127.0.0.1", open_server.port), timeout=5) as conn:
        assert hello(conn) == ServerHello(auth=False)
        send_message(conn, GetRankInfo())
        assert isinstance(recv_message(conn), RankInfo)


@pytest.mark.parametrize(
    ("has_secret", "producer_requires", "cause"),
    [
        (False, True, "producer requires a KV secret (--kv-secret / PDSERVE_KV_SE"),
        (True, False, "this consumer has a KV secret but the producer has none"),
    ],
)
def test_http_handshake_names_the_cause(has_secret, producer_requires, cause):
    with pytest.raises(KVAuthError) as refused:
        check_kv_auth(has_secret=has_secret, producer_requires=producer_requires)
    assert cause in str(refused.value)


@pytest.mark.parametrize("has_secret", [True, False])
def test_http_handshake_passes_when_both_agree(has_secret):
    check_kv_auth(has_secret=has_secret, producer_requires=has_secret)


def test_metadata_tells_auth_but_not_the_secret(monkeypatch):
    settings = Settings(role="producer", model="m", kv_ports=[1])
    monkeypatch.delenv(KV_SECRET_ENV_VAR, raising=False)
    assert node_metadata(settings)["kv_auth"] is False
    monkeypatch.setenv(KV_SECRET_ENV_VAR, SECRET.decode())
    metadata = node_metadata(settings)
    assert metadata["kv_auth"] is True
    assert SECRET.decode() not in json.dumps(metadata)


def test_flag_wins_over_environment(monkeypatch):
    monkeypatch.setenv(KV_SECRET_ENV_VAR, "from-env")
    args, rest = parse(["--model", "m", "--kv-role", "producer"])
    export_kv_secret(args)
    assert kv_secret() == b"from-env"
    args, rest = parse(["--model", "m", "--kv-role", "producer", "--kv-secret", "f"])
    assert "--kv-secret" not in rest and "f" not in rest  # never given to vLLM
    export_kv_secret(args)
    assert kv_secret() == b"f"


def test_secret_stays_out_of_settings(monkeypatch):
    # Settings travel in vLLM's --kv-transfer-config, which vLLM logs.
    monkeypatch.setenv(KV_SECRET_ENV_VAR, SECRET.decode())
    settings = Settings(role="consumer", model="m", producer_urls=["http://p:1"])
    assert SECRET.decode() not in settings.to_json()


def test_empty_secret_means_none(monkeypatch):
    monkeypatch.setenv(KV_SECRET_ENV_VAR, "")
    assert kv_secret() is None
