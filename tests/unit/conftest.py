"""Fixtures shared by the unit tests."""

from __future__ import annotations

import logging
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


@pytest.fixture
def pdserve_log(caplog):
    """pdserve's records (its package logger does not propagate to the
    root, where caplog listens), from INFO up, whatever level an earlier
    test left the capture handler at."""
    logger = logging.getLogger("pdserve")
    caplog.handler.setLevel(logging.INFO)
    logger.addHandler(caplog.handler)
    yield caplog
    logger.removeHandler(caplog.handler)
