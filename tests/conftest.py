"""Suite-wide hooks."""

from __future__ import annotations

import os
import sys

import pytest


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    session.config.stash[_EXIT] = int(exitstatus)


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config: pytest.Config) -> None:
    # Once results are reported, leave without interpreter teardown: one of
    # vLLM's native dependencies intermittently aborts in its static
    # destructors ("terminate called without an active exception"), which
    # would turn a green run into exit code 134.
    if _EXIT in config.stash:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(config.stash[_EXIT])


_EXIT = pytest.StashKey[int]()
