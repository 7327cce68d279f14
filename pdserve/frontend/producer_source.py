"""One ``--producer-url`` and the producers behind it.

An ``http`` URL whose host is a name stands for every address the name
resolves to (a Kubernetes headless Service lists one per pod): each address
is a producer of its own, called at ``http://ADDRESS:PORT`` with the URL's
``Host`` header. An ``https`` URL is always called by its name (TLS checks the
certificate against it), so it is one producer whatever the name resolves
to; its first address is only where the KV side channel is read.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from urllib.parse import urlsplit

import msgspec


class Endpoint(msgspec.Struct, frozen=True):
    """One producer as the HTTP layer calls it."""

    base_url: str  # what requests go to, path prefix included, no trailing /
    host_header: str | None  # the URL's own Host when base_url names an address
    address: str  # IP address: where its KV ports are read
    port: int  # its HTTP port

    @property
    def key(self) -> str:
        """Unique per producer (a metric label, a dictionary key): ADDRESS:PORT."""
        return f"{_bracketed(self.address)}:{self.port}"

    def headers(self) -> dict[str, str]:
        return {} if self.host_header is None else {"Host": self.host_header}


class ProducerSource:
    def __init__(self, url: str) -> None:
        self.url = url.rstrip("/")
        parts = urlsplit(self.url)
        if not parts.hostname:
            raise ValueError(f"producer URL {url!r} has no host")
        self.scheme = parts.scheme or "http"
        self.hostname = parts.hostname
        self.port = parts.port or (443 if self.scheme == "https" else 80)
        self.netloc = parts.netloc
        self.path = parts.path.rstrip("/")

    @property
    def expands(self) -> bool:
        """Whether each address of the name is a producer of its own."""
        return self.scheme == "http" and not is_ip(self.hostname)

    def endpoints(self, addresses: list[str]) -> list[Endpoint]:
        """The producers behind this URL, given what its host resolves to."""
        if not addresses:
            return []
        if not self.expands:
            return [Endpoint(self.url, None, addresses[0], self.port)]
        return [
            Endpoint(
                f"{self.scheme}://{_bracketed(a)}:{self.port}{self.path}",
                self.netloc,
                a,
                self.port,
            )
            for a in addresses
        ]

    async def resolve(self) -> list[str]:
        """The host's addresses now (in the order the resolver gives them)."""
        if is_ip(self.hostname):
            return [self.hostname]
        loop = asyncio.get_running_loop()
        infos = await loop.getaddrinfo(
            self.hostname, self.port, type=socket.SOCK_STREAM
        )
        return unique_addresses(infos)

    def resolve_blocking(self) -> list[str]:
        """``resolve`` for the entrypoint, before any event loop runs."""
        if is_ip(self.hostname):
            return [self.hostname]
        infos = socket.getaddrinfo(self.hostname, self.port, type=socket.SOCK_STREAM)
        return unique_addresses(infos)


def unique_addresses(infos: list) -> list[str]:
    addresses: list[str] = []
    for *_, sockaddr in infos:
        if sockaddr[0] not in addresses:
            addresses.append(sockaddr[0])
    return addresses


def is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _bracketed(address: str) -> str:
    return f"[{address}]" if ":" in address else address
