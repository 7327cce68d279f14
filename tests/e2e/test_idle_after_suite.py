"""Runs once every module that shares the session's nodes is done (its
stage): nothing is held on either node."""

from __future__ import annotations

import pytest

from tests.e2e.conftest import Stage
from tests.e2e.helpers import metric, wait_idle

pytestmark = pytest.mark.stage(Stage.IDLE_CHECK)


def test_no_requests_or_kv_held_after_suite(cluster):
    assert wait_idle(cluster.producer.url) == (0, 0, 0)
    assert wait_idle(cluster.consumer.url) == (0, 0, 0)
    # Every lease ended by release, none by running out.
    assert metric(cluster.producer.url, "pdserve:kv_leases_expired_total") == 0
    assert metric(cluster.producer.url, "pdserve:kv_bytes_sent_total") == metric(
        cluster.consumer.url, "pdserve:kv_bytes_received_total"
    )
