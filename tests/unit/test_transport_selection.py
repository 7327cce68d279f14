"""Which transport a consumer rank uses, and the fallback to tcp."""

from __future__ import annotations

import pytest
import torch

from pdserve.connector.consumer_rank import ConsumerRank
from pdserve.kv_cache import PagedKVCache
from pdserve.protocol import RankInfo
from pdserve.settings import Settings
from pdserve.transport import TransportUnavailable, candidates
from pdserve.transport.tcp import TcpTransport


def info(device: str, host: str) -> RankInfo:
    return RankInfo(
        pdserve_version="v", protocol_version=1, vllm_version="v", model="m",
        dtype="bfloat16", tp_size=1, tp_rank=0, block_size=16, num_blocks=8,
        layers=[], transports=["tcp"], device=device, host_id=host,
    )  # fmt: skip


@pytest.mark.parametrize(
    ("requested", "local", "remote", "expected"),
    [
        ("auto", info("cuda", "h1"), info("cuda", "h1"), ["ipc", "nccl", "tcp"]),
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
    assert candidates(requested, local, remote) == expected


class Refusing(TcpTransport):
    name = "ipc"

    def open_session(self, client, kv, remote):
        raise TransportUnavailable("no peer access")


def consumer_rank(transport: str) -> ConsumerRank:
    settings = Settings(
        role="consumer", model="m", transport=transport, producer_kv_host="127.0.0.1"
    )
    kv = PagedKVCache({"l": torch.zeros(2, 8, 16, 2, 8)}, 8)
    return ConsumerRank(settings, kv, info("cuda", "h"), 0, None)


def test_failed_transport_falls_back_to_tcp_and_is_counted(monkeypatch):
    import pdserve.connector.consumer_rank as consumer_module

    made = {"ipc": Refusing, "nccl": Refusing, "tcp": TcpTransport}
    monkeypatch.setattr(consumer_module, "get_transport", lambda name: made[name]())
    rank = consumer_rank("ipc")
    transport, _ = rank._open_transport(None, info("cuda", "h"))
    assert transport.name == "tcp"
    assert rank.stats.take().data["kv_transport_fallbacks"] == 1


class Breaking(TcpTransport):
    name = "nccl"

    def healthy(self, session):
        return False


def test_transport_that_breaks_later_is_replaced_by_tcp():
    rank = consumer_rank("nccl")
    rank.transport, rank.session = Breaking(), "s"
    rank.poll()
    assert rank.transport.name == "tcp" and rank.session == ""
    assert rank.stats.take().data["kv_transport_fallbacks"] == 1


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
