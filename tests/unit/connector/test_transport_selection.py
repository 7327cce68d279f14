"""Which transport a consumer rank uses, and the fallback to tcp."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest
import torch

from pdserve.connector.producer_peer import (
    COPY_FAILURES_BEFORE_FALLBACK,
    ProducerPeer,
    RankPair,
)
from pdserve.connector.stats import PDServeStats
from pdserve.connector.tp_mapping import RankRole
from pdserve.kv_cache import PagedKVCache
from pdserve.settings import Settings
from pdserve.side_channel.client import ProducerLink
from pdserve.side_channel.protocol import RankInfo, TransportWelcome
from pdserve.transport import TransportUnavailable, candidates, devices
from pdserve.transport.base import Incoming
from pdserve.transport.tcp import TcpTransport
from tests.eventually import eventually
from tests.unit.side_channel_fakes import (
    blocks_equal,
    empty_like,
    make_lease,
    only_pair,
    paged_kv,
    run_load,
    start_server,
    steps,
)
from tests.unit.side_channel_fakes import consumer_rank as side_channel_rank

# Two GPUs this process sees: (UUID, PCI bus id) by index.
GPU0 = ("GPU-0a0a0a0a-0000-0000-0000-000000000001", "0000:0a:00")
GPU1 = ("GPU-1b1b1b1b-0000-0000-0000-000000000002", "0000:1b:00")


def info(device: str, host: str, gpu: tuple[str, str] = GPU0, **changes) -> RankInfo:
    return RankInfo(
        pdserve_version="v", protocol_version=1, vllm_version="v", model="m",
        dtype="bfloat16", tp_size=1, tp_rank=0, block_size=16, num_blocks=8,
        layers=[], transports=["tcp"], device=device, host_id=host,
        device_uuid=gpu[0], device_pci_bus_id=gpu[1], **changes,
    )  # fmt: skip


@pytest.fixture(autouse=True)
def gpus(monkeypatch) -> list[tuple[str, str]]:
    """The GPUs this process sees, by index (GPU0 and GPU1 unless a test
    changes the list): the per-device lookups read it instead of a driver."""
    visible = [GPU0, GPU1]
    monkeypatch.setattr(devices, "visible_count", lambda: len(visible))
    monkeypatch.setattr(devices, "raw_uuid", lambda index: visible[index][0])
    monkeypatch.setattr(devices, "raw_pci_bus_id", lambda index: visible[index][1])
    return visible


@pytest.mark.parametrize(
    ("requested", "local", "remote", "expected"),
    [
        ("auto", info("cuda", "h1"), info("cuda", "h1"), ["ipc", "nccl", "tcp"]),
        (
            "auto",
            info("cuda", "h1", GPU1),
            info("cuda", "h1", GPU0),
            ["ipc", "nccl", "tcp"],
        ),
        ("auto", info("cuda", "h1"), info("cuda", "h2"), ["nccl", "tcp"]),
        ("auto", info("cpu", "h1"), info("cpu", "h1"), ["tcp"]),
        ("auto", info("cuda", "h1"), info("cpu", "h1"), ["tcp"]),
        ("auto", info("cuda", ""), info("cuda", ""), ["nccl", "tcp"]),
        ("tcp", info("cuda", "h1"), info("cuda", "h1"), ["tcp"]),
        ("nccl", info("cpu", "h1"), info("cpu", "h1"), ["nccl", "tcp"]),
        ("ipc", info("cuda", "h1"), info("cuda", "h2"), ["ipc", "tcp"]),
    ],
)
def test_candidates(requested, local, remote, expected):
    assert candidates(requested, local, remote, has_secret=True) == expected


def test_auto_without_a_secret_moves_over_tcp_and_says_why_once(monkeypatch, caplog):
    """Producers refuse ipc and nccl to peers that proved no KV secret:
    ``auto`` does not try them, and says once how to enable them."""
    import pdserve.transport as transport

    monkeypatch.setattr(transport, "_told_no_secret", False)
    same_host = info("cuda", "h1"), info("cuda", "h1")
    with caplog.at_level(logging.WARNING, logger="pdserve"):
        for _ in range(3):
            assert candidates("auto", *same_host, has_secret=False) == ["tcp"]
            assert candidates("auto", info("cuda", "h1"), info("cuda", "h2"),
                              has_secret=False) == ["tcp"]  # fmt: skip
    assert caplog.text.count("--kv-secret") == 1
    # Asked for by name, it is still tried (and refused by the producer).
    assert candidates("ipc", *same_host, has_secret=False) == ["ipc", "tcp"]


@pytest.mark.parametrize(
    "remote_gpu",
    [
        pytest.param(("", GPU0[1]), id="empty-uuid"),
        pytest.param((GPU0[0], ""), id="empty-pci"),
        pytest.param((GPU0[0], "0000:99:00"), id="uuid-matches-pci-differs"),
        pytest.param((GPU1[0], GPU0[1]), id="pci-matches-uuid-differs"),
        pytest.param(("GPU-ffff", "0000:ff:00"), id="not-visible-here"),
    ],
)
def test_producer_gpu_not_told_apart_means_no_ipc(remote_gpu):
    local, remote = info("cuda", "h1", GPU1), info("cuda", "h1", remote_gpu)
    assert candidates("auto", local, remote, has_secret=True) == ["nccl", "tcp"]


def test_own_gpu_without_uuid_means_no_ipc():
    local = info("cuda", "h1", ("", GPU1[1]))
    remote = info("cuda", "h1")
    assert candidates("auto", local, remote, has_secret=True) == ["nccl", "tcp"]


def test_duplicate_uuid_means_no_ipc(gpus):
    """MI300X partitions have reported one UUID for several devices: the
    producer's partition cannot be told apart from ours."""
    shared = GPU0[0]
    gpus[1] = (shared, GPU1[1])
    local, remote = info("cuda", "h1", gpus[1]), info("cuda", "h1", gpus[0])
    assert candidates("auto", local, remote, has_secret=True) == ["nccl", "tcp"]
    assert devices.local_index_of(*GPU0) is None
    assert devices.device_uuid(torch.device("cuda", 0)) == ""
    assert devices.device_pci_bus_id(torch.device("cuda", 0)) == GPU0[1]


