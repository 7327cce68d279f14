"""Fixtures shared by the unit tests."""

from __future__ import annotations

import tempfile

import pytest


@pytest.fixture
def closing():
    """Register things (servers, links, ranks) to close after the test."""
    things = []
    yield things.append
    for thing in things:
        thing.close()


@pytest.fixture
def short_tmp(tmp_path_factory):
    # ipc paths must stay under ~100 bytes; pytest's basetemp may be long.
    with tempfile.TemporaryDirectory(prefix="pi-", dir="/tmp") as d:
        yield d
