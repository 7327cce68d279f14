"""Cores of a producer and a consumer sharing one machine."""

from __future__ import annotations

from unittest import mock

import pytest

from pdserve.local_cluster import split_cores


@pytest.mark.parametrize(
    ("cpus", "expected"),
    [
        (1, (None, None)),
        (2, ("1", "0")),
        (3, ("1-2", "0")),
        (4, ("2-3", "0-1")),
        (5, ("2-4", "0-1")),
    ],
)
def test_split_cores(cpus, expected):
    with mock.patch("os.cpu_count", return_value=cpus):
        assert split_cores() == expected


def test_scrape_by_label_reads_one_metric_by_its_label():
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from pdserve.local_cluster import scrape_by_label

    text = (
        b'pdserve:local_prefills_total{reason="short_prompt"} 2.0\n'
        b'pdserve:local_prefills_total{reason="prefix_cached"} 1.0\n'
        b'pdserve:remote_prefills_total{producer="10.0.0.1:80"} 5.0\n'
    )

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args) -> None:
            pass

        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Length", str(len(text)))
            self.end_headers()
            self.wfile.write(text)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_port}"
        got = scrape_by_label(url, "pdserve:local_prefills_total", "reason")
        assert got == {"short_prompt": 2.0, "prefix_cached": 1.0}
    finally:
        server.shutdown()
        server.server_close()
