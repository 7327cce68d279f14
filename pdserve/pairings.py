"""Which producers a consumer's engine ranks have paired with, shared with
its HTTP layer through files in the node's private run directory.

The HTTP layer sends a producer prefills only once every engine rank of its
node has paired with that producer instance (a rank that cannot read its KV
would recompute every prompt sent there). The two sides live in different
processes; small files are the simplest channel that needs neither side to
wait for the other:

- ``targets.json``: the producers the HTTP layer found compatible by their
  metadata (written by the HTTP layer); each rank pairs with them in the
  background.
- ``rank-N.json``: what rank N has paired with, or why it could not
  (written by rank N's pairing threads).

Each file is replaced atomically, so a reader sees one version or the other.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import NamedTuple

import msgspec

from pdserve.log import init_logger

logger = init_logger(__name__)

TARGETS_FILE = "targets.json"


class PairingTarget(msgspec.Struct, frozen=True):
    """One producer instance: where its KV ports are, and which instance."""

    host: str
    kv_ports: tuple[int, ...]
    instance_id: str

    @property
    def key(self) -> tuple[str, tuple[int, ...]]:
        return self.host, tuple(self.kv_ports)


class PeerState(msgspec.Struct, frozen=True):
    target: PairingTarget
    paired: bool
    # Why pairing failed; ``incompatible``: it never will (a mismatch);
    # ``gone``: another instance serves at its address now (a restart).
    error: str = ""
    incompatible: bool = False
    gone: bool = False


class NodeState(NamedTuple):
    """A producer instance as every rank of this node sees it."""

    paired: bool
    error: str = ""
    incompatible: bool = False
    gone: bool = False


class RankPairings(msgspec.Struct):
    rank: int
    peers: list[PeerState] = []


def rank_file(rank: int) -> str:
    return f"rank-{rank}.json"


def write_atomic(run_dir: str, name: str, value: msgspec.Struct | list) -> None:
    """Replace ``run_dir/name`` with ``value`` as JSON, never half-written."""
    data = msgspec.json.encode(value)
    fd, tmp = tempfile.mkstemp(dir=run_dir, prefix=f".{name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, os.path.join(run_dir, name))
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_targets(run_dir: str, targets: list[PairingTarget]) -> None:
    write_atomic(run_dir, TARGETS_FILE, targets)


def write_rank(run_dir: str, pairings: RankPairings) -> None:
    write_atomic(run_dir, rank_file(pairings.rank), pairings)


class FileReader:
    """Reads one of these files again only when it changed."""

    def __init__(self, path: str, kind: type) -> None:
        self.path = path
        self.kind = kind
        self._stamp: tuple[int, int, int] | None = None
        self.value = None

    def read(self):
        """The file's latest content, or None while it does not exist or
        cannot be parsed (a writer of another version: logged once)."""
        try:
            stat = os.stat(self.path)
        except OSError:
            self._stamp, self.value = None, None
            return None
        # Files are replaced, never rewritten: a new inode is a new version.
        stamp = (stat.st_ino, stat.st_mtime_ns, stat.st_size)
        if stamp == self._stamp:
            return self.value
        try:
            with open(self.path, "rb") as f:
                self.value = msgspec.json.decode(f.read(), type=self.kind)
        except (OSError, msgspec.DecodeError, msgspec.ValidationError) as exc:
            logger.warning("pdserve: cannot read %s: %s", self.path, exc)
            self.value = None
        self._stamp = stamp
        return self.value


def targets_reader(run_dir: str) -> FileReader:
    return FileReader(os.path.join(run_dir, TARGETS_FILE), list[PairingTarget])


def rank_reader(run_dir: str, rank: int) -> FileReader:
    return FileReader(os.path.join(run_dir, rank_file(rank)), RankPairings)


class NodePairings:
    """The HTTP layer's view: is a producer instance paired on every rank?"""

    def __init__(self, run_dir: str, tp_size: int) -> None:
        self._ranks = [rank_reader(run_dir, r) for r in range(tp_size)]

    def state(self, target: PairingTarget) -> NodeState:
        """Paired on every rank; else why not, if a rank said."""
        paired = True
        for reader in self._ranks:
            pairings: RankPairings | None = reader.read()
            peer = _find(pairings, target)
            if peer is None:
                paired = False
                continue
            if not peer.paired:
                error = f"rank {pairings.rank}: {peer.error}"
                return NodeState(False, error, peer.incompatible, peer.gone)
        return NodeState(paired)


def _find(pairings: RankPairings | None, target: PairingTarget) -> PeerState | None:
    if pairings is None:
        return None
    for peer in pairings.peers:
        if peer.target == target:
            return peer
    return None
