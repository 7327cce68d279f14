"""Cores of a producer and a consumer sharing one machine."""

from __future__ import annotations

from unittest import mock

import pytest

from pdserve.local_cluster import split_cores


@pytest.mark.parametrize(
    ("cpus", "expected"),
    [
        (1, (None, None)),
        (2, ("1", "0")),
        (3, ("1-2", "0")),
        (4, ("2-3", "0-1")),
        (5, ("2-4", "0-1")),
    ],
)
def test_split_cores(cpus, expected):
    with mock.patch("os.cpu_count", return_value=cpus):
        assert split_cores() == expected
