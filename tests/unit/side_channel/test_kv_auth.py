"""The KV side channel's shared secret: a producer rank with a secret serves
only peers that prove it, refuses the others one connection at a time, and
both ends name the cause of a mismatch without revealing the secret. The
producer proves it too, and every frame and payload after the proofs is
tagged: a rogue producer or a relay can neither answer nor inject KV."""

from __future__ import annotations

import json
import logging
import socket
import threading

import pytest

from pdserve.entrypoints.api_server import export_kv_secret
from pdserve.entrypoints.cli_args import parse
from pdserve.entrypoints.middleware import node_metadata
from pdserve.incompatible import KVAuthError, check_kv_auth
from pdserve.settings import KV_SECRET_ENV_VAR, Settings, kv_secret
from pdserve.side_channel.client import (
    BlockingClient,
    LinkState,
    ProducerLink,
    prove,
    wait_for_rank_info,
)
from pdserve.side_channel.leases import LeaseTable
from pdserve.side_channel.protocol import (
    MAX_UNAUTHENTICATED_FRAME_BYTES,
    NONCE_BYTES,
    Ack,
    AuthProof,
    GetRankInfo,
    RankInfo,
    ServerHello,
    ServerProof,
    client_mac,
    recv_message,
    send_message,
    server_mac,
)
from pdserve.side_channel.server import AUTH_SECONDS, KVServer
from tests.unit.side_channel_fakes import (
    FakeClock,
    Session,
    blocks_equal,
    empty_like,
    link_to,
    load_of,
    make_lease,
    paged_kv,
    pump,
    rank_info_for,
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
    link.submit(load_of(lease, [5, 6], releasing_on=link))
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
        greeting = hello(conn)
        recorded, nonce = prove(SECRET, greeting.nonce)
        send_message(conn, recorded)
        expected = server_mac(SECRET, greeting.nonce, nonce)
        assert recv_message(conn) == ServerProof(expected)
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as conn:
        assert hello(conn).nonce != b""
        send_message(conn, recorded)
        assert recv_message(conn) == Ack(ok=False, error="KV secret rejected")
        assert closed(conn)


@pytest.mark.parametrize("nonce", [b"", b"n" * 16, b"n" * 64], ids=len)
def test_proof_with_a_client_nonce_of_another_length_refused(server, nonce):
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as conn:
        mac = client_mac(SECRET, hello(conn).nonce, nonce)
        send_message(conn, AuthProof(mac, nonce))
        assert recv_message(conn) == Ack(ok=False, error="KV secret rejected")
    assert serves_right_secret(server.port)


def test_server_proof_does_not_pass_for_a_client_proof():
    nonces = b"s" * NONCE_BYTES, b"c" * NONCE_BYTES
    assert client_mac(SECRET, *nonces) != server_mac(SECRET, *nonces)
    assert client_mac(SECRET, *nonces) != client_mac(b"other", *nonces)


def test_frames_without_their_tag_are_refused_after_the_proofs(server):
    """Someone who takes over a proven connection (it cannot make the tags)
    gets nothing: the connection closes, the server serves on."""
    with Session(server.port, SECRET) as session:
        send_message(session.sock, GetRankInfo())  # untagged
        assert closed(session.sock)
    with Session(server.port, SECRET) as session:
        session.send(GetRankInfo())
        assert isinstance(session.recv(), RankInfo)


def test_unauthenticated_peer_may_send_only_tiny_frames(server):
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as conn:
        hello(conn)
        length = MAX_UNAUTHENTICATED_FRAME_BYTES + 1
        conn.sendall(length.to_bytes(4, "big") + b"y" * 100)  # over the cap
        assert closed(conn)
    assert serves_right_secret(server.port)


def test_authentication_has_one_short_deadline(closing):
    """A peer that trickles bytes never finishes proving: the connection is
    closed once its one deadline passes, however active it is."""
    clock = FakeClock()
    kv_server = start_server(paged_kv(), secret=SECRET, clock=clock)
    closing(kv_server)
    with socket.create_connection(("127.0.0.1", kv_server.port), timeout=5) as c:
        hello(c)
        kv_server.step()
        for _ in range(3):
            c.sendall(b"\x00")  # part of a length prefix, never a frame
            clock.now += AUTH_SECONDS / 3 - 0.01
            kv_server.step()
            assert kv_server._conns
        clock.now += 0.05
        kv_server.step()
        assert not kv_server._conns
        assert closed(c)
    assert 1 <= AUTH_SECONDS <= 3  # a consumer proves within a round trip


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


# ---- the producer proves the secret too ----


class RogueProducer:
    """Listens like a producer rank but knows no secret: it greets, takes
    any proof and answers ``reply``, then serves rank info to anyone."""

    def __init__(self, reply) -> None:
        self.reply = reply
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.proofs = 0
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            with conn:
                try:
                    send_message(conn, ServerHello(auth=True, nonce=b"n" * NONCE_BYTES))
                    recv_message(conn)
                    self.proofs += 1
                    send_message(conn, self.reply)
                    recv_message(conn)
                    send_message(conn, rank_info_for(paged_kv()))
                except OSError:
                    pass

    def close(self) -> None:
        self.listener.close()


@pytest.mark.parametrize(
    "reply",
    [Ack(ok=True), ServerProof(b"x" * 32), ServerProof(b"")],
    ids=["plain-ack", "forged-proof", "empty-proof"],
)
def test_consumer_refuses_a_producer_that_cannot_prove_the_secret(closing, reply):
    rogue = RogueProducer(reply)
    closing(rogue)
    with pytest.raises(KVAuthError, match="did not prove the KV secret"):
        client(rogue.port, SECRET).rank_info()

    mine = empty_like(paged_kv())
    link = ProducerLink("127.0.0.1", rogue.port, mine, timeout=5, secret=SECRET)
    closing(link)
    link.submit(load_of(make_lease("req", [1, 2], rogue.port), [5, 6]))
    (load,) = pump(link, None, lambda f: len(f) == 1)
    assert "did not prove the KV secret" in load.error
    assert link.state == LinkState.IDLE
    assert rogue.proofs == 2
    assert not any(layer.any() for layer in mine.layers)


class Relay:
    """Passes bytes between a consumer and a producer rank; with
    ``flip_at``, flips the producer's byte at that offset of its stream."""

    def __init__(self, port: int, flip_at: int | None = None) -> None:
        self.upstream = port
        self.flip_at = flip_at
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                down, _ = self.listener.accept()
            except OSError:
                return
            up = socket.create_connection(("127.0.0.1", self.upstream))
            threading.Thread(
                target=self._copy, args=(down, up, None), daemon=True
            ).start()
            threading.Thread(
                target=self._copy, args=(up, down, self.flip_at), daemon=True
            ).start()

    @staticmethod
    def _copy(src: socket.socket, dst: socket.socket, flip_at: int | None) -> None:
        offset = 0
        try:
            while data := bytearray(src.recv(1 << 16)):
                if flip_at is not None and offset <= flip_at < offset + len(data):
                    data[flip_at - offset] ^= 0x01
                offset += len(data)
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self) -> None:
        self.listener.close()


def read_through(server: KVServer, relay: Relay, closing):
    mine = empty_like(server.kv)
    link = ProducerLink("127.0.0.1", relay.port, mine, timeout=5, secret=SECRET)
    closing(link)
    link.submit(load_of(make_lease("req", [1, 2], server.port), [5, 6]))
    (load,) = pump(link, server, lambda f: len(f) == 1)
    return load, mine


def test_a_relay_can_only_pass_bytes_through_unchanged(server, closing):
    relay = Relay(server.port)
    closing(relay)
    load, mine = read_through(server, relay, closing)
    assert load.error is None
    assert blocks_equal(server.kv, [1, 2], mine, [5, 6])


def test_a_changed_payload_byte_fails_the_load(server, closing):
    """The consumer notices at the payload's end frame: the load fails (its
    blocks are recomputed) and the connection closes."""
    relay = Relay(server.port, flip_at=1000)  # past the proofs, in the payload
    closing(relay)
    load, _ = read_through(server, relay, closing)
    assert "integrity" in load.error
    assert serves_right_secret(server.port)
