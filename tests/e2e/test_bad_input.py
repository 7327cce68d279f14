"""Bad requests get 4xx and leave nothing held on the producer. (KV computed
for other tokens is refused by the consumer's connector and by the producer's
read check: tests/unit/connector/test_scheduler.py and test_side_channel.py.)"""

from __future__ import annotations

from tests.e2e.conftest import CONSUMER_MAX_LEN, PRODUCER_MAX_LEN, random_prompt
from tests.e2e.helpers import greedy, metric, post, wait_idle
from tests.eventually import eventually


def test_malformed_json_is_400_and_skips_producer(cluster):
    remote_before = metric(cluster.consumer.url, "pdserve:remote_prefills_total")
    response = post(cluster.consumer.url, "/v1/completions", b'{"prompt": "hi",')
    assert 400 <= response.status_code < 500
    assert metric(cluster.consumer.url, "pdserve:remote_prefills_total") == (
        remote_before
    )
    assert wait_idle(cluster.producer.url) == (0, 0, 0)


def test_prompt_over_consumer_limit_is_400_and_frees_producer(cluster):
    # Fits the producer's --max-model-len, not the consumer's.
    length = CONSUMER_MAX_LEN + 100
    assert length < PRODUCER_MAX_LEN
    released_before = metric(
        cluster.consumer.url, "pdserve:leases_released_by_frontend_total"
    )
    response = post(
        cluster.consumer.url, "/v1/completions", greedy(random_prompt(length, 7))
    )
    assert 400 <= response.status_code < 500
    # The producer's answer may come after the 400 (vLLM refused the request
    # while the producer prefilled it): its lease goes back as it does.
    eventually(
        lambda: (
            metric(cluster.consumer.url, "pdserve:leases_released_by_frontend_total")
            == released_before + 1
        ),
        10,
        "the lease handed back",
    )
    # Released at once, not after the 30 s lease.
    assert wait_idle(cluster.producer.url, timeout=10) == (0, 0, 0)
