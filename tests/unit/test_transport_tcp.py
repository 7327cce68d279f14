"""TCP transport through the real side-channel server and client: the bytes
a consumer writes into its blocks are the producer's bytes, for every layout."""

from __future__ import annotations

import pytest
import torch

from pdserve.connector.kv_client import ProducerRankClient
from pdserve.connector.leases import LeaseTable
from pdserve.kv_cache import PagedKVCache
from pdserve.transport import get_transport
from tests.unit.kv_server_helpers import start_tcp_server

NUM_BLOCKS = 37

# (shape with NUM_BLOCKS in the paged dimension) covering vLLM's layouts.
LAYOUTS = {
    "kv_first": (2, NUM_BLOCKS, 16, 2, 8),
    "blocks_first": (NUM_BLOCKS, 2, 16, 2, 8),
    "heads_before_tokens": (2, NUM_BLOCKS, 2, 16, 8),
}
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def random_cache(shape, dtype, layers=3, seed=0) -> PagedKVCache:
    gen = torch.Generator().manual_seed(seed)
    caches = {
        f"model.layers.{i}.self_attn": torch.randn(shape, generator=gen).to(dtype)
        for i in range(layers)
    }
    return PagedKVCache(caches, NUM_BLOCKS)


def empty_like(kv: PagedKVCache) -> PagedKVCache:
    caches = {n: torch.zeros_like(t) for n, t in zip(kv.names, kv.layers, strict=True)}
    return PagedKVCache(caches, kv.num_blocks)


def blocks_of(kv: PagedKVCache, layer: int, ids: list[int]) -> torch.Tensor:
    return kv.gather(layer, kv.index(ids))


@pytest.fixture
def serve():
    def start(kv: PagedKVCache, leases: LeaseTable) -> ProducerRankClient:
        server = start_tcp_server(kv, leases)
        servers.append(server)
        client = ProducerRankClient("127.0.0.1", server.port, timeout=5)
        clients.append(client)
        return client

    servers, clients = [], []
    yield start
    for client in clients:
        client.close()
    for server in servers:
        server.close()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_blocks_arrive_byte_exact(serve, layout, dtype):
    producer = random_cache(LAYOUTS[layout], dtype)
    consumer = empty_like(producer)
    leases = LeaseTable(lease_seconds=30)
    remote_ids = [30, 2, 17, 5, 36]  # scattered, not sorted
    local_ids = [0, 33, 8, 9, 21]
    leases.grant("req-1", remote_ids + [11], "secret-token")
    client = serve(producer, leases)

    nbytes = client.read(
        get_transport("tcp"), consumer, "req-1", "secret-token", remote_ids, local_ids
    )

    assert nbytes == producer.bytes_per_block() * len(remote_ids)
    for layer in range(len(producer.layers)):
        sent = blocks_of(producer, layer, remote_ids)
        got = blocks_of(consumer, layer, local_ids)
        assert torch.equal(sent.view(torch.uint8), got.view(torch.uint8))
        untouched = [b for b in range(NUM_BLOCKS) if b not in local_ids]
        assert not blocks_of(consumer, layer, untouched).any()


def test_empty_block_list_moves_nothing(serve):
    producer = random_cache(LAYOUTS["kv_first"], torch.bfloat16)
    consumer = empty_like(producer)
    leases = LeaseTable(lease_seconds=30)
    leases.grant("req-1", [1, 2], "t")
    client = serve(producer, leases)
    assert client.read(get_transport("tcp"), consumer, "req-1", "t", [], []) == 0
    assert all(not layer.any() for layer in consumer.layers)


def test_read_refused_for_wrong_token_or_foreign_blocks(serve):
    producer = random_cache(LAYOUTS["kv_first"], torch.float32)
    consumer = empty_like(producer)
    leases = LeaseTable(lease_seconds=30)
    leases.grant("req-1", [1, 2], "right")
    client = serve(producer, leases)
    tcp = get_transport("tcp")
    with pytest.raises(ConnectionError, match="wrong token"):
        client.read(tcp, consumer, "req-1", "wrong", [1], [1])
    with pytest.raises(ConnectionError, match="outside the request's lease"):
        client.read(tcp, consumer, "req-1", "right", [1, 3], [1, 2])
    assert all(not layer.any() for layer in consumer.layers)
    # The connection stays usable after a refusal.
    assert client.read(tcp, consumer, "req-1", "right", [2], [5]) > 0


def test_release_ends_lease_once(serve):
    producer = random_cache(LAYOUTS["kv_first"], torch.float32)
    leases = LeaseTable(lease_seconds=30)
    leases.grant("req-1", [1], "t")
    client = serve(producer, leases)
    assert client.release("req-1", "t") is True
    assert client.release("req-1", "t") is False
    finished, expired = leases.pop_finished()
    assert finished == {"req-1"} and expired == 0
    assert leases.pop_finished() == (set(), 0)


def test_rank_info_roundtrip(serve):
    producer = random_cache(LAYOUTS["blocks_first"], torch.bfloat16)
    client = serve(producer, LeaseTable(30))
    info = client.rank_info()
    assert info.layers == producer.layer_infos()
    assert [layer.block_dim for layer in info.layers] == [0, 0, 0]


def test_read_over_unserved_transport_is_refused(serve):
    producer = random_cache(LAYOUTS["kv_first"], torch.float32)
    consumer = empty_like(producer)
    leases = LeaseTable(lease_seconds=30)
    leases.grant("req-1", [1], "t")
    client = serve(producer, leases)
    ipc_named_tcp = get_transport("tcp")
    ipc_named_tcp.name = "ipc"  # a consumer asking for a transport not served
    with pytest.raises(ConnectionError, match="ipc not served"):
        client.read(ipc_named_tcp, consumer, "req-1", "t", [1], [1])
