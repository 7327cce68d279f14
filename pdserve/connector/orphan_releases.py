"""Releases of leases whose producer this consumer rank is not paired with.

A lease can end here without a pairing to read it through: pairing with its
producer failed (down, a layout this rank cannot read), or the request ended
before any pull. Its producer would otherwise keep the blocks until the lease
expires. Each of its producer ranks gets a Release over a short-lived link;
a lease ends at its first release there (``needed`` 1): had another rank of
this node been reading it, that rank's read is refused and the request
recomputed, which the failed pull here already means.
"""

from __future__ import annotations

from pdserve.connector.kv_client import ProducerLink
from pdserve.kv_cache import PagedKVCache
from pdserve.lease import Lease

# Links to producer ranks with releases in flight; more are not opened (the
# leases then expire on their producers).
MAX_LINKS = 64


class OrphanReleases:
    def __init__(self, kv: PagedKVCache, timeout: float, secret: bytes | None) -> None:
        self.kv = kv
        self.timeout = timeout
        self._secret = secret
        self._links: dict[tuple[str, int], ProducerLink] = {}

    def release(self, lease: Lease) -> None:
        if not lease.kv_host:
            return
        for port in lease.kv_ports:
            link = self._links.get((lease.kv_host, port))
            if link is None:
                if len(self._links) >= MAX_LINKS:
                    return
                link = ProducerLink(
                    lease.kv_host, port, self.kv, self.timeout, self._secret
                )
                self._links[(lease.kv_host, port)] = link
            link.release(lease)

    def pump(self) -> None:
        """Send what can be sent; close the links that sent everything (or
        failed: those leases expire)."""
        for address, link in list(self._links.items()):
            try:
                link.pump()
            except Exception:  # a bug costs these releases, never the engine
                link.close("release failed")
                del self._links[address]
                continue
            if link.drained():
                link.close("released")
                del self._links[address]

    def __bool__(self) -> bool:
        """Whether releases are still on their way."""
        return bool(self._links)

    def close(self) -> None:
        for link in self._links.values():
            link.close("shutting down")
        self._links.clear()
