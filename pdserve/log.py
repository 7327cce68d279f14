"""Loggers in vLLM's style that print through vLLM's handlers and level.

vLLM configures only its own ``vllm`` logger; without this, pdserve's records
would bypass its format and INFO records would be dropped.
"""

from __future__ import annotations

import logging

try:
    from vllm.logger import init_logger as vllm_init_logger
except ImportError:  # transports and benchmarks run without vLLM too
    vllm_init_logger = logging.getLogger


def init_logger(name: str) -> logging.Logger:
    package = logging.getLogger("pdserve")
    if not package.handlers:
        vllm_logger = logging.getLogger("vllm")
        for handler in vllm_logger.handlers:
            package.addHandler(handler)
        package.setLevel(vllm_logger.level)
        package.propagate = not package.handlers
    return vllm_init_logger(name)
