"""E2E modules run in stage order, whatever their names or the order they
are given in: those that stop the session's servers after those using them."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest

from tests.e2e import conftest
from tests.e2e.conftest import Stage

E2E = Path(conftest.__file__).parent


class Item:
    """What the ordering hook reads of a collected test."""

    def __init__(self, path: Path, stage: Stage | None = None) -> None:
        self.path = path
        self.stage = stage

    def get_closest_marker(self, name: str):
        assert name == "stage"
        return None if self.stage is None else pytest.mark.stage(self.stage).mark


def test_tests_run_by_stage_and_other_directories_keep_their_places():
    items = [
        Item(E2E / "test_tensor_parallel.py", Stage.TENSOR_PARALLEL),
        Item(E2E / "test_xpyd.py", Stage.XPYD),
        Item(E2E / "test_api_surface.py"),
        Item(E2E / "test_idle_after_suite.py", Stage.IDLE_CHECK),
        Item(E2E / "test_bad_input.py"),
        Item(E2E.parent / "unit" / "test_leases.py"),
    ]
    conftest.pytest_collection_modifyitems(items)
    assert [item.path.name for item in items] == [
        "test_api_surface.py",
        "test_bad_input.py",
        "test_idle_after_suite.py",
        "test_xpyd.py",
        "test_tensor_parallel.py",
        "test_leases.py",
    ]


def stage_of_module(path: Path) -> Stage:
    module = importlib.import_module(f"tests.e2e.{path.stem}")
    mark = getattr(module, "pytestmark", None)
    return Stage.SHARED if mark is None else Stage(mark.args[0])


def test_modules_that_stop_the_session_servers_run_after_those_using_them():
    stages = {path.name: stage_of_module(path) for path in E2E.glob("test_*.py")}
    assert stages["test_idle_after_suite.py"] == Stage.IDLE_CHECK
    assert stages["test_xpyd.py"] == Stage.XPYD
    assert stages["test_tensor_parallel.py"] == Stage.TENSOR_PARALLEL
    for path in E2E.glob("test_*.py"):
        source = path.read_text()
        if "cluster.consumer.stop()" in source or "cluster.producer.stop()" in source:
            assert stages[path.name] > Stage.IDLE_CHECK, path.name
