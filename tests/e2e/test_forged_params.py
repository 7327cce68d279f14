"""Clients cannot hand an engine a lease: forged ``kv_transfer_params`` on
every JSON endpoint the consumer serves are removed before vLLM sees them
(the request is served exactly as without them), and the producer answers
forged ``do_remote_prefill`` requests without a 5xx. Afterwards both nodes
still answer like the baseline and hold nothing."""

from __future__ import annotations

import copy
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import requests
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from tests.e2e.conftest import random_prompt
from tests.e2e.helpers import completion_tokens, greedy, post, wait_idle

KV = "kv_transfer_params"
MAX_TOKENS = 4
TEXT = "Hello there, how"
# Leases run 30 s on the session producer; nothing here may leave one held.
IDLE_WITHIN_SECONDS = 20
HYPOTHESIS = settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


@dataclass(frozen=True)
class Route:
    path: str
    body: Callable[[str], dict]
    # What must not change when forged params are added (None: status only).
    answer: Callable[[dict], Any] | None = None
    # Where else in the body a forged value is put, besides the top level.
    nested: Callable[[dict, Any], None] | None = None

    def __str__(self) -> str:
        return self.path


def into_xargs(body: dict, forged: Any) -> None:
    body["vllm_xargs"] = {KV: forged}


def into_sampling_params(body: dict, forged: Any) -> None:
    body["sampling_params"]["extra_args"] = {KV: forged}


ROUTES = [
    Route(
        "/v1/completions",
        lambda model: greedy(random_prompt(24, 31), MAX_TOKENS),
        lambda answer: answer["choices"][0]["token_ids"],
        into_xargs,
    ),
    Route(
        "/v1/chat/completions",
        lambda model: {
            "messages": [{"role": "user", "content": TEXT}],
            "max_tokens": MAX_TOKENS,
            "temperature": 0,
        },
        lambda answer: answer["choices"][0]["message"]["content"],
    ),
    Route(
        "/v1/responses",
        lambda model: {
            "model": model,
            "input": TEXT,
            "max_output_tokens": MAX_TOKENS,
            "temperature": 0,
        },
    ),
    Route(
        "/v1/messages",
        lambda model: {
            "model": model,
            "max_tokens": MAX_TOKENS,
            "temperature": 0,
            "messages": [{"role": "user", "content": TEXT}],
        },
    ),
    # Served with --enable-scale-out only; otherwise vLLM answers 403/404.
    Route(
        "/inference/v1/generate",
        lambda model: {
            "model": model,
            "token_ids": random_prompt(24, 32),
            "sampling_params": {"max_tokens": MAX_TOKENS, "temperature": 0},
        },
        nested=into_sampling_params,
    ),
    Route(
        "/generate",
        lambda model: {"prompt": TEXT, "max_tokens": MAX_TOKENS, "temperature": 0},
        lambda answer: answer,
    ),
]

# --- forged kv_transfer_params -----------------------------------------------

json_leaves = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=30)
)
json_values = st.recursive(
    json_leaves,
    lambda children: (
        st.lists(children, max_size=5)
        | st.dictionaries(st.text(max_size=12), children, max_size=5)
    ),
    max_leaves=25,
)
LEASE_FIELDS = [
    "request_id",
    "token",
    "instance_id",
    "block_ids",
    "prompt_hash",
    "num_prompt_tokens",
    "kv_ports",
    "mac",
]
garbage_leases = st.dictionaries(
    st.sampled_from(LEASE_FIELDS) | st.text(max_size=8), json_values, max_size=9
)
remote_prefill = st.fixed_dictionaries(
    {"do_remote_prefill": st.just(True)},
    optional={"pdserve_lease": garbage_leases | json_values},
)
forged_params = st.one_of(
    remote_prefill,
    st.fixed_dictionaries({"pdserve_lease": garbage_leases}),
    st.dictionaries(
        st.sampled_from(["do_remote_prefill", "pdserve_lease", "remote_engine_id"])
        | st.text(max_size=10),
        json_values,
        max_size=6,
    ),
    json_values,  # wrong types: lists, strings, numbers, null
)
EXAMPLES = [
    {"do_remote_prefill": True},
    {"do_remote_prefill": True, "pdserve_lease": {"garbage": [1, "two"]}},
    {"pdserve_lease": {"request_id": "é" * 300, "block_ids": [-1, 2**60]}},
    {"do_remote_prefill": "yes", "pdserve_lease": "🦀 ünïcödé"},
    list(range(100_000)),
    "kv_transfer_params",
]


def with_forged(route: Route, model: str, forged: Any) -> dict:
    body = route.body(model)
    body[KV] = copy.deepcopy(forged)
    if route.nested is not None:
        route.nested(body, copy.deepcopy(forged))
    return body


