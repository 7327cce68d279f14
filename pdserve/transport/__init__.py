"""KV transports, one file each, behind ``KVTransport``; and which to use."""

from __future__ import annotations

import socket
from pathlib import Path

from pdserve.protocol import RankInfo
from pdserve.transport.base import KVTransport, TransportUnavailable
from pdserve.transport.devices import device_pci_bus_id, device_uuid, local_index_of
from pdserve.transport.tcp import TcpTransport

TRANSPORT_NAMES = ("tcp", "ipc", "nccl")
CHOICES = ("auto", *TRANSPORT_NAMES)

__all__ = [
    "KVTransport",
    "TransportUnavailable",
    "candidates",
    "device_pci_bus_id",
    "device_uuid",
    "get_transport",
    "host_identity",
]


def get_transport(name: str) -> KVTransport:
    """A new transport instance; GPU ones import their dependencies lazily."""
    if name == "tcp":
        return TcpTransport()
    if name == "ipc":
        from pdserve.transport.ipc import IpcTransport

        return IpcTransport()
    if name == "nccl":
        from pdserve.transport.nccl import NcclTransport

        return NcclTransport()
    raise ValueError(f"unknown KV transport {name!r}; known: {TRANSPORT_NAMES}")


def candidates(requested: str, local: RankInfo, remote: RankInfo) -> list[str]:
    """Transports to try, best first; tcp always comes last as the fallback."""
    if requested != "auto":
        return [requested] if requested == "tcp" else [requested, "tcp"]
    if local.device != "cuda" or remote.device != "cuda":
        return ["tcp"]
    if peer_gpu_visible(local, remote):
        return ["ipc", "nccl", "tcp"]
    return ["nccl", "tcp"]


def peer_gpu_visible(local: RankInfo, remote: RankInfo) -> bool:
    """Whether the remote rank's GPU is one we can see and tell apart for
    sure: a wrong guess would map another process's memory (ipc)."""
    if not local.host_id or local.host_id != remote.host_id:
        return False
    if not (local.device_uuid and local.device_pci_bus_id):
        return False
    return local_index_of(remote.device_uuid, remote.device_pci_bus_id) is not None


def host_identity() -> str:
    """Same on two processes exactly when they share a machine (and its GPUs)."""
    boot = Path("/proc/sys/kernel/random/boot_id")
    boot_id = boot.read_text().strip() if boot.exists() else ""
    return f"{socket.gethostname()}/{boot_id}"