def test_devices_are_found_by_uuid_and_pci_bus_id():
    assert devices.local_index_of(*GPU1) == 1
    assert devices.local_index_of(GPU1[0], GPU0[1]) is None
    assert devices.device_uuid(torch.device("cuda", 1)) == GPU1[0]
    assert devices.device_uuid(torch.device("cpu")) == ""
    assert devices.device_pci_bus_id(torch.device("cpu")) == ""


def test_device_properties_read_as_uuid_and_pci_bus_id(monkeypatch):
    props = {
        0: SimpleNamespace(
            uuid="GPU-42", pci_domain_id=0, pci_bus_id=0x1A, pci_device_id=0
        ),
        1: SimpleNamespace(
            uuid="00000000-0000-0000-0000-000000000000",
            pci_domain_id=1,
            pci_bus_id=0xC1,
            pci_device_id=3,
        ),
        2: SimpleNamespace(uuid="GPU-43"),  # no PCI fields (an older build)
    }
    monkeypatch.undo()  # the real per-device lookups, over these properties
    monkeypatch.setattr(devices, "_properties", props.get)
    raw = [(devices.raw_uuid(i), devices.raw_pci_bus_id(i)) for i in range(4)]
    assert raw == [
        ("GPU-42", "0000:1a:00"),
        ("", "0001:c1:03"),  # an all-zero UUID says nothing
        ("GPU-43", ""),
        ("", ""),  # no such device, or a CPU build
    ]


class Refusing(TcpTransport):
    name = "ipc"

    def open_session(self, client, kv, remote, consumer_id=""):
        raise TransportUnavailable("no peer access")


def producer_peer(transport: str) -> ProducerPeer:
    """A consumer rank's view of a producer, not paired."""
    settings = Settings(role="consumer", model="m", transport=transport)
    kv = PagedKVCache({"l": torch.zeros(2, 8, 16, 2, 8)}, 8)
    return ProducerPeer(
        "127.0.0.1", [1], "e", kv, info("cuda", "h"), settings, None, PDServeStats()
    )


