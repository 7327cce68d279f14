"""Consumer and producer of different TP sizes: each consumer rank reads
exactly its KV heads from the producer ranks that hold them, over the real
side channel (CPU caches, tcp), and a lease ends only when every consumer
rank that reads it has released it."""

from __future__ import annotations

import msgspec
import pytest
import torch

from pdserve.connector.consumer_rank import ConsumerRank
from pdserve.connector.tp_mapping import HeadSlice, head_slices, rank_heads
from pdserve.kv_cache import PagedKVCache
from pdserve.lease import Lease
from pdserve.settings import ProducerAddress, Settings
from pdserve.side_channel.leases import LeaseTable
from pdserve.side_channel.load_spec import LoadSpec
from pdserve.side_channel.server import KVServer
from pdserve.transport import get_transport
from tests.eventually import Equal, eventually
from tests.unit.side_channel_fakes import (
    INSTANCE_ID,
    NODE_KEY,
    make_lease,
    rank_info_for,
)

HEADS = 4
NUM_BLOCKS = 13
HEAD_DIM = 3  # of [K/V, blocks, tokens, heads, head size]


def full_kv(seed: int = 0, heads: int = HEADS) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(2, NUM_BLOCKS, 16, heads, 8, generator=gen) for _ in range(2)]


def rank_kv(layers: list[torch.Tensor], heads: range) -> PagedKVCache:
    """What a rank holding ``heads`` of ``layers`` has (zeros if empty)."""
    caches = {
        f"model.layers.{i}.self_attn": layer[..., heads.start : heads.stop, :].clone()
        for i, layer in enumerate(layers)
    }
    kv = PagedKVCache(caches, NUM_BLOCKS)
    kv.locate_heads([HEAD_DIM] * len(layers), len(heads))
    return kv


def info(
    kv: PagedKVCache,
    tp_size: int,
    tp_rank: int,
    instance_id: str = INSTANCE_ID,
    heads=HEADS,
):
    return msgspec.structs.replace(
        rank_info_for(kv, instance_id),
        tp_size=tp_size,
        tp_rank=tp_rank,
        total_kv_heads=heads,
    )


def producer(
    layers: list[torch.Tensor], tp: int, closing, heads: int = HEADS
) -> list[KVServer]:
    servers = []
    for rank in range(tp):
        kv = rank_kv(layers, rank_heads(heads, tp, rank))
        server = KVServer(
            "127.0.0.1", 0, kv, info(kv, tp, rank, heads=heads), LeaseTable(30),
            {"tcp": get_transport("tcp")}, node_key=NODE_KEY,
        )  # fmt: skip
        closing(server)
        servers.append(server)
    return servers


def consumer(
    tp: int, ports: list[int], closing, heads: int = HEADS, **kwargs
) -> list[ConsumerRank]:
    """Consumer ranks paired with the producer ranks at ``ports``
    (``kwargs``: to ``ConsumerRank``, e.g. the watch's period)."""
    settings = Settings(
        role="consumer",
        model="m",
        producers=[ProducerAddress("127.0.0.1", ports)],
        connect_timeout=5,
        transfer_timeout=5,
    )
    ranks = []
    for rank in range(tp):
        zeros = [torch.zeros(2, NUM_BLOCKS, 16, heads, 8)] * 2
        kv = rank_kv(zeros, rank_heads(heads, tp, rank))
        consumer_rank = ConsumerRank(
            settings, kv, info(kv, tp, rank, "", heads), rank, None, **kwargs
        )
        closing(consumer_rank)
        consumer_rank.close = consumer_rank.shutdown
        consumer_rank.connect()
        ranks.append(consumer_rank)
    return ranks


def grant(servers: list[KVServer], blocks: list[int]) -> Lease:
    lease = make_lease("r", blocks, servers[0].port)
    lease = msgspec.structs.replace(lease, kv_ports=[s.port for s in servers])
    for server in servers:
        server.leases.grant(lease.request_id, blocks, lease.prompt_hash)
    return lease


def pull(ranks: list[ConsumerRank], servers: list[KVServer], lease, local) -> None:
    """Each consumer rank pulls the lease, one after the other; the
    producer's engine steps all along."""
    for rank in ranks:
        rank.start([LoadSpec("c-r", lease, lease.block_ids, local)], [], [])

        def both_steps(rank: ConsumerRank = rank) -> None:
            rank.poll()
            step(servers)

        eventually(
            lambda rank=rank: rank.take_done()[0],
            10,
            f"rank {rank.producers.tp_rank}'s pull",
            step=both_steps,
            interval=0.001,
        )
        assert rank.stats.data["kv_load_failures"] == 0, rank.last_error
        assert rank.stats.data["kv_loads"] == 1


def step(servers: list[KVServer]) -> None:
    """One step of each producer rank's engine."""
    for server in servers:
        server.step()


def held(servers: list[KVServer]) -> list[int]:
    """Leases each producer rank holds."""
    return [len(server.leases) for server in servers]


def let_go(servers: list[KVServer]) -> None:
    """Step the producer ranks until none holds a lease (no consumer step:
    what the consumer ranks still owe, their watch sends)."""
    eventually(
        lambda: Equal(held(servers), [0] * len(servers)),
        5,
        "every producer rank to let go",
        step=lambda: step(servers),
    )


