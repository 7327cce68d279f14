"""A producer rank's KV server and a consumer rank's link over CPU caches,
both in this process, for side-channel tests. ``pull`` plays both engines:
every round it pumps the link (consumer step) and the server (producer step).
"""

from __future__ import annotations

import socket
import time

import torch

from pdserve.connector.consumer_rank import ConsumerRank
from pdserve.connector.producer_peer import ProducerPeer, RankPair
from pdserve.kv_cache import PagedKVCache
from pdserve.lease import Lease, lease_token
from pdserve.pairings import PairingTarget
from pdserve.settings import ProducerAddress, Settings
from pdserve.side_channel.client import LinkState, Load, ProducerLink, authenticate
from pdserve.side_channel.leases import LeaseTable
from pdserve.side_channel.load_spec import LoadSpec
from pdserve.side_channel.protocol import (
    Message,
    RankInfo,
    prompt_hash,
    recv_message,
    send_message,
)
from pdserve.side_channel.server import KVServer
from pdserve.transport import get_transport
from tests.eventually import eventually

NODE_KEY = b"k" * 32
INSTANCE_ID = "instance-1"
NUM_BLOCKS = 37
SHAPE = (2, NUM_BLOCKS, 16, 2, 8)


def paged_kv(
    shape: tuple[int, ...] = SHAPE,
    seed: int | None = 0,
    layers: int = 3,
    dtype: torch.dtype = torch.float32,
    num_blocks: int = NUM_BLOCKS,
) -> PagedKVCache:
    gen = torch.Generator().manual_seed(seed or 0)
    caches = {
        f"model.layers.{i}.self_attn": (
            torch.zeros(shape) if seed is None else torch.randn(shape, generator=gen)
        ).to(dtype)
        for i in range(layers)
    }
    return PagedKVCache(caches, num_blocks)


def empty_like(kv: PagedKVCache) -> PagedKVCache:
    caches = {n: torch.zeros_like(t) for n, t in zip(kv.names, kv.layers, strict=True)}
    return PagedKVCache(caches, kv.num_blocks)


def rank_info_for(kv: PagedKVCache, instance_id: str = INSTANCE_ID) -> RankInfo:
    return RankInfo(
        pdserve_version="t", protocol_version=3, vllm_version="t", model="m",
        dtype="float32", tp_size=1, tp_rank=0, block_size=16,
        num_blocks=kv.num_blocks, layers=kv.layer_infos(), transports=["tcp"],
        instance_id=instance_id,
    )  # fmt: skip


class FakeClock:
    """A monotonic clock a test moves by hand."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def start_server(
    kv: PagedKVCache,
    leases: LeaseTable | None = None,
    secret: bytes | None = None,
    port: int = 0,
    instance_id: str = INSTANCE_ID,
    node_key: bytes = NODE_KEY,
    **kwargs,
) -> KVServer:
    """A server on a local port that moves blocks over tcp."""
    return KVServer(
        "127.0.0.1",
        port,
        kv,
        rank_info_for(kv, instance_id),
        leases if leases is not None else LeaseTable(30),
        {"tcp": get_transport("tcp")},
        node_key=node_key,
        secret=secret,
        **kwargs,
    )


class Session:
    """A blocking connection to a KV server, greeted (and, with a secret,
    both proofs done): what it sends is tagged, what it receives checked."""

    def __init__(self, port: int, secret: bytes | None = None, source: str = ""):
        self.sock = socket.create_connection(
            ("127.0.0.1", port),
            timeout=5,
            source_address=(source, 0) if source else None,
        )
        macs = authenticate(self.sock, secret, time.monotonic() + 5)
        self.sending, self.receiving = macs or (None, None)

    def send(self, message: Message) -> None:
        send_message(self.sock, message, self.sending)

    def recv(self) -> Message:
        return recv_message(
            self.sock, deadline=time.monotonic() + 5, mac=self.receiving
        )

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *_) -> None:
        self.close()


def make_lease(
    request_id: str,
    block_ids: list[int],
    port: int,
    prompt: list[int] | None = None,
    node_key: bytes = NODE_KEY,
    instance_id: str = INSTANCE_ID,
) -> Lease:
    """A lease as the producer at ``port`` would issue it."""
    prompt = prompt or list(range(len(block_ids) * 16))
    digest = prompt_hash(prompt)
    return Lease(
        request_id=request_id,
        token=lease_token(node_key, request_id, digest),
        instance_id=instance_id,
        block_ids=list(block_ids),
        prompt_hash=digest,
        num_prompt_tokens=len(prompt),
        kv_ports=[port],
        kv_host="127.0.0.1",
    )


def link_to(
    server: KVServer, kv: PagedKVCache, connect: bool = True, **kwargs
) -> ProducerLink:
    """A consumer link to ``server``, connected and greeted unless told not."""
    kwargs.setdefault("timeout", 5)
    link = ProducerLink("127.0.0.1", server.port, kv, **kwargs)
    if connect:
        link.release(make_lease("warm-up", [0], server.port))
        pump(link, server, lambda _: link.state == LinkState.READY)
    return link


class LetsGo:
    """Plays the ``Pull`` for loads on a bare link: when one ends, from
    inside the link's pump, its lease is released on that link."""

    def __init__(self, link: ProducerLink) -> None:
        self.link = link

    def copying(self, load: Load) -> None:
        pass

    def ended(self, load: Load) -> None:
        self.link.release(load.spec.lease, load.releases_needed)