def test_consumer_rank_names_itself_in_its_hello(monkeypatch):
    import pdserve.connector.producer_peer as consumer_module

    said = []

    class Recording(TcpTransport):
        def open_session(self, client, kv, remote, consumer_id=""):
            said.append(consumer_id)
            return ""

    monkeypatch.setattr(consumer_module, "get_transport", lambda name: Recording())
    peer = producer_peer("tcp")
    peer._open_transport(None, info("cuda", "h"), whole=True)
    assert said == [f"{peer.settings.instance_id}/0"]


def test_consumer_without_a_secret_asks_for_no_gpu_direct_transport(monkeypatch):
    import pdserve.connector.producer_peer as consumer_module

    asked = []
    monkeypatch.setattr(
        consumer_module,
        "get_transport",
        lambda name: asked.append(name) or TcpTransport(),
    )
    peer = producer_peer("auto")  # no secret; same host, GPU visible
    peer._open_transport(None, info("cuda", "h"), whole=True)
    assert asked == ["tcp"]


def test_failed_transport_falls_back_to_tcp_and_is_counted(monkeypatch):
    import pdserve.connector.producer_peer as consumer_module

    made = {"ipc": Refusing, "nccl": Refusing, "tcp": TcpTransport}
    monkeypatch.setattr(consumer_module, "get_transport", lambda name: made[name]())
    peer = producer_peer("ipc")
    transport, _ = peer._open_transport(None, info("cuda", "h"), whole=True)
    assert transport.name == "tcp"
    # Counted by the rank's engine thread as it takes the pairing.
    assert peer.setup_fallbacks == 1


def test_some_heads_of_each_block_move_over_tcp_only(monkeypatch):
    import pdserve.connector.producer_peer as consumer_module

    asked = []
    monkeypatch.setattr(
        consumer_module,
        "get_transport",
        lambda name: (
            asked.append(name) or (TcpTransport() if name == "tcp" else Refusing())
        ),
    )
    peer = producer_peer("ipc")
    peer._open_transport(None, info("cuda", "h"), whole=False)
    assert asked == ["tcp"]  # ipc never tried
    peer._open_transport(None, info("cuda", "h"), whole=True)
    assert asked == ["tcp", "ipc", "tcp"]


class Breaking(TcpTransport):
    name = "nccl"

    def healthy(self, session):
        return False


def test_transport_that_breaks_later_is_replaced_by_tcp():
    peer = producer_peer("nccl")
    link = ProducerLink("127.0.0.1", 1, peer.kv, 1)
    pair = peer.pairs[0] = RankPair(info("cuda", "h"), link, Breaking(), "s")
    peer.pump()
    assert pair.transport.name == "tcp" and pair.session == ""
    assert peer.stats.take().data["kv_transport_fallbacks"] == 1


def test_pairings_are_counted_by_the_transport_agreed(closing):
    """``pdserve:kv_pairings_total{transport}`` (what the GPU scripts check):
    each producer rank read from, by its transport, as the rank takes the
    pairing; a producer rank only released to is not read from."""
    rank = side_channel_rank(paged_kv(), 1)
    closing(rank)
    peer = producer_peer("nccl")
    link = ProducerLink("127.0.0.1", 1, peer.kv, 1)
    peer.pairs[0] = RankPair(info("cuda", "h"), link, Breaking(), "s")
    release_only = RankRole(read=False, readers=1, whole=True, heads=None)
    released = RankPair(info("cuda", "h"), link, TcpTransport(), "", release_only)
    peer.pairs[1] = released
    rank.producers._add(peer)
    assert rank.stats.data["kv_pairings"] == {"nccl": 1}
    taken = rank.stats.take()
    assert taken is not None and taken.reduce()["kv_pairings"] == 1


