"""The tests' one wait: it returns what held, steps between tries, and fails
naming what it waited for and what it saw last."""

from __future__ import annotations

import asyncio
import itertools

import pytest

from tests.eventually import Equal, eventually, eventually_async


def test_returns_the_first_truthy_value_stepping_between_tries():
    count = itertools.count()
    steps = []
    got = eventually(
        lambda: next(count) >= 3 and "done", 5, "try 3", step=lambda: steps.append(1)
    )
    assert got == "done"
    assert len(steps) == 3  # after each of the three tries that failed


def test_times_out_naming_what_and_the_last_value():
    with pytest.raises(AssertionError) as failed:
        eventually(lambda: Equal([1, 0], [0, 0]), 0.02, "both to let go")
    message = str(failed.value)
    assert "both to let go" in message
    assert "Equal(got=[1, 0], want=[0, 0])" in message


def test_async_waits_on_the_loop_for_coroutines_too():
    async def scenario() -> str:
        flag = asyncio.Event()
        asyncio.get_running_loop().call_later(0.01, flag.set)

        async def is_set() -> bool:
            return flag.is_set()

        await eventually_async(is_set, 5, "the flag")
        with pytest.raises(AssertionError, match="never; last seen: 0"):
            await eventually_async(lambda: 0, 0.02, "never")
        return "ok"

    assert asyncio.run(scenario()) == "ok"
