"""benchmarks/load_with_aborts.py at small scale against the session cluster:
with a third of the clients leaving early, nothing is 5xx, every other
request completes, both nodes end idle and no lease expires."""

from __future__ import annotations

from benchmarks.load_with_aborts import run_load, table

REQUESTS = 40
CONCURRENCY = 8
ABORT_FRACTION = 0.3


def test_load_with_aborts(cluster):
    result = run_load(
        cluster.consumer.url,
        cluster.producer.url,
        REQUESTS,
        CONCURRENCY,
        ABORT_FRACTION,
        max_tokens=24,
        max_prompt_len=400,
        seed=1,
    )
    print(table(result))
    assert result.aborts == round(REQUESTS * ABORT_FRACTION)
    assert result.server_errors == 0
    assert result.errors == 0
    # Every client that stayed got its whole answer. (A client that meant to
    # leave 0-0.2 s after sending may have had all of it by then: counted
    # among the aborts, it is not among these.)
    assert sum(o.done for o in result.outcomes if not o.aborted) == (
        REQUESTS - result.aborts
    )
    for node, state in result.after.items():
        assert state.idle, f"{node}: {state}"
    assert result.counters["leases_expired"] == 0
    # Every lease the consumer took ended by release (some twice: a second
    # release of an ended lease is not counted).
    assert result.counters["leases_released"] == result.counters["remote_prefills"]
    assert result.problems() == []
