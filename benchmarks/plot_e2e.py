"""Plots of an end-to-end sweep (gpu_e2e.py's result JSONs): TTFT p90,
TPOT p90 and goodput at each SLO against the request rate, one line per
setup. Unbounded rate ("inf") is drawn last, labelled "max".

    python benchmarks/plot_e2e.py RESULTS_DIR [--out DIR]

Needs matplotlib (`pip install matplotlib`).
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

PANELS = (
    ("p90_ttft_ms", "TTFT p90 (ms)", "TTFT p90", "ttft_p90.png"),
    ("p90_tpot_ms", "TPOT p90 (ms)", "TPOT p90", "tpot_p90.png"),
)


def load(folder: Path) -> dict[str, list[dict]]:
    """Result JSONs by setup, ordered by rate."""
    by_setup: dict[str, list[dict]] = defaultdict(list)
    for path in sorted(folder.glob("*_rate*_seed*.json")):
        result = json.loads(path.read_text())
        if "setup" in result:
            by_setup[result["setup"]].append(result)
    for results in by_setup.values():
        results.sort(key=lambda r: float(r["rate"]))
    return by_setup


def plot(
    by_setup: dict[str, list[dict]], key: str, label: str, title: str, path: Path
) -> None:
    rates = sorted({r["rate"] for rs in by_setup.values() for r in rs}, key=float)
    x = {rate: i for i, rate in enumerate(rates)}
    fig, ax = plt.subplots(figsize=(6, 4))
    for setup, results in sorted(by_setup.items()):
        points = [(x[r["rate"]], r[key]) for r in results if key in r]
        if points:
            ax.plot(*zip(*points, strict=True), marker="o", label=setup)
    ax.set_xticks(range(len(rates)), [r if r != "inf" else "max" for r in rates])
    ax.set_xlabel("request rate (req/s)")
    ax.set_ylabel(label)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("results", type=Path)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    out = args.out or args.results
    out.mkdir(parents=True, exist_ok=True)
    by_setup = load(args.results)
    panels = list(PANELS)
    slos = {n for rs in by_setup.values() for r in rs for n in r.get("slos", {})}
    for name in sorted(slos):
        first = next(r for rs in by_setup.values() for r in rs if "slos" in r)
        ttft, tpot = first["slos"][name]
        title = f"goodput at the {name} SLO (TTFT ≤ {ttft:g} ms, TPOT ≤ {tpot:g} ms)"
        panels.append((f"goodput_{name}", "good req/s", title, f"goodput_{name}.png"))
    for key, label, title, filename in panels:
        plot(by_setup, key, label, title, out / filename)
        print(out / filename)


if __name__ == "__main__":
    main()
