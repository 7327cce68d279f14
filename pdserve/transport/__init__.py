"""KV transports, one file each, behind ``KVTransport``."""

from pdserve.transport.base import KVTransport
from pdserve.transport.tcp import TcpTransport

TRANSPORTS: dict[str, type[KVTransport]] = {TcpTransport.name: TcpTransport}


def get_transport(name: str) -> KVTransport:
    try:
        return TRANSPORTS[name]()
    except KeyError:
        raise ValueError(
            f"unknown KV transport {name!r}; known: {sorted(TRANSPORTS)}"
        ) from None
