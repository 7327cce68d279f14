"""Goodput of a `vllm bench serve` run at any SLO pair, from its per-request
results (`--save-detailed`): one run serves every SLO, and the SLOs can be
chosen after seeing the data.

A request is good when its TTFT and its TPOT (time after the first token
divided by the tokens after it, as vLLM's own `--goodput` computes it) are
both within the SLO. Goodput = good requests per second of the run.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SLO:
    name: str
    ttft_ms: float
    tpot_ms: float

    def __str__(self) -> str:
        return f"{self.name} (TTFT ≤ {self.ttft_ms:g} ms, TPOT ≤ {self.tpot_ms:g} ms)"


# Chosen from the 2026-11-26 4× H200 table (benchmarks/RESULTS.md): tight is
# about twice aggregated vLLM's light-load TTFT p50 and its TPOT p50; loose
# admits what a chat user still finds fluent.
SLOS = (SLO("tight", 100.0, 5.0), SLO("loose", 300.0, 10.0))


def parse_slo(text: str) -> SLO:
    """ "name:ttft_ms:tpot_ms", e.g. "tight:100:5"."""
    name, ttft, tpot = text.split(":")
    return SLO(name, float(ttft), float(tpot))


def goodput(result: dict, slo: SLO) -> float:
    ttfts, latencies = result["ttfts"], result["latencies"]
    lens, errors = result["output_lens"], result["errors"]
    good = 0
    for ttft, latency, n, error in zip(ttfts, latencies, lens, errors, strict=True):
        if error or n == 0:
            continue
        tpot = (latency - ttft) / (n - 1) if n > 1 else 0.0
        good += ttft * 1e3 <= slo.ttft_ms and tpot * 1e3 <= slo.tpot_ms
    return good / result["duration"]


def summarize(result: dict, slos: tuple[SLO, ...] = SLOS) -> dict:
    """Goodput at each SLO; the bulky per-request lists dropped."""
    summary = {f"goodput_{slo.name}": goodput(result, slo) for slo in slos}
    summary["slos"] = {slo.name: [slo.ttft_ms, slo.tpot_ms] for slo in slos}
    return summary
