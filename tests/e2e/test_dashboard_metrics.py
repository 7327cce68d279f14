"""Every metric the Grafana dashboard (deploy/grafana) plots exists on the
node that exports it, scraped after one PD request."""

from __future__ import annotations

import requests
from prometheus_client.parser import text_string_to_metric_families

from tests.deploy.helpers import base_name, dashboard_metric_names, readme_metric_nodes
from tests.e2e.conftest import random_prompt
from tests.e2e.helpers import RemotePath, completion_tokens, greedy

# Plotted but not in README's metrics table.
OTHER_NODES = {"pdserve:kv_loads": "consumer"}
TYPE_SUFFIXES = {
    "counter": ("_total",),
    "histogram": ("_bucket", "_sum", "_count"),
    "gauge": ("",),
}


def exported(url: str) -> set[str]:
    """Series names on ``url``'s /metrics, and those a declared family will
    have: a labelled counter (``local_prefills_total{reason}``) has no series
    before its first event, but Prometheus scrapes its name all the same."""
    text = requests.get(url + "/metrics", timeout=30).text
    names = set()
    for family in text_string_to_metric_families(text):
        names |= {sample.name for sample in family.samples}
        names |= {family.name + s for s in TYPE_SUFFIXES.get(family.type, ())}
    return names


def node_of(metric: str) -> str:
    if metric.startswith("vllm:"):
        return "both"
    return {**readme_metric_nodes(), **OTHER_NODES}[metric]


def test_dashboard_metrics_exist_on_their_nodes(cluster):
    with RemotePath(cluster.consumer.url, 1):
        completion_tokens(
            cluster.consumer.url, greedy(random_prompt(100, seed=5150), max_tokens=4)
        )
    on = {
        "consumer": exported(cluster.consumer.url),
        "producer": exported(cluster.producer.url),
    }
    plotted = dashboard_metric_names()
    assert len(plotted) > 30
    missing = []
    for series in sorted(plotted):
        node = node_of(base_name(series))
        for name in ("consumer", "producer") if node == "both" else (node,):
            if series not in on[name]:
                missing.append(f"{series} on the {name}")
    assert not missing, missing
