"""tests/e2e/nginx.py against two tiny HTTP backends: round robin, POST
bodies, streaming passed through unbuffered, upstream keepalive."""

from __future__ import annotations

import http.client
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from tests.e2e.nginx import nginx_binary, start_nginx

pytestmark = pytest.mark.skipif(
    nginx_binary() is None,
    reason="nginx not installed: scripts/setup.sh installs it (root + apt-get)",
)


FIRST_RECEIVED = threading.Event()


def backend(name: str) -> ThreadingHTTPServer:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keepalive from nginx

        def log_message(self, *args) -> None:
            pass

        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["Content-Length"]))
            answer = f"{name}:{len(body)}:{self.client_address[1]}".encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(answer)))
            self.end_headers()
            self.wfile.write(answer)

        def do_GET(self) -> None:  # a stream: a chunk, then one more once
            # the client has the first (it can only, if nothing buffers it)
            self.send_response(200)
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for part in (b"first", b"second"):
                self.wfile.write(b"%x\r\n%s\r\n" % (len(part), part))
                self.wfile.flush()
                FIRST_RECEIVED.wait(30)
            self.wfile.write(b"0\r\n\r\n")

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


@pytest.fixture
def balanced(tmp_path):
    servers = [backend("a"), backend("b")]
    url, stop = start_nginx(
        [f"http://127.0.0.1:{s.server_port}" for s in servers], tmp_path / "logs"
    )
    yield url
    stop()
    for s in servers:
        s.shutdown()
        s.server_close()


def _client(url: str) -> http.client.HTTPConnection:
    host, port = url.removeprefix("http://").split(":")
    return http.client.HTTPConnection(host, int(port), timeout=10)


def test_round_robin_with_bodies_and_keepalive(balanced):
    client = _client(balanced)
    answers = []
    for _ in range(6):
        client.request("POST", "/v1/completions", body=b"x" * 100_000)
        answers.append(client.getresponse().read().decode().split(":"))
    assert sorted(name for name, _, _ in answers) == ["a"] * 3 + ["b"] * 3
    assert {size for _, size, _ in answers} == {"100000"}
    # Each backend saw one upstream connection, reused.
    for name in "ab":
        assert len({port for n, _, port in answers if n == name}) == 1


def test_streams_unbuffered(balanced):
    FIRST_RECEIVED.clear()
    client = _client(balanced)
    client.timeout = 10  # a buffering proxy never hands over the first part
    client.request("GET", "/stream")
    response = client.getresponse()
    assert response.read1() == b"first"
    FIRST_RECEIVED.set()
    assert response.read() == b"second"


def test_stop_ends_it(tmp_path):
    server = backend("a")
    url, stop = start_nginx([f"127.0.0.1:{server.server_port}"], tmp_path)
    stop()
    with pytest.raises(OSError):
        _client(url).request("GET", "/")
    server.shutdown()
    server.server_close()


def test_bad_config_reports_nginx_error(tmp_path):
    with pytest.raises(ValueError):
        start_nginx(["127.0.0.1"], tmp_path)
