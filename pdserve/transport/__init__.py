"""KV transports, one file each, behind ``KVTransport``; and which to use."""

from __future__ import annotations

import socket
from pathlib import Path

import torch

from pdserve.protocol import RankInfo
from pdserve.transport.base import KVTransport, TransportUnavailable
from pdserve.transport.tcp import TcpTransport

TRANSPORT_NAMES = ("tcp", "ipc", "nccl")
CHOICES = ("auto", *TRANSPORT_NAMES)

__all__ = ["KVTransport", "TransportUnavailable", "candidates", "get_transport"]


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
    both_gpu = local.device == "cuda" and remote.device == "cuda"
    if both_gpu and local.host_id and local.host_id == remote.host_id:
        return ["ipc", "nccl", "tcp"]
    if both_gpu:
        return ["nccl", "tcp"]
    return ["tcp"]


def device_uuid(device: torch.device) -> str:
    """Identifies a GPU across processes whatever their CUDA_VISIBLE_DEVICES."""
    if device.type != "cuda":
        return ""
    return str(getattr(torch.cuda.get_device_properties(device), "uuid", ""))


def host_identity() -> str:
    """Same on two processes exactly when they share a machine (and its GPUs)."""
    boot = Path("/proc/sys/kernel/random/boot_id")
    boot_id = boot.read_text().strip() if boot.exists() else ""
    return f"{socket.gethostname()}/{boot_id}"
