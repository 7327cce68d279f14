"""Which visible GPU is which, across processes whatever their
CUDA_VISIBLE_DEVICES / HIP_VISIBLE_DEVICES.

A device is known by its UUID and its PCI bus id together. Either can be
missing (a driver that reports no UUID, a CPU build), and MI300X partition
modes (CPX/DPX) have reported one UUID for several devices: then the device
counts as unknown, and no GPU-direct transport may take it for a peer's.
"""

from __future__ import annotations

from collections import Counter

import torch

from pdserve.log import init_logger

logger = init_logger(__name__)

_PCI_FIELDS = ("pci_domain_id", "pci_bus_id", "pci_device_id")


def visible_count() -> int:
    return torch.cuda.device_count()


def _properties(index: int):
    try:
        return torch.cuda.get_device_properties(index)
    except (AssertionError, RuntimeError) as exc:  # CPU build, no such device
        logger.debug("no properties for GPU %d: %s", index, exc)
        return None


def raw_uuid(index: int) -> str:
    """What the driver reports as the UUID of visible device ``index``;
    "" where it reports none (an all-zero UUID says nothing either)."""
    uuid = str(getattr(_properties(index), "uuid", "") or "")
    digits = uuid.removeprefix("GPU-").replace("-", "")
    return uuid if digits.strip("0") else ""


def raw_pci_bus_id(index: int) -> str:
    """Visible device ``index``'s PCI address as "DDDD:BB:DD"; "" if unknown."""
    ids = [getattr(_properties(index), name, None) for name in _PCI_FIELDS]
    if not all(isinstance(i, int) for i in ids):
        return ""
    domain, bus, device = ids
    return f"{domain:04x}:{bus:02x}:{device:02x}"


def identities() -> list[tuple[str, str]]:
    """(UUID, PCI bus id) of every visible device, by index. A UUID that
    more than one device reports identifies none of them: it becomes ""."""
    uuids = [raw_uuid(index) for index in range(visible_count())]
    seen = Counter(uuids)
    return [
        (uuid if seen[uuid] == 1 else "", raw_pci_bus_id(index))
        for index, uuid in enumerate(uuids)
    ]


def _identity(device: torch.device) -> tuple[str, str]:
    if device.type != "cuda":
        return "", ""
    index = torch.cuda.current_device() if device.index is None else device.index
    known = identities()
    return known[index] if index < len(known) else ("", "")


def device_uuid(device: torch.device) -> str:
    """The device's UUID; "" when it has none or shares it with another."""
    return _identity(device)[0]


def device_pci_bus_id(device: torch.device) -> str:
    return _identity(device)[1]


def local_index_of(uuid: str, pci_bus_id: str) -> int | None:
    """The visible device with this UUID and PCI bus id; None if there is
    none, or either is unknown (then it cannot be told apart for sure)."""
    if not uuid or not pci_bus_id:
        return None
    for index, known in enumerate(identities()):
        if known == (uuid, pci_bus_id):
            return index
    return None
