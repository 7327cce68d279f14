"""nginx as the load balancer in front of several consumers (2P2D tests).

Consumers are stateless peers: any HTTP load balancer can spread clients
over them. nginx runs as a plain child process (``daemon off``) with a
generated config and every path it writes (pid, logs, temp) in its own
directories, so it needs no privileges and leaves nothing behind.
"""

from __future__ import annotations

import http.client
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlparse

from pdserve.local_cluster import free_port
from tests.eventually import eventually

READY_PATH = "/__nginx_ready"


def nginx_binary() -> str | None:
    """nginx's path; Debian puts it in /usr/sbin, often not on a user's PATH."""
    found = shutil.which("nginx")
    if found is None and os.access("/usr/sbin/nginx", os.X_OK):
        found = "/usr/sbin/nginx"
    return found


def _server(upstream: str) -> str:
    """host:port of an upstream given as a URL or as host:port."""
    parsed = urlparse(upstream if "://" in upstream else f"http://{upstream}")
    if parsed.hostname is None or parsed.port is None:
        raise ValueError(f"upstream needs a host and a port: {upstream!r}")
    host = f"[{parsed.hostname}]" if ":" in parsed.hostname else parsed.hostname
    return f"{host}:{parsed.port}"


def nginx_config(upstreams: list[str], port: int, run_dir: Path, log_dir: Path) -> str:
    servers = "\n".join(f"        server {_server(u)};" for u in upstreams)
    temp = "\n".join(
        f"    {kind}_temp_path {run_dir / kind};"
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    # As root, nginx would switch its workers to a user that may not exist
    # here; keep them as whoever runs the tests.
    user = f"user {pwd.getpwuid(os.geteuid()).pw_name};" if os.geteuid() == 0 else ""
    return f"""
{user}
daemon off;
worker_processes 1;
pid {run_dir / "nginx.pid"};
error_log {log_dir / "nginx-error.log"} info;
events {{ worker_connections 1024; }}
http {{
    access_log {log_dir / "nginx-access.log"};
{temp}
    upstream consumers {{
        # Round robin (nginx's default) over peers.
{servers}
        # HTTP/1.1 connections to the consumers, kept open between requests.
        keepalive 32;
    }}
    server {{
        listen 127.0.0.1:{port};
        # Prompts can be long: no body size limit, no body buffering.
        client_max_body_size 0;
        location = {READY_PATH} {{ return 200 "ok"; }}
        location / {{
            proxy_pass http://consumers;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host $host;
            # Streamed completions reach the client token by token.
            proxy_buffering off;
            proxy_request_buffering off;
            # A long prefill or generation is not a dead upstream.
            proxy_connect_timeout 10s;
            proxy_read_timeout 3600s;
            proxy_send_timeout 3600s;
        }}
    }}
}}
"""


def start_nginx(
    upstreams: list[str], log_dir: Path | str, timeout: float = 30.0
) -> tuple[str, Callable[[], None]]:
    """Start nginx balancing over ``upstreams``; returns (its URL, stop).

    Raises FileNotFoundError if nginx is not installed, RuntimeError if it
    exits while starting, AssertionError if it does not serve in time."""
    binary = nginx_binary()
    if binary is None:
        raise FileNotFoundError("nginx is not installed (scripts/setup.sh installs it)")
    if not upstreams:
        raise ValueError("start_nginx needs at least one upstream")
    log_dir = Path(log_dir)
    log_dir.mkdir(parents=True, exist_ok=True)
    run_dir = Path(tempfile.mkdtemp(prefix="pdserve-nginx-"))
    port = free_port()
    conf = run_dir / "nginx.conf"
    conf.write_text(nginx_config(upstreams, port, run_dir, log_dir))
    out = open(log_dir / "nginx.out", "ab")  # noqa: SIM115 - lives with the process
    # -e: the error log before the config is read (else /var/log/nginx).
    argv = [binary, "-p", str(run_dir), "-c", str(conf)]
    argv += ["-e", str(log_dir / "nginx-error.log")]
    process = subprocess.Popen(
        argv, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
    )

    def stop() -> None:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)  # fast shutdown
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        out.close()
        shutil.rmtree(run_dir, ignore_errors=True)

    def serving() -> bool:
        if process.poll() is not None:
            error = (log_dir / "nginx-error.log").read_text(errors="replace")[-2000:]
            raise RuntimeError(f"nginx exited with {process.returncode}:\n{error}")
        return _serves(port)

    try:
        eventually(serving, timeout, "nginx to serve", interval=0.05)
    except BaseException:
        stop()
        raise
    return f"http://127.0.0.1:{port}", stop


def _serves(port: int) -> bool:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=1)
    try:
        connection.request("GET", READY_PATH)
        return connection.getresponse().status == 200
    except OSError:
        return False
    finally:
        connection.close()