def load_of(
    lease: Lease,
    local_block_ids: list[int],
    remote_block_ids: list[int] | None = None,
    seconds: float = 5,
    releasing_on: ProducerLink | None = None,
) -> Load:
    """A load of ``lease``; with ``releasing_on``, its lease is released
    there when it ends."""
    spec = LoadSpec(
        "consumer-" + lease.request_id,
        lease,
        list(lease.block_ids if remote_block_ids is None else remote_block_ids),
        list(local_block_ids),
    )
    owner = LetsGo(releasing_on) if releasing_on is not None else None
    deadline = time.monotonic() + seconds
    return Load(spec, get_transport("tcp"), "", deadline, owner=owner)


def pump(
    link: ProducerLink,
    server: KVServer | None,
    until,
    timeout: float = 10,
    producer_steps: bool = True,
    on_step=None,
) -> list[Load]:
    """Run both engines' steps until ``until(finished)`` holds; the loads
    that finished meanwhile. ``on_step`` is told how long each producer
    step took."""
    finished: list[Load] = []

    def both_steps() -> None:
        finished.extend(link.pump())
        if server is not None and producer_steps:
            started = time.monotonic()
            server.step()
            if on_step is not None:
                on_step(time.monotonic() - started)

    eventually(
        lambda: until(finished),
        timeout,
        "side channel progress",
        step=both_steps,
        interval=0.001,
    )
    return finished


def blocks_equal(a: PagedKVCache, a_ids, b: PagedKVCache, b_ids) -> bool:
    return all(
        torch.equal(
            a.gather(layer, a.index(a_ids)).view(torch.uint8),
            b.gather(layer, b.index(b_ids)).view(torch.uint8),
        )
        for layer in range(len(a.layers))
    )


def one(finished: list[Load]) -> bool:
    """``pump``'s stop condition for a single load."""
    return len(finished) >= 1


def consumer_rank(
    kv: PagedKVCache, port: int, secret: bytes | None = None, **kwargs
) -> ConsumerRank:
    """A consumer rank of the producer rank at ``port`` (not yet paired);
    ``kwargs`` go to ``ConsumerRank`` (e.g. the watch's period)."""
    settings = Settings(
        role="consumer",
        model="m",
        producers=[ProducerAddress("127.0.0.1", [port])],
        connect_timeout=5,
        transfer_timeout=5,
    )
    rank = ConsumerRank(
        settings, kv, rank_info_for(kv, instance_id=""), 0, secret, **kwargs
    )
    rank.close = rank.shutdown
    return rank


def run_load(
    rank: ConsumerRank, server: KVServer, lease: Lease, local: list[int]
) -> str | None:
    """One pull through the consumer rank; its error, or None."""
    failures_before = rank.stats.data["kv_load_failures"]
    rank.start(
        [LoadSpec("c-" + lease.request_id, lease, lease.block_ids, local)], [], []
    )
    eventually(
        lambda: rank.take_done()[0],
        10,
        "the pull to end",
        step=lambda: steps(rank, server),
        interval=0.001,
    )
    if rank.stats.data["kv_load_failures"] == failures_before:
        return None
    return rank.last_error


def steps(rank: ConsumerRank, server: KVServer) -> None:
    """One step of each engine: the consumer rank's, then the producer's."""
    rank.poll()
    server.step()


def pair_with(rank: ConsumerRank, port: int, instance_id: str = INSTANCE_ID) -> None:
    """What the HTTP layer has every rank do before it sends a producer work:
    pair with it (in the background), then the engine takes the pairing."""
    target = PairingTarget("127.0.0.1", (port,), instance_id)
    rank.producers.pairer.want(target)
    eventually(
        lambda: (
            (peer := rank.producers.peers.get(target.key))
            and peer.instance_id == instance_id
        ),
        10,
        f"rank paired with {target}",
        step=lambda: rank.start([], [], []),
    )


def only_peer(rank: ConsumerRank) -> ProducerPeer:
    (peer,) = rank.producers.peers.values()
    return peer


def only_pair(rank: ConsumerRank) -> RankPair:
    (pair,) = only_peer(rank).pairs.values()
    return pair


def paired_rank(closing, **kwargs) -> tuple[PagedKVCache, KVServer, ConsumerRank]:
    """A producer's cache and server, and a consumer rank paired with it
    (``kwargs``: as for ``consumer_rank``)."""
    producer = paged_kv()
    server = start_server(producer)
    closing(server)
    rank = consumer_rank(empty_like(producer), server.port, **kwargs)
    closing(rank)
    rank.connect()
    return producer, server, rank
