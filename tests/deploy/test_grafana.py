"""deploy/grafana: the dashboard is well-formed Grafana JSON, plots every
metric in README's metrics table, and names pdserve's metrics as pdserve
exports them (counters as ``_total``, histograms as ``_bucket/_sum/_count``).
That each name exists on a running node: tests/e2e/test_dashboard_metrics.py.
"""

from __future__ import annotations

from tests.deploy.helpers import (
    base_name,
    dashboard,
    dashboard_exprs,
    dashboard_metric_names,
    dashboard_panels,
    readme_metric_nodes,
)

SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count")}


def pdserve_metrics() -> dict[str, str]:
    """pdserve's exported metrics, name → type, from the code that makes them."""
    from prometheus_client.metrics import MetricWrapperBase

    from pdserve import metrics
    from pdserve.connector import stats

    found = {
        family.name: family.type
        for value in vars(metrics).values()
        if isinstance(value, MetricWrapperBase)
        for family in value.describe()
    }
    found |= {f"pdserve:{name}": "counter" for name in stats.COUNTERS}
    found |= {f"pdserve:{name}": "counter" for name in stats.LABELED_COUNTERS}
    found |= {f"pdserve:{name}": "histogram" for name in stats.HISTOGRAMS}
    found |= {f"pdserve:{name}": "histogram" for name in stats.STEP_HISTOGRAMS}
    return found


def test_dashboard_is_grafana_json():
    board = dashboard()
    assert board["uid"] == "pdserve" and board["title"]
    (variable,) = board["templating"]["list"]
    assert (variable["name"], variable["type"], variable["query"]) == (
        "datasource",
        "datasource",
        "prometheus",
    )
    ids = [panel["id"] for panel in dashboard_panels()]
    assert len(ids) == len(set(ids))
    cells = set()
    for panel in dashboard_panels():
        pos = panel["gridPos"]
        assert pos["x"] + pos["w"] <= 24
        mine = {
            (x, y)
            for x in range(pos["x"], pos["x"] + pos["w"])
            for y in range(pos["y"], pos["y"] + pos["h"])
        }
        assert not cells & mine, f"{panel['title']!r} overlaps another panel"
        cells |= mine
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        refs = [t["refId"] for t in panel["targets"]]
        assert refs and len(refs) == len(set(refs)), panel["title"]
        for target in panel["targets"]:
            assert target["datasource"] == panel["datasource"]


def test_promql_is_balanced():
    for expr in dashboard_exprs():
        depth = 0
        for char in expr:
            depth += {"(": 1, ")": -1}.get(char, 0)
            assert depth >= 0, expr
        assert depth == 0, expr
        assert expr.count("[") == expr.count("]"), expr


def test_pdserve_names_are_exported_with_their_type_suffix():
    exported = pdserve_metrics()
    for series in dashboard_metric_names():
        if not series.startswith("pdserve:"):
            continue
        name = base_name(series)
        assert name in exported, f"{series}: pdserve exports no {name}"
        assert series.removeprefix(name) in SUFFIXES[exported[name]], series


def test_every_readme_metric_and_ttft_phase_is_plotted():
    plotted = {base_name(s) for s in dashboard_metric_names()}
    readme = set(readme_metric_nodes())
    assert len(readme) >= 15
    assert readme <= set(pdserve_metrics()), "README names a metric pdserve lacks"
    ttft = {name for name in pdserve_metrics() if name.startswith("pdserve:ttft_")}
    assert len(ttft) == 13
    assert readme | ttft <= plotted, sorted((readme | ttft) - plotted)
    assert {
        "vllm:num_requests_running",
        "vllm:num_requests_waiting",
        "vllm:time_to_first_token_seconds",
        "vllm:inter_token_latency_seconds",
    } <= plotted
