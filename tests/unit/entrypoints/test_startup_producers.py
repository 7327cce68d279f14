"""The consumer's producers at startup: every URL and every address of a
name, started with the compatible reachable ones, refused on any
incompatible one."""

from __future__ import annotations

import pytest

from pdserve.entrypoints import startup_producers
from pdserve.entrypoints.startup_producers import find_producers
from pdserve.frontend import producer_metadata as metadata_fetch
from pdserve.frontend.producer_source import ProducerSource
from pdserve.incompatible import IncompatibleProducer
from pdserve.settings import Settings
from tests.unit.http_fakes import producer_metadata

NAMES = {"svc": ["10.0.0.1", "10.0.0.2"], "one": ["10.0.0.9"]}


@pytest.fixture
def network(monkeypatch):
    """Metadata by base URL; an address missing from it is down."""
    answers: dict[str, dict] = {}
    asked: list[tuple[str, str | None]] = []

    def fetch(url: str, timeout: float, headers=None) -> dict:
        asked.append((url, (headers or {}).get("Host")))
        if url not in answers:
            raise ConnectionRefusedError("down")
        return answers[url]

    def resolve(self: ProducerSource) -> list[str]:
        if self.hostname not in NAMES:
            return [self.hostname]
        return NAMES[self.hostname]

    monkeypatch.setattr(metadata_fetch, "fetch_metadata_once", fetch)
    monkeypatch.setattr(ProducerSource, "resolve_blocking", resolve)
    monkeypatch.setattr(startup_producers, "HANDSHAKE_RETRY_SECONDS", 0.01)
    return answers, asked


def consumer(*urls: str, timeout: float = 0.3) -> Settings:
    return Settings(
        role="consumer", model="m", producer_urls=list(urls), connect_timeout=timeout
    )


def test_every_address_of_a_name_is_a_producer(network):
    answers, asked = network
    answers["http://10.0.0.1:80"] = producer_metadata(kv_ports=[7001])
    answers["http://10.0.0.2:80"] = producer_metadata(kv_ports=[7002])
    found = find_producers(consumer("http://svc"), {})
    assert [(f.endpoint.address, f.metadata.kv_ports) for f in found] == [
        ("10.0.0.1", [7001]),
        ("10.0.0.2", [7002]),
    ]
    assert {host for _, host in asked} == {"svc"}


def test_starts_with_the_reachable_ones(network):
    answers, _ = network
    answers["http://10.0.0.9:8000"] = producer_metadata()
    found = find_producers(consumer("http://svc", "http://one:8000"), {})
    assert [f.endpoint.key for f in found] == ["10.0.0.9:8000"]


def test_https_is_called_by_its_name(network):
    answers, asked = network
    answers["https://svc:8443"] = producer_metadata()
    [found] = find_producers(consumer("https://svc:8443"), {})
    assert found.endpoint.address == "10.0.0.1"
    assert asked == [("https://svc:8443", None)]


def test_any_incompatible_producer_refuses_the_start(network):
    answers, _ = network
    answers["http://10.0.0.1:80"] = producer_metadata()
    answers["http://10.0.0.2:80"] = producer_metadata(model="other")
    with pytest.raises(IncompatibleProducer) as exc:
        find_producers(consumer("http://svc"), {})
    assert "10.0.0.2:80" in str(exc.value)
    assert "model: consumer='m' producer='other'" in str(exc.value)


def test_none_reachable_starts_without_producers(network, pdserve_log):
    assert find_producers(consumer("http://svc", timeout=0.1), {}) == []
    assert "No producer (http://svc) reachable within 0s" in pdserve_log.text
    assert "prefilled locally until a producer joins" in pdserve_log.text


def test_incompatible_still_refuses_after_a_wait(network, monkeypatch):
    """One that answers late, but incompatible, still stops the start."""
    calls = 0

    def late(url, timeout, headers=None):
        nonlocal calls
        calls += 1
        if calls < 3:
            raise ConnectionRefusedError("not yet")
        return producer_metadata(model="other")

    monkeypatch.setattr(metadata_fetch, "fetch_metadata_once", late)
    with pytest.raises(IncompatibleProducer, match="model: consumer='m'"):
        find_producers(consumer("http://one:8000", timeout=5), {})