def real_looking_lease(cluster) -> dict:
    """A lease shaped like the producer's own (its ports and instance id), with
    made-up block ids, token and MAC; holds nothing on the producer."""
    metadata = requests.get(cluster.producer.url + "/pdserve/metadata", timeout=30)
    producer = metadata.json()
    lease = {
        "request_id": f"cmpl-{secrets.token_hex(16)}-0",
        "token": secrets.token_hex(32),
        "instance_id": producer.get("instance_id") or secrets.token_hex(8),
        "block_ids": [0, 1],
        "prompt_hash": secrets.token_hex(16),
        "num_prompt_tokens": 24,
        "kv_ports": producer["kv_ports"],
        "mac": secrets.token_hex(32),
    }
    return {"do_remote_prefill": True, "pdserve_lease": lease}


# --- the consumer ------------------------------------------------------------


@pytest.fixture(scope="module")
def clean(cluster) -> dict[str, requests.Response]:
    """Each route's answer on the consumer without forged params."""
    return {
        route.path: post(cluster.consumer.url, route.path, route.body(cluster.model))
        for route in ROUTES
    }


def assert_same_as_clean(route: Route, clean: requests.Response, got) -> None:
    assert got.status_code < 500, got.text
    # The params were removed, so this is the clean request exactly.
    assert got.status_code == clean.status_code, got.text
    if route.answer is not None and got.status_code == 200:
        assert route.answer(got.json()) == route.answer(clean.json())


@pytest.mark.parametrize("route", ROUTES, ids=str)
def test_clean_requests_do_not_fail(clean, route):
    assert clean[route.path].status_code < 500, clean[route.path].text


def with_examples(test: Callable) -> Callable:
    for forged in EXAMPLES:
        test = example(forged=forged)(test)
    return test


@pytest.mark.parametrize("route", ROUTES, ids=str)
@with_examples
@HYPOTHESIS
@given(forged=forged_params)
def test_consumer_ignores_forged_params(cluster, clean, route, forged):
    body = with_forged(route, cluster.model, forged)
    got = post(cluster.consumer.url, route.path, body)
    assert_same_as_clean(route, clean[route.path], got)


@pytest.mark.parametrize("route", ROUTES, ids=str)
def test_consumer_ignores_real_looking_lease(cluster, clean, route):
    body = with_forged(route, cluster.model, real_looking_lease(cluster))
    got = post(cluster.consumer.url, route.path, body)
    assert_same_as_clean(route, clean[route.path], got)


# --- the producer ------------------------------------------------------------

# Never do_remote_decode: that is a genuine lease request, which would hold
# KV until the lease runs out (and the suite checks that none ever does).
producer_forged = st.one_of(
    remote_prefill,
    st.fixed_dictionaries(
        {"do_remote_prefill": st.just(True), "pdserve_lease": garbage_leases}
    ),
    json_values,
)


def producer_body(forged: Any) -> dict:
    return dict(greedy(random_prompt(24, 33), MAX_TOKENS), **{KV: forged})


@pytest.fixture(scope="module")
def expected_tokens(cluster) -> list[int]:
    return completion_tokens(cluster.baseline.url, producer_body(None))


def assert_producer_unmoved(expected: list[int], got) -> None:
    assert got.status_code < 500, got.text
    if got.status_code == 200:
        # Prefilled and decoded locally, as if the params were not there.
        assert got.json()["choices"][0]["token_ids"] == expected


@HYPOTHESIS
@given(forged=producer_forged)
@example(forged={"do_remote_prefill": True})
@example(forged={"do_remote_prefill": True, "pdserve_lease": {"token": "x"}})
@example(forged={"do_remote_prefill": True, "pdserve_lease": list(range(50_000))})
def test_producer_survives_forged_remote_prefill(cluster, expected_tokens, forged):
    got = post(cluster.producer.url, "/v1/completions", producer_body(forged))
    assert_producer_unmoved(expected_tokens, got)


def test_producer_survives_real_looking_lease(cluster, expected_tokens):
    forged = real_looking_lease(cluster)
    got = post(cluster.producer.url, "/v1/completions", producer_body(forged))
    assert_producer_unmoved(expected_tokens, got)


# --- afterwards --------------------------------------------------------------


def test_both_nodes_still_serve_like_the_baseline_and_are_idle(cluster):
    body = greedy(random_prompt(40, 34))
    expected = completion_tokens(cluster.baseline.url, body)
    assert completion_tokens(cluster.consumer.url, body) == expected
    assert completion_tokens(cluster.producer.url, body) == expected
    assert wait_idle(cluster.consumer.url, IDLE_WITHIN_SECONDS) == (0, 0, 0)
    assert wait_idle(cluster.producer.url, IDLE_WITHIN_SECONDS) == (0, 0, 0)
