"""Fixtures shared by the unit tests."""

from __future__ import annotations

import pytest


@pytest.fixture
def closing():
    """Register things (servers, links, ranks) to close after the test."""
    things = []
    yield things.append
    for thing in things:
        thing.close()
