"""Several producers behind one consumer: which one a request goes to,
failover to the next and then to a local prefill, health, producers that
join and leave through DNS, incompatible ones."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any

import msgspec
import pytest
from aiohttp import web

from pdserve import metrics
from pdserve.frontend import producer_health, producer_pool
from pdserve.frontend.prefill_demand import (
    AFFINITY_PREFIX_CHARS,
    Demand,
    demand_of,
)
from pdserve.frontend.producer_pool import Producer, ProducerPool
from pdserve.frontend.producer_source import ProducerSource
from pdserve.frontend.remote_prefill import RemotePrefill
from pdserve.lease import Lease
from tests.eventually import eventually_async
from tests.unit.http_fakes import (
    CONSUMER,
    FakeProducer,
    fake_producer,
    make_lease,
    run,
    use_node,
)

COMPLETIONS = "/v1/completions"


def lease_answer(payload: dict) -> dict:
    return {"kv_transfer_params": make_lease().to_params()}


def status(code: int):
    return lambda payload: web.Response(status=code)


def failovers(reason: str) -> float:
    return metrics.PRODUCER_FAILOVERS.labels(reason=reason)._value.get()


def local_prefills(reason: str) -> float:
    return metrics.LOCAL_PREFILLS.labels(reason=reason)._value.get()


def health_probes(producer: FakeProducer) -> int:
    return sum(path == "/health" for path, _ in producer.gets)


def counted_lookups(monkeypatch) -> list[str]:
    """The URL of each producer lookup (a resolution), as they happen."""
    lookups: list[str] = []
    resolve = ProducerSource.resolve

    async def counted(self: ProducerSource) -> list[str]:
        lookups.append(self.url)
        return await resolve(self)

    monkeypatch.setattr(ProducerSource, "resolve", counted)
    return lookups


@pytest.fixture(autouse=True)
def quick(monkeypatch):
    """Short probe and resolve intervals; a node key for signing."""
    monkeypatch.setattr(producer_health, "HEALTH_PROBE_SECONDS", 0.05)
    monkeypatch.setattr(producer_pool, "RESOLVE_SECONDS", 0.05)
    use_node(monkeypatch, CONSUMER)


@contextlib.asynccontextmanager
async def producers(
    count: int, answer=lease_answer
) -> AsyncIterator[list[FakeProducer]]:
    async with contextlib.AsyncExitStack() as stack:
        yield [
            await stack.enter_async_context(fake_producer(answer)) for _ in range(count)
        ]


@contextlib.asynccontextmanager
async def consumer(urls: list[str], **settings: Any) -> AsyncIterator[RemotePrefill]:
    config = msgspec.structs.replace(CONSUMER, producer_urls=urls, **settings)
    prefill = RemotePrefill(config)
    try:
        await prefill.pool.ready()
        yield prefill
    finally:
        await prefill.close()


def by_url(prefill: RemotePrefill, fake: FakeProducer) -> Producer:
    [producer] = [p for p in prefill.pool.producers() if p.url == fake.url]
    return producer


def prompt_for(prefill: RemotePrefill, fake: FakeProducer, tag: str = "") -> dict:
    """A completion whose prefix ranks ``fake`` first."""
    for i in range(1000):
        payload = {"prompt": f"{tag}prompt {i} " + "x" * 40}
        if prefill.pool.order(demand_of(payload))[0].url == fake.url:
            return payload
    raise AssertionError("no prompt prefers this producer")


async def ask(prefill: RemotePrefill, payload: dict, **kwargs: Any) -> Lease | None:
    return (await prefill.ask(COMPLETIONS, payload, **kwargs)).lease


# --- the demand estimate ------------------------------------------------------


def test_work_is_tokens_when_known_else_characters_over_four():
    assert demand_of({"prompt": "x" * 400}).work == 100
    assert demand_of({"prompt": list(range(37))}).work == 37
    assert demand_of({"prompt": [list(range(5))]}).work == 5
    assert demand_of({"prompt": "x" * 400}, prompt_tokens=7).work == 7


def test_affinity_key_is_the_prompts_beginning():
    long = "a" * AFFINITY_PREFIX_CHARS
    assert demand_of({"prompt": long + "b"}).affinity_key == (
        demand_of({"prompt": long + "c"}).affinity_key
    )
    chat = {"messages": [{"role": "system", "content": "You help."}]}
    assert b"You help." in demand_of(chat).affinity_key


# --- choosing -----------------------------------------------------------------


def test_least_outstanding_work_wins(monkeypatch):
    # No slack, no factor: the preferred producer must be among the least busy.
    monkeypatch.setattr(producer_pool, "AFFINITY_SLACK_TOKENS", 0.0)
    monkeypatch.setattr(producer_pool, "AFFINITY_LOAD_FACTOR", 1.0)

    async def scenario() -> None:
        async with producers(2) as (a, b), consumer([a.url, b.url]) as prefill:
            payload = prompt_for(prefill, a)
            with prefill.pool.sending(by_url(prefill, a), Demand(50, b"")):
                assert (await ask(prefill, payload)).kv_host == "127.0.0.1"
            assert (len(a.requests), len(b.requests)) == (0, 1)
            await ask(prefill, payload)  # a is idle again: affinity holds
            assert (len(a.requests), len(b.requests)) == (1, 1)

    run(scenario())


def test_same_prefix_same_producer_and_prefixes_spread():
    async def scenario() -> None:
        async with producers(2) as (a, b), consumer([a.url, b.url]) as prefill:
            shared = "s" * AFFINITY_PREFIX_CHARS
            for i in range(6):
                await ask(prefill, {"prompt": f"{shared} question {i}"})
            assert sorted([len(a.requests), len(b.requests)]) == [0, 6]
            for i in range(30):
                await ask(prefill, {"prompt": f"{i} unrelated prompt"})
            assert len(a.requests) > 0 and len(b.requests) > 0

    run(scenario())


def test_affinity_yields_to_an_overloaded_producer():
    release = asyncio.Event()

    async def slow(payload: dict) -> dict:
        await release.wait()
        return lease_answer(payload)

    async def scenario() -> None:
        async with producers(2, slow) as (a, b), consumer([a.url, b.url]) as prefill:
            payload = prompt_for(prefill, a)
            big = producer_pool.AFFINITY_SLACK_TOKENS + 1
            held = asyncio.ensure_future(ask(prefill, payload, prompt_tokens=big))
            await eventually_async(lambda: a.requests, 5, "the big prefill at a")
            # Same prefix, but a holds more than 2x b's work + the slack.
            second = asyncio.ensure_future(ask(prefill, payload, prompt_tokens=10))
            await eventually_async(lambda: b.requests, 5, "the second one at b")
            release.set()
            assert await held is not None and await second is not None
            assert (len(a.requests), len(b.requests)) == (1, 1)

    run(scenario())


def test_saturated_when_every_healthy_producer_is_busy():
    async def scenario() -> None:
        urls = []
        async with producers(2) as fakes:
            urls = [f.url for f in fakes]
            async with consumer(urls, producer_saturation_requests=1) as prefill:
                pool = prefill.pool
                first, second = pool.producers()
                assert not pool.saturated()
                with contextlib.ExitStack() as busy:
                    for _ in range(2):
                        busy.enter_context(pool.sending(first, Demand(1, b"")))
                    assert not pool.saturated()
                    for _ in range(2):
                        busy.enter_context(pool.sending(second, Demand(1, b"")))
                    assert pool.saturated()
                assert not pool.saturated()

    run(scenario())


# --- failover -----------------------------------------------------------------


def test_failover_to_the_next_producer_then_local():
    async def scenario() -> None:
        async with contextlib.AsyncExitStack() as stack:
            a = await stack.enter_async_context(fake_producer(status(503)))
            b = await stack.enter_async_context(fake_producer(lease_answer))
            prefill = await stack.enter_async_context(consumer([a.url, b.url]))
            payload = prompt_for(prefill, a)
            before = failovers("http_5xx")
            lease = await ask(prefill, payload)
            assert lease is not None and len(b.requests) == 1
            assert failovers("http_5xx") == before + 1
            assert by_url(prefill, a).health.down

            # a recovers; b dies (connection refused): failover the other way.
            a.health = 503
            unreachable = failovers("unreachable")
            local = local_prefills("all_producers_failed")
            b_payload = prompt_for(prefill, b, "b")
            await stack.aclose()  # both fakes stop
            assert await ask(prefill, b_payload) is None
            assert failovers("unreachable") == unreachable + 1
            assert local_prefills("all_producers_failed") == local + 1

    run(scenario())


def test_every_producer_fails_means_local_prefill():
    async def scenario() -> None:
        async with (
            producers(2, status(502)) as (a, b),
            consumer([a.url, b.url]) as prefill,
        ):
            # Their probes must not bring them back mid-test (a slow run).
            a.health = b.health = 503
            before = failovers("http_5xx")
            local = local_prefills("all_producers_failed")
            assert await ask(prefill, {"prompt": "hello"}) is None
            assert (len(a.requests), len(b.requests)) == (1, 1)
            assert failovers("http_5xx") == before + 2
            assert local_prefills("all_producers_failed") == local + 1
            # Both known down now: no producer is even tried.
            down = local_prefills("producer_down")
            assert await ask(prefill, {"prompt": "again"}) is None
            assert local_prefills("producer_down") == down + 1
            assert (len(a.requests), len(b.requests)) == (1, 1)

    run(scenario())


def test_4xx_is_the_requests_fault_no_failover():
    async def scenario() -> None:
        async with contextlib.AsyncExitStack() as stack:
            a = await stack.enter_async_context(fake_producer(status(400)))
            b = await stack.enter_async_context(fake_producer(lease_answer))
            prefill = await stack.enter_async_context(consumer([a.url, b.url]))
            payload = prompt_for(prefill, a)
            before = {r: failovers(r) for r in ("http_5xx", "unreachable")}
            local = local_prefills("producer_http_4xx")
            assert await ask(prefill, payload) is None
            assert local_prefills("producer_http_4xx") == local + 1
            assert {r: failovers(r) for r in before} == before
            assert b.requests == [] and not by_url(prefill, a).health.down

    run(scenario())


def test_down_producer_skipped_until_its_health_recovers():
    async def scenario() -> None:
        async with contextlib.AsyncExitStack() as stack:
            a = await stack.enter_async_context(fake_producer(status(500)))
            b = await stack.enter_async_context(fake_producer(lease_answer))
            prefill = await stack.enter_async_context(consumer([a.url, b.url]))
            payload = prompt_for(prefill, a)
            a.health = 503
            await ask(prefill, payload)
            assert by_url(prefill, a).health.down
            for _ in range(3):
                assert (await ask(prefill, payload)) is not None
            assert (len(a.requests), len(b.requests)) == (1, 4)
            probes = health_probes(a)
            await eventually_async(
                lambda: health_probes(a) >= probes + 2, 5, "two more probes"
            )
            assert by_url(prefill, a).health.down  # they failed: still down

            a.answer, a.health = lease_answer, 200
            await eventually_async(
                lambda: not by_url(prefill, a).health.down, 5, "a up again"
            )
            assert (await ask(prefill, payload)) is not None
            assert (len(a.requests), len(b.requests)) == (2, 4)
            assert any(path == "/health" for path, _ in a.gets)

    run(scenario())


def test_lease_is_signed_for_the_producer_it_came_from():
    async def scenario() -> None:
        async with producers(1) as (a,), consumer([a.url]) as prefill:
            before = metrics.REMOTE_PREFILLS.labels(producer=by_url(prefill, a).key)
            count = before._value.get()
            lease = await ask(prefill, {"prompt": "hi"})
            assert lease is not None and lease.kv_host == "127.0.0.1"
            assert lease.verified(prefill._key)
            assert before._value.get() == count + 1

    run(scenario())


# --- membership ---------------------------------------------------------------


def test_producers_follow_the_name(monkeypatch):
    addresses = ["127.0.0.1"]

    async def resolve(self: ProducerSource) -> list[str]:
        return list(addresses)

    monkeypatch.setattr(ProducerSource, "resolve", resolve)

    async def wait_for(prefill: RemotePrefill, count: int) -> None:
        await eventually_async(
            lambda: len(prefill.pool.producers()) == count, 5, f"{count} producers"
        )

    async def scenario() -> None:
        async with fake_producer(lease_answer) as first:
            port = int(first.url.rsplit(":", 1)[1])
            try:
                second_context = fake_producer(lease_answer, "127.0.0.2", port)
                second = await second_context.__aenter__()
            except OSError:
                pytest.skip("cannot listen on 127.0.0.2 here")
            try:
                url = f"http://producers.test:{port}"
                async with consumer([url]) as prefill:
                    assert [p.address for p in prefill.pool.producers()] == [
                        "127.0.0.1"
                    ]
                    addresses.append("127.0.0.2")
                    await wait_for(prefill, 2)
                    for i in range(20):
                        await ask(prefill, {"prompt": f"{i} spread"})
                    assert first.requests and second.requests
                    for fake in (first, second):
                        hosts = {h["Host"] for _, _, h in fake.requests}
                        assert hosts == {f"producers.test:{port}"}
                    addresses.remove("127.0.0.1")
                    await wait_for(prefill, 1)
                    served = len(first.requests)
                    for i in range(5):
                        lease = await ask(prefill, {"prompt": f"{i} after"})
                        assert lease is not None and lease.kv_host == "127.0.0.2"
                    assert len(first.requests) == served
            finally:
                await second_context.__aexit__(None, None, None)

    run(scenario())


def test_incompatible_producer_is_never_used(pdserve_log, monkeypatch):
    lookups = counted_lookups(monkeypatch)

    async def scenario() -> None:
        async with producers(2) as (a, b):
            b.metadata = dict(b.metadata, model="another/model")
            async with consumer([a.url, b.url]) as prefill:
                assert [p.url for p in prefill.pool.producers()] == [a.url]
                for i in range(10):
                    await ask(prefill, {"prompt": f"{i} prompt"})
                seen = len(lookups)
                await eventually_async(
                    lambda: len(lookups) >= seen + 4, 5, "two more lookups of each"
                )
                assert len(a.requests) == 10 and b.requests == []
                assert [p.url for p in prefill.pool.producers()] == [a.url]

    run(scenario())
    assert "will not be used" in pdserve_log.text
    assert "another/model" in pdserve_log.text
    # Logged once, not at every lookup.
    logged = {
        id(r) for r in pdserve_log.records if "will not be used" in r.getMessage()
    }
    assert len(logged) == 1


def test_no_producer_reachable_means_local_prefill():
    async def scenario() -> None:
        async with producers(1) as (a,):
            url = a.url
        async with consumer([url]) as prefill:
            before = local_prefills("no_producer")
            assert await ask(prefill, {"prompt": "hi"}) is None
            assert local_prefills("no_producer") == before + 1

    run(scenario())


def test_idle_connection_is_not_reused_once_the_producer_may_close_it(monkeypatch):
    """vLLM's server closes a connection idle for its keep-alive (5 s); a
    call sent on it as it closes failed as unreachable and marked the
    producer down (CI: a request prefilled locally after a pause)."""
    monkeypatch.setattr(producer_pool, "PRODUCER_KEEPALIVE_SECONDS", 0.1)

    async def scenario() -> None:
        async with producers(1) as (a,):
            a.keep_alive = 0.3
            async with consumer([a.url]) as prefill:
                assert await ask(prefill, {"prompt": "hi"}) is not None
                failed = failovers("unreachable")
                # The pause is what is tested: longer than the producer's
                # keep-alive, so its connection would be closing now.
                await asyncio.sleep(0.4)
                assert await ask(prefill, {"prompt": "hi again"}) is not None
                assert failovers("unreachable") == failed
                assert a.dropped == 0

    run(scenario())


def test_pool_is_described_for_the_metadata_route():
    async def scenario() -> None:
        async with producers(1) as (a,), consumer([a.url]) as prefill:
            [entry] = prefill.pool.describe()
            assert entry["producer"] == a.url.removeprefix("http://")
            assert entry["instance_id"] == a.metadata["instance_id"]
            assert entry["down"] is False

    run(scenario())


def test_pool_needs_no_running_loop_to_be_made():
    # The middleware makes it in vLLM's app factory.
    pool = ProducerPool(CONSUMER)
    assert pool.producers() == []


def test_one_producer_under_two_addresses_counts_once():
    """A dual-stack name (IPv4 and IPv6) or two URLs of one producer: one
    instance id, one producer (else it takes twice its share)."""

    async def scenario() -> None:
        async with producers(2) as (a, b):
            b.metadata = dict(a.metadata)
            async with consumer([a.url, b.url]) as prefill:
                await prefill.pool.ready()
                assert len(prefill.pool.producers()) == 1

    run(scenario())


# --- refusals -----------------------------------------------------------------


def test_lease_cap_refusal_prefills_here_at_once():
    refused = {"kv_transfer_params": {"pdserve_refused": "lease_cap"}}

    async def scenario() -> None:
        async with contextlib.AsyncExitStack() as stack:
            a = await stack.enter_async_context(fake_producer(lambda _: refused))
            b = await stack.enter_async_context(fake_producer(lease_answer))
            prefill = await stack.enter_async_context(consumer([a.url, b.url]))
            payload = prompt_for(prefill, a)
            before = sum(failovers(r) for r in ("timeout", "http_5xx", "unreachable"))
            local = local_prefills("producer_lease_cap")
            assert await ask(prefill, payload) is None
            assert local_prefills("producer_lease_cap") == local + 1
            # No failover: the next producer is not asked, a stays up.
            assert b.requests == [] and not by_url(prefill, a).health.down
            after = sum(failovers(r) for r in ("timeout", "http_5xx", "unreachable"))
            assert after == before

    run(scenario())


# --- a producer that stops answering ------------------------------------------


def never_answers(gate: asyncio.Event):
    async def answer(payload: dict) -> dict:
        await gate.wait()
        return lease_answer(payload)

    return answer


def test_hung_producer_is_abandoned_in_time_for_the_next():
    """The first producer never answers: its attempt ends at its share of
    the budget, and the next producer still has time to lease."""
    gate = asyncio.Event()

    async def scenario() -> None:
        async with contextlib.AsyncExitStack() as stack:
            a = await stack.enter_async_context(fake_producer(never_answers(gate)))
            b = await stack.enter_async_context(fake_producer(lease_answer))
            prefill = await stack.enter_async_context(
                consumer([a.url, b.url], prefill_timeout=3.0)
            )
            stack.callback(gate.set)  # first out: lets a's handlers end
            payload = prompt_for(prefill, a)
            timeouts = failovers("timeout")
            lease = await ask(prefill, payload)
            assert lease is not None
            assert (len(a.requests), len(b.requests)) == (1, 1)
            assert failovers("timeout") == timeouts + 1
            hung = by_url(prefill, a)
            assert hung.health.down and hung.health.hung
            # Later requests skip it.
            assert await ask(prefill, payload) is not None
            assert (len(a.requests), len(b.requests)) == (1, 2)

    run(scenario())


def test_hung_producer_is_back_only_once_it_answers_work(monkeypatch):
    """/health says 200 all along (vLLM answers it while its engine is
    stuck): only a real completion, with this node's key, brings it back."""
    monkeypatch.setattr(producer_health, "WORK_PROBE_SECONDS", 0.1)
    gate = asyncio.Event()

    async def scenario() -> None:
        async with contextlib.AsyncExitStack() as stack:
            a = await stack.enter_async_context(fake_producer(never_answers(gate)))
            b = await stack.enter_async_context(fake_producer(lease_answer))
            prefill = await stack.enter_async_context(
                consumer([a.url, b.url], prefill_timeout=3.0)
            )
            stack.callback(gate.set)
            await prefill.pool.ready("sk-own")
            payload = prompt_for(prefill, a)
            assert await ask(prefill, payload, api_key="sk-own") is not None
            hung = by_url(prefill, a)
            assert hung.health.hung
            # Probes time out; its /health answering 200 does not count.
            await eventually_async(lambda: len(a.bodies) >= 3, 5, "two work probes")
            assert hung.health.down
            assert not any(path == "/health" for path, _ in a.gets)

            gate.set()  # the engine answers again
            await eventually_async(lambda: not hung.health.down, 5, "a back")
            assert not hung.health.hung
            probes = [
                (body, headers)
                for (path, body, headers) in a.requests
                if body.get("max_tokens") == 1 and "kv_transfer_params" not in body
            ]
            assert probes and all(
                h["Authorization"] == "Bearer sk-own" for _, h in probes
            )
            assert await ask(prefill, payload, api_key="sk-own") is not None
            assert len(b.requests) == 1  # a took it again

    run(scenario())


