"""The consumer's startup GET of the producer's metadata carries its API key
to the producer only, and says what to fix when the key is refused."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from pdserve.frontend.producer_metadata import fetch_metadata_once
from pdserve.incompatible import IncompatibleProducer

AUTH = {"Authorization": "Bearer sk-handshake"}


def serve(handler: type[BaseHTTPRequestHandler]) -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


class Quiet(BaseHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def elsewhere() -> Iterator[tuple[str, list[dict]]]:
    """Another server, recording the headers it is sent."""
    seen: list[dict] = []

    class Handler(Quiet):
        def do_GET(self) -> None:  # noqa: N802
            seen.append(dict(self.headers))
            self.send_response(200)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"{}")

    for url in serve(Handler):
        yield url, seen


def status_server(status: int, location: str = "") -> Iterator[str]:
    class Handler(Quiet):
        def do_GET(self) -> None:  # noqa: N802
            self.send_response(status)
            if location:
                self.send_header("Location", location)
            self.send_header("Content-Length", "0")
            self.end_headers()

    yield from serve(Handler)


@pytest.mark.parametrize("status", [301, 302, 307, 308])
def test_redirect_is_refused_and_the_key_stays_here(elsewhere, status):
    target, seen = elsewhere
    for url in status_server(status, target + "/pdserve/metadata"):
        with pytest.raises(IncompatibleProducer, match=f"HTTP {status}"):
            fetch_metadata_once(url, timeout=5, headers=AUTH)
    assert seen == []


@pytest.mark.parametrize("status", [401, 403])
def test_refused_key_says_what_to_fix(status):
    for url in status_server(status):
        with pytest.raises(IncompatibleProducer) as exc:
            fetch_metadata_once(url, timeout=5, headers=AUTH)
    message = str(exc.value)
    assert f"HTTP {status}" in message and "--api-key" in message
    assert "sk-handshake" not in message


def test_other_client_errors_have_no_key_hint():
    for url in status_server(404):
        with pytest.raises(IncompatibleProducer) as exc:
            fetch_metadata_once(url, timeout=5, headers=AUTH)
    assert "HTTP 404" in str(exc.value) and "--api-key" not in str(exc.value)