def released_once(servers: list[KVServer], request_id: str) -> bool:
    """Each of ``servers`` has a release of the lease (it ended, or waits
    for more consumer ranks')."""
    leases = [server.leases._leases.get(request_id) for server in servers]
    return all(lease is None or lease.released_by for lease in leases)


def heads_of(layers, rank_kv_cache: PagedKVCache, heads: range, blocks, local):
    for i, layer in enumerate(layers):
        want = layer[:, blocks][..., heads.start : heads.stop, :]
        assert torch.equal(rank_kv_cache.layers[i][:, local], want)


@pytest.mark.parametrize(
    ("producer_tp", "consumer_tp"), [(2, 1), (1, 2), (4, 2), (2, 4)]
)
def test_each_consumer_rank_gets_exactly_its_heads(closing, producer_tp, consumer_tp):
    layers = full_kv()
    servers = producer(layers, producer_tp, closing)
    ranks = consumer(consumer_tp, [s.port for s in servers], closing)
    blocks, local = [3, 7, 11], [1, 2, 5]
    lease = grant(servers, blocks)

    pull(ranks[:1], servers, lease, local)
    readers_left = [
        len([c for c in range(consumer_tp)
             if any(s.producer_rank == p
                    for s in head_slices(HEADS, producer_tp, consumer_tp, c))])
        for p in range(producer_tp)
    ]  # fmt: skip
    if consumer_tp > 1:
        # Another consumer rank still reads: no producer rank it needs let go.
        read = {
            s.producer_rank for s in head_slices(HEADS, producer_tp, consumer_tp, 0)
        }
        eventually(
            lambda: released_once([servers[p] for p in read], lease.request_id),
            5,
            "consumer rank 0's releases",
            step=lambda: step(servers),
        )
        still = held(servers)
        assert all(still[p] == 1 for p in range(producer_tp) if readers_left[p] > 1)
    pull(ranks[1:], servers, lease, local)

    for rank in range(consumer_tp):
        heads = rank_heads(HEADS, consumer_tp, rank)
        heads_of(layers, ranks[rank].kv, heads, blocks, local)
        # Nothing but the pulled blocks was written.
        untouched = [b for b in range(NUM_BLOCKS) if b not in local]
        assert not ranks[rank].kv.layers[0][:, untouched].any()
    let_go(servers)


@pytest.mark.parametrize(("producer_tp", "consumer_tp"), [(4, 1), (4, 2), (2, 1)])
def test_fewer_heads_than_producer_ranks_every_rank_lets_go(
    closing, producer_tp, consumer_tp
):
    """Two KV heads over TP 4: ranks 0,1 hold head 0, ranks 2,3 head 1. A
    TP 1 consumer reads from ranks 0 and 2 only, yet vLLM frees the blocks
    only once every producer rank has let go: ranks 1 and 3 are released."""
    heads = 2
    layers = full_kv(heads=heads)
    servers = producer(layers, producer_tp, closing, heads)
    ranks = consumer(
        consumer_tp, [s.port for s in servers], closing, heads, watch_seconds=0.05
    )
    lease = grant(servers, [2, 5])
    pull(ranks, servers, lease, [7, 8])
    for rank in range(consumer_tp):
        wanted = rank_heads(heads, consumer_tp, rank)
        heads_of(layers, ranks[rank].kv, wanted, [2, 5], [7, 8])
    # Within a few seconds, with no consumer step: the watch sends them.
    let_go(servers)


def test_heads_map_to_the_ranks_that_hold_them():
    assert head_slices(4, 2, 1, 0) == [HeadSlice(0, 0, 0, 2), HeadSlice(1, 0, 2, 2)]
    assert head_slices(4, 1, 2, 1) == [HeadSlice(0, 2, 0, 2)]
    assert head_slices(4, 2, 2, 1) == [HeadSlice(1, 0, 0, 2)]
    # Two KV heads over TP 4: ranks 0,1 hold head 0, ranks 2,3 head 1.
    assert head_slices(2, 4, 1, 0) == [HeadSlice(0, 0, 0, 1), HeadSlice(2, 0, 1, 1)]
    assert head_slices(2, 1, 4, 3) == [HeadSlice(0, 1, 0, 1)]
    assert head_slices(2, 4, 4, 3) == [HeadSlice(3, 0, 0, 1)]


def test_a_read_of_heads_a_rank_lacks_is_refused(closing):
    from tests.unit.side_channel_fakes import link_to, load_of, one, pump

    servers = producer(full_kv(), 2, closing)
    lease = grant(servers, [1])
    link = link_to(
        servers[0], rank_kv([torch.zeros(2, NUM_BLOCKS, 16, 4, 8)] * 2, range(4))
    )
    closing(link)
    load = load_of(lease, [1])
    load.remote_heads, load.local_heads = (1, 2), (0, 2)  # rank 0 has 2 heads
    link.submit(load)
    (done,) = pump(link, servers[0], one)
    assert "heads 1..3 of 2" in done.error
