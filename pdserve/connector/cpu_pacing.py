"""CPU nodes only: give the cores back while an engine steps just to keep a
transfer alive.

vLLM's CPU workers spin between engine steps (a sched_yield loop), and an
engine keeps stepping while a producer holds leases or a consumer waits for
KV. On a machine whose cores the two nodes share, two such spinning engines
starve every other thread of CPU time and, inside their own processes, of
the GIL: vLLM's engine-core output thread then cannot hand the producer's
answer (the lease) to its HTTP server, and the lease is held, and the engine
spinning, until it expires. A short sleep in those steps breaks that cycle.
GPU workers wait on the device instead and never come here.
"""

from __future__ import annotations

import time

import torch


def pace(device: torch.device, seconds: float) -> None:
    if device.type == "cpu":
        time.sleep(seconds)