# --- producers absent when the consumer starts ---------------------------------


def test_producer_absent_at_start_joins_when_it_comes_up():
    async def scenario() -> None:
        async with producers(1) as (gone,):
            url = gone.url  # nothing listens there any more
        port = int(url.rsplit(":", 1)[1])
        async with consumer([url]) as prefill:
            before = local_prefills("no_producer")
            assert await ask(prefill, {"prompt": "hi"}) is None
            assert local_prefills("no_producer") == before + 1
            assert prefill.pool.state()["remote_prefill"] is False
            async with fake_producer(lease_answer, port=port) as late:
                await eventually_async(
                    prefill.pool.producers, 5, "the producer to join"
                )
                assert await ask(prefill, {"prompt": "hi"}) is not None
                assert len(late.requests) == 1
                assert prefill.pool.state() == {
                    "producers_known": 1,
                    "producers_usable": 1,
                    "remote_prefill": True,
                }

    run(scenario())


def test_attempts_are_bounded_by_measured_calls(monkeypatch):
    """Once calls were measured, an attempt that is not the last is bounded
    by them (down to the floor), not by half the budget."""
    from pdserve.frontend import attempt_timeout as rule
    from pdserve.frontend import remote_prefill

    used: list[tuple[int, float | None, float]] = []

    def spy(remaining, left, budget, bound):
        timeout = rule.attempt_timeout(remaining, left, budget, bound)
        used.append((left, bound, timeout))
        return timeout

    monkeypatch.setattr(remote_prefill, "attempt_timeout", spy)

    async def scenario() -> None:
        async with (
            producers(2) as (a, b),
            consumer([a.url, b.url], prefill_timeout=60.0) as prefill,
        ):
            for i in range(rule.MIN_SAMPLES + 1):
                assert await ask(prefill, {"prompt": f"{i} p"}) is not None
            first, last = used[0], used[-1]
            assert first == (2, None, pytest.approx(30.0, abs=0.1))
            # Fast calls: the floor, a quarter of the budget.
            assert last[0] == 2 and last[1] is not None and last[1] < 1.0
            assert last[2] == 60.0 * rule.FLOOR_FRACTION

    run(scenario())


