"""KV transports, one file each, behind ``KVTransport``; and which to use."""

from __future__ import annotations

import socket
from pathlib import Path

from pdserve.log import init_logger
from pdserve.side_channel.protocol import RankInfo
from pdserve.transport.base import KVTransport, TransportUnavailable
from pdserve.transport.devices import device_pci_bus_id, device_uuid, local_index_of
from pdserve.transport.tcp import TcpTransport

logger = init_logger(__name__)

TRANSPORT_NAMES = ("tcp", "ipc", "nccl")
CHOICES = ("auto", *TRANSPORT_NAMES)
NO_SECRET_NO_GPU_DIRECT = (
    "pdserve: KV moves over tcp: the GPU-direct transports (ipc, nccl) hand a "
    "peer the producer's KV memory or hold its GPU, so producers serve them "
    "only to peers that proved a KV secret; give both nodes the same "
    "--kv-secret (or PDSERVE_KV_SECRET) to use them"
)
_told_no_secret = False

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


def candidates(
    requested: str, local: RankInfo, remote: RankInfo, *, has_secret: bool
) -> list[str]:
    """Transports to try, best first; tcp always comes last as the fallback.
    ``auto`` skips ipc and nccl without a KV secret (producers refuse them)."""
    if requested != "auto":
        return [requested] if requested == "tcp" else [requested, "tcp"]
    if local.device != "cuda" or remote.device != "cuda":
        return ["tcp"]
    if not has_secret:
        _tell_no_secret()
        return ["tcp"]
    if peer_gpu_visible(local, remote):
        return ["ipc", "nccl", "tcp"]
    return ["nccl", "tcp"]


def _tell_no_secret() -> None:
    global _told_no_secret
    if not _told_no_secret:
        _told_no_secret = True
        logger.warning(NO_SECRET_NO_GPU_DIRECT)


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