def test_nccl_on_cpu_ranks_is_unavailable():
    from pdserve.transport.nccl import NcclTransport

    kv = PagedKVCache({"l": torch.zeros(2, 8, 16, 2, 8)}, 8)
    with pytest.raises(TransportUnavailable, match="GPUs"):
        NcclTransport().open_session(None, kv, info("cpu", "h"))


def test_ipc_on_cpu_ranks_is_unavailable():
    from pdserve.transport.ipc import IpcTransport

    kv = PagedKVCache({"l": torch.zeros(2, 8, 16, 2, 8)}, 8)
    with pytest.raises(TransportUnavailable, match="GPUs"):
        IpcTransport().open_session(None, kv, info("cuda", "h"))


class Welcoming:
    """A producer rank's side channel that welcomes every hello with ``payload``."""

    host = "127.0.0.1"

    def __init__(self, payload: dict) -> None:
        self.payload = payload
        self.hellos = []

    def hello(self, message):
        self.hellos.append(message)
        return TransportWelcome(ok=True, payload=self.payload)


@pytest.mark.parametrize(
    "producer_gpu",
    [
        pytest.param({"device_uuid": GPU0[0]}, id="older-producer-no-pci"),
        pytest.param(
            {"device_uuid": GPU0[0], "device_pci_bus_id": GPU1[1]}, id="pci-differs"
        ),
        pytest.param({"device_uuid": "", "device_pci_bus_id": GPU0[1]}, id="no-uuid"),
    ],
)
def test_ipc_refuses_a_producer_gpu_it_cannot_tell_apart(producer_gpu):
    """Even when asked for ipc by name: a wrong guess maps another GPU."""
    from pdserve.transport.ipc import IpcTransport

    client = Welcoming(producer_gpu | {"layers": []})
    kv = SimpleNamespace(device=torch.device("cuda", 1))
    with pytest.raises(TransportUnavailable, match="told apart"):
        IpcTransport().open_session(client, kv, info("cuda", "h"), "c1/0")
    assert [h.consumer_id for h in client.hellos] == ["c1/0"]


def test_ipc_refuses_a_duplicate_uuid(gpus):
    from pdserve.transport.ipc import IpcTransport

    gpus[1] = (GPU0[0], GPU1[1])
    client = Welcoming({"device_uuid": GPU0[0], "device_pci_bus_id": GPU0[1]})
    kv = SimpleNamespace(device=torch.device("cuda", 1))
    with pytest.raises(TransportUnavailable, match="told apart"):
        IpcTransport().open_session(client, kv, info("cuda", "h"))


def test_ipc_read_of_a_dropped_session_is_a_connection_error():
    """Not a KeyError out of the engine's step: the link fails that load."""
    from pdserve.transport.ipc import IpcTransport

    kv = PagedKVCache({"l": torch.zeros(2, 8, 16, 2, 8)}, 8)
    with pytest.raises(ConnectionError, match="unknown"):
        IpcTransport().receive(kv, [1], [2], "dropped")


# ---- copies that keep failing ----


class ServedAsTcp(TcpTransport):
    """The producer's end of ``CopyFailing``: the bytes go over tcp."""

    name = "ipc"


class _FailingCopy(Incoming):
    def __init__(self, inner: Incoming) -> None:
        self.inner = inner

    def raw_view(self) -> memoryview | None:
        return self.inner.raw_view()

    def on_raw(self, nbytes: int) -> None:
        self.inner.on_raw(nbytes)

    def poll(self) -> bool:
        raise RuntimeError("HIP error: an illegal memory access was encountered")


class CopyFailing(TcpTransport):
    """A GPU-direct transport whose device copy fails while ``failing``."""

    name = "ipc"

    def __init__(self) -> None:
        self.failing = True
        self.dropped = False

    def receive(self, kv, remote_block_ids, local_block_ids, session, heads=None):
        incoming = super().receive(kv, remote_block_ids, local_block_ids, session)
        return _FailingCopy(incoming) if self.failing else incoming

    def drop_sessions(self) -> None:
        self.dropped = True