# --- pairing and instances ---------------------------------------------------


def test_producer_is_used_only_once_every_rank_paired(tmp_path):
    """Admitted by its metadata, a producer is published for this node's
    ranks to pair with, and sent work only once all of them have."""
    from pdserve.pairings import PeerState, RankPairings, targets_reader, write_rank

    async def scenario() -> None:
        async with (
            producers(1) as (fake,),
            consumer(
                [fake.url], run_dir=str(tmp_path), tensor_parallel_size=2
            ) as prefill,
        ):
            (target,) = targets_reader(str(tmp_path)).read()
            assert target.instance_id == fake.metadata["instance_id"]
            assert prefill.pool.healthy() == []
            assert await ask(prefill, {"prompt": "p"}) is None
            write_rank(str(tmp_path), RankPairings(0, [PeerState(target, True)]))
            assert prefill.pool.healthy() == []  # rank 1 has not paired yet
            write_rank(str(tmp_path), RankPairings(1, [PeerState(target, True)]))
            assert [p.url for p in prefill.pool.healthy()] == [fake.url]
            assert await ask(prefill, {"prompt": "p"}) is not None

    run(scenario())


def test_producer_no_rank_can_pair_with_is_dropped_saying_why(tmp_path, caplog):
    from pdserve.pairings import PeerState, RankPairings, targets_reader, write_rank

    async def scenario() -> None:
        async with (
            producers(1) as (fake,),
            consumer([fake.url], run_dir=str(tmp_path)) as prefill,
        ):
            (target,) = targets_reader(str(tmp_path)).read()
            error = "KV cache dtype: consumer='auto' producer='fp8_e5m2'"
            state = PeerState(target, False, error, incompatible=True)
            write_rank(str(tmp_path), RankPairings(0, [state]))
            with caplog.at_level(logging.ERROR):
                assert prefill.pool.healthy() == []
            assert prefill.pool.producers() == []
            assert "fp8_e5m2" in caplog.text

    run(scenario())


