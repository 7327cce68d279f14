"""Free ports picked now for a process that binds them later.

A port is picked here and bound by another process seconds later (vLLM's
workers bind the producer's KV ports after loading the model; a test
cluster's servers their HTTP ports). A port the kernel handed out for
``bind(0)`` comes from its ephemeral range, the range every outgoing
connection meanwhile also takes its local port from: in CI one did, and
the producer failed to start ("Address already in use"). Ports below that
range are never handed out by the kernel, so only a process that picks
them the same way can take them.
"""

from __future__ import annotations

import random
import socket
from pathlib import Path

EPHEMERAL_RANGE = Path("/proc/sys/net/ipv4/ip_local_port_range")
# Picked from here up to the ephemeral range: above the well-known and most
# registered service ports.
LOWEST = 10000
# Candidates tried before settling for a kernel-chosen port.
TRIES = 200


def ephemeral_start(path: Path = EPHEMERAL_RANGE) -> int | None:
    """Where the kernel's ephemeral ports begin (None: not known here)."""
    try:
        return int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def free_ports(
    host: str,
    count: int,
    start: int | None = None,
    rng: random.Random | None = None,
) -> list[int]:
    """``count`` distinct ports on ``host`` nothing is bound to now, below
    the ephemeral range where it is known (``start``: its beginning, read
    from the kernel if None)."""
    start = ephemeral_start() if start is None else start
    rng = rng or random.SystemRandom()
    ports: list[int] = []
    if start is not None and start - LOWEST >= count:
        for _ in range(TRIES):
            if len(ports) == count:
                break
            port = rng.randrange(LOWEST, start)
            if port not in ports and bindable(host, port):
                ports.append(port)
    while len(ports) < count:
        port = kernel_port(host)
        if port not in ports:
            ports.append(port)
    return ports


def bindable(host: str, port: int) -> bool:
    try:
        with socket.create_server((host, port)):
            return True
    except OSError:
        return False


def kernel_port(host: str) -> int:
    with socket.create_server((host, 0)) as s:
        return s.getsockname()[1]