@pytest.fixture
def paired(closing):
    """A producer rank's server and a consumer rank paired with it, the
    consumer rank on a ``CopyFailing`` transport."""
    producer = paged_kv()
    server = start_server(producer)
    closing(server)
    server.transports["ipc"] = ServedAsTcp()
    rank = side_channel_rank(empty_like(producer), server.port)
    closing(rank)
    rank.connect()
    pair = only_pair(rank)
    pair.transport, pair.session = CopyFailing(), "s"
    return server, rank


def pull(server, rank, block: int) -> str | None:
    lease = make_lease(f"r{block}", [block], server.port)
    server.leases.grant(lease.request_id, lease.block_ids, lease.prompt_hash)
    return run_load(rank, server, lease, [block])


def test_copies_failing_in_a_row_move_the_rank_to_tcp(paired):
    server, rank = paired
    pair = only_pair(rank)
    flaky = pair.transport
    for block in range(COPY_FAILURES_BEFORE_FALLBACK):
        assert pair.transport is flaky
        assert "ipc copy failed: HIP error" in pull(server, rank, block)

    assert pair.transport.name == "tcp" and pair.session == ""
    assert flaky.dropped
    assert rank.stats.data["kv_transport_fallbacks"] == 1
    assert pull(server, rank, 20) is None  # over tcp now
    assert blocks_equal(server.kv, [20], rank.kv, [20])


def test_a_copy_that_fails_while_polled_releases_its_lease(paired):
    """The producer lets the blocks go now, not when the lease expires."""
    server, rank = paired
    assert "ipc copy failed: HIP error" in pull(server, rank, 3)
    eventually(
        lambda: len(server.leases) == 0,
        5,
        "the release (not the lease's expiry)",
        step=lambda: steps(rank, server),
    )
    assert server.leases.take_released() == 1


def test_a_good_copy_starts_the_count_again(paired):
    server, rank = paired
    pair = only_pair(rank)
    flaky = pair.transport
    outcomes = [False] * (COPY_FAILURES_BEFORE_FALLBACK - 1) + [True]
    outcomes += [False] * (COPY_FAILURES_BEFORE_FALLBACK - 1)
    for block, succeeds in enumerate(outcomes):
        flaky.failing = not succeeds
        assert (pull(server, rank, block) is None) == succeeds

    assert pair.transport is flaky and not flaky.dropped
    assert rank.stats.data["kv_transport_fallbacks"] == 0
    assert pull(server, rank, 30) is not None  # the limit in a row: given up
    assert pair.transport.name == "tcp"


def test_failures_that_are_not_the_copys_do_not_count(paired):
    """Reads the producer refuses say nothing about the transport."""
    server, rank = paired
    pair = only_pair(rank)
    flaky = pair.transport
    for block in range(COPY_FAILURES_BEFORE_FALLBACK):
        lease = make_lease(f"never-granted-{block}", [block], server.port)
        assert "producer refused the read" in run_load(rank, server, lease, [block])

    assert pair.transport is flaky
    assert rank.stats.data["kv_transport_fallbacks"] == 0


class SessionGone(CopyFailing):
    """Its session was dropped under a read in flight: no copy can start."""

    payload_on_channel = False  # served by the real IpcTransport below

    def receive(self, kv, remote_block_ids, local_block_ids, session, heads=None):
        raise ConnectionError("ipc session is unknown")


def test_copy_that_cannot_start_fails_only_its_own_load(paired):
    """A GPU-direct read has no bytes on the side channel: its connection
    and the other loads on it go on, and the lease is released."""
    from pdserve.transport.ipc import IpcTransport

    server, rank = paired
    server.transports["ipc"] = IpcTransport()  # answers, sends no bytes
    pair = only_pair(rank)
    pair.transport = SessionGone()
    assert "ipc copy failed: ipc session is unknown" in pull(server, rank, 1)
    link = pair.link
    channel = link.channel
    # The release is on its way.
    eventually(server.leases.take_released, 5, "the release", step=server.step)

    for block in range(2, 1 + COPY_FAILURES_BEFORE_FALLBACK):
        assert pull(server, rank, block) is not None
    assert pair.transport.name == "tcp"
    assert pull(server, rank, 9) is None
    assert link.channel is channel