def test_restarted_producer_is_dropped_then_admitted_again():
    """A lease of a new instance at a known address: not used (this node
    never paired with it), the producer is looked up and paired again."""

    async def scenario() -> None:
        async with producers(1) as (fake,), consumer([fake.url]) as prefill:
            first = fake.metadata["instance_id"]
            fake.metadata = dict(fake.metadata, instance_id="restarted")
            fake.answer = lambda p: {
                "kv_transfer_params": make_lease(instance_id="restarted").to_params()
            }
            assert await ask(prefill, {"prompt": "p"}) is None
            assert len(prefill.stray_leases) == 1  # handed back by the caller
            await prefill.pool.refresh()
            (producer,) = prefill.pool.producers()
            assert producer.instance_id == "restarted" != first
            assert await ask(prefill, {"prompt": "p"}) is not None

    run(scenario())


def test_load_balanced_url_is_detected_and_left(caplog):
    """Two instances behind one address answer in turn: every lease would
    be from an instance never paired with. Detected, logged, not used."""

    async def scenario() -> None:
        async with producers(1) as (fake,), consumer([fake.url]) as prefill:
            a = fake.metadata["instance_id"]
            instance_ids = iter(["b", a])
            fake.answer = lambda p: {
                "kv_transfer_params": make_lease(
                    instance_id=next(instance_ids)
                ).to_params()
            }
            fake.metadata = dict(fake.metadata, instance_id="b")
            assert await ask(prefill, {"prompt": "p"}) is None  # b: a restart?
            await prefill.pool.refresh()
            with caplog.at_level(logging.ERROR):
                assert await ask(prefill, {"prompt": "p"}) is None  # a again
            assert "several instances" in caplog.text
            await prefill.pool.refresh()
            assert prefill.pool.producers() == []

    run(scenario())
