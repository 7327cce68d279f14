"""Ports picked for a process that binds them later stay out of the range
outgoing connections take their local ports from."""

from __future__ import annotations

import socket
from pathlib import Path

from pdserve.ports import LOWEST, ephemeral_start, free_ports


class Scripted:
    """A random source that yields the given ports in order."""

    def __init__(self, ports: list[int]) -> None:
        self.ports = list(ports)

    def randrange(self, low: int, high: int) -> int:
        port = self.ports.pop(0)
        assert low <= port < high
        return port


def test_ports_are_below_the_ephemeral_range():
    ports = free_ports("127.0.0.1", 4, start=20000)
    assert len(set(ports)) == 4
    assert all(LOWEST <= p < 20000 for p in ports)
    for port in ports:
        socket.create_server(("127.0.0.1", port)).close()


def test_a_port_in_use_or_picked_already_is_passed_over():
    taken, first, second = free_ports("127.0.0.1", 3, start=20000)
    with socket.create_server(("127.0.0.1", taken)):
        script = Scripted([taken, first, first, second])
        assert free_ports("127.0.0.1", 2, start=20000, rng=script) == [first, second]


def test_kernel_ports_where_the_range_is_unknown(tmp_path: Path):
    assert ephemeral_start(tmp_path / "absent") is None
    (tmp_path / "range").write_text("garbage")
    assert ephemeral_start(tmp_path / "range") is None
    (tmp_path / "range").write_text("32768\t60999\n")
    assert ephemeral_start(tmp_path / "range") == 32768
    # No room below the range: the kernel's choice.
    ports = free_ports("127.0.0.1", 2, start=LOWEST)
    assert len(set(ports)) == 2
