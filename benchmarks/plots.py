"""Draw benchmarks/plots/*.png from benchmarks/results/*.json (needs matplotlib: .venv-bench).

    make bench-deps && .venv-bench/bin/python benchmarks/plots.py

A plot whose results are missing is skipped with a line saying so.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.axes import Axes
from matplotlib.ticker import FuncFormatter

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
PLOTS = HERE / "plots"
BROKERS = ["sqlite", "redis", "nats", "amqp", "postgresql"]
THOUSANDS = FuncFormatter(lambda value, _: f"{value:,.0f}")


def load(name: str) -> Any:
    path = RESULTS / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


def cases(name: str) -> list[dict[str, Any]]:
    document = load(name)
    if document is None:
        return []
    return list(document["cases"] if isinstance(document, dict) else document)


def save(fig: Any, name: str) -> None:
    PLOTS.mkdir(exist_ok=True)
    fig.tight_layout()
    fig.savefig(PLOTS / f"{name}.png", dpi=110)
    plt.close(fig)
    print(f"wrote benchmarks/plots/{name}.png")


def by_broker(rows: list[dict[str, Any]], x: str, y: str) -> dict[str, tuple[list, list]]:
    lines: dict[str, tuple[list, list]] = {}
    for broker in BROKERS:
        mine = sorted((r for r in rows if r.get("broker") == broker), key=lambda r: r[x])
        if mine:
            lines[broker] = ([r[x] for r in mine], [r[y] for r in mine])
    return lines


def _burst_vs_n(measure: str, ylabel: str, title: str, name: str) -> bool:
    rows = [c for c in cases("burst") if c["handler"] == "noop"]
    if not rows:
        return False
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for broker, (xs, ys) in by_broker(rows, "n", measure).items():
        ax.plot(xs, ys, marker="o", label=broker)
    ax.set_xscale("log")
    ax.set_xlabel("events published before the runner starts (N)")
    ax.set_ylabel(ylabel)
    ax.yaxis.set_major_formatter(THOUSANDS)
    ax.set_ylim(bottom=0)
    ax.set_title(title)
    ax.legend()
    ax.grid(alpha=0.3)
    save(fig, name)
    return True


def throughput_vs_n() -> bool:
    title = "Burst drain, no-op handler, one runner, concurrency 64"
    return _burst_vs_n("throughput", "drained events/s (median)", title, "throughput_vs_n")


def rss_vs_n() -> bool:
    title = "Runner memory does not grow with the backlog"
    return _burst_vs_n("peak_rss_mb", "runner peak RSS (MB)", title, "rss_vs_n")


def _cdf(ax: Axes, points: list[list[float]], label: str) -> None:
    if points:
        ax.plot([p[0] for p in points], [p[1] for p in points], label=label)


def latency_cdf() -> bool:
    steady = [c for c in cases("workloads") if c.get("workload") == "steady"]
    peers = [c for c in cases("peers") if c.get("handler", "noop") == "noop" and c.get("cdf")]
    if not steady and not peers:
        return False
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.4))
    left, right = axes
    for case in sorted(steady, key=lambda c: (BROKERS.index(c["broker"]), _rate(c))):
        _cdf(left, case["latency"]["cdf"], f"{case['broker']} {_rate(case):,}/s")
    left.set_xscale("log")
    left.set_xlabel("publish to handler start (ms)")
    left.set_ylabel("fraction of events")
    left.set_title("Steady load (spike included), eventfn")
    left.grid(alpha=0.3)
    left.legend(fontsize=8)
    for case in peers:
        if case["broker"] == "redis":
            _cdf(right, case["cdf"], case["tool"])
    right.set_xlabel("publish to handler start (ms)")
    right.set_title("Burst of 20,000 on Redis: time waiting in the backlog")
    right.grid(alpha=0.3)
    right.legend(fontsize=8)
    save(fig, "latency_cdf")
    return True


def _rate(case: dict[str, Any]) -> int:
    return int(case.get("rate") or 0)


def steady_timeline() -> bool:
    steady = [c for c in cases("workloads") if c.get("workload") == "steady"]
    if not steady:
        return False
    rates = sorted({_rate(c) for c in steady})
    fig, axes = plt.subplots(1, len(rates), figsize=(6 * len(rates), 4.2), squeeze=False)
    for ax, rate in zip(axes[0], rates, strict=True):
        for case in sorted(steady, key=lambda c: BROKERS.index(c["broker"])):
            if _rate(case) == rate:
                series = case["per_second_p99"]
                ax.plot([s[0] for s in series], [s[1] for s in series], label=case["broker"])
                ax.axvline(case["seconds"] / 2, color="grey", linestyle=":", linewidth=1)
        ax.set_yscale("log")
        ax.set_xlabel("second of publishing")
        ax.set_ylabel("p99 latency of that second's events (ms)")
        ax.set_title(f"{rate:,} events/s, with a spike midway (dotted)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    save(fig, "steady_timeline")
    return True


def throughput_vs_runners() -> bool:
    rows = cases("scaleout")
    if not rows:
        return False
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for broker, (xs, ys) in by_broker(rows, "runners", "throughput").items():
        ax.plot(xs, ys, marker="o", label=broker)
    runner = 1 / 0.01 * 16
    ax.plot([1, 2, 3], [runner, 2 * runner, 3 * runner], "k:", label="ideal (1,600/s per runner)")
    ax.set_xticks([1, 2, 3])
    ax.set_xlabel("runner processes")
    ax.set_ylabel("events/s")
    ax.yaxis.set_major_formatter(THOUSANDS)
    ax.set_ylim(bottom=0)
    ax.set_title("Scale-out: 10 ms handler, concurrency 16 per runner, 2 cores")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    save(fig, "throughput_vs_runners")
    return True


def peers_bars() -> bool:
    rows = cases("peers")
    if not rows:
        return False
    handlers = [h for h in ("noop", "sleep") if any(r.get("handler", "noop") == h for r in rows)]
    fig, axes = plt.subplots(1, len(handlers), figsize=(7 * len(handlers), 4.6), squeeze=False)
    for ax, handler in zip(axes[0], handlers, strict=True):
        mine = [r for r in rows if r.get("handler", "noop") == handler]
        labels = [f"{r['tool']}\n{r['broker']}" for r in mine]
        colors = ["tab:orange" if r["tool"] == "eventfn" else "tab:blue" for r in mine]
        ax.bar(range(len(mine)), [r["throughput"] for r in mine], color=colors)
        low = [r["throughput"] - r.get("throughput_min", r["throughput"]) for r in mine]
        high = [r.get("throughput_max", r["throughput"]) - r["throughput"] for r in mine]
        ax.errorbar(range(len(mine)), [r["throughput"] for r in mine], [low, high], fmt="none")
        ax.set_xticks(range(len(mine)), labels, rotation=60, fontsize=7, ha="right")
        ax.yaxis.set_major_formatter(THOUSANDS)
        ax.set_ylabel("msg/s (median, min-max)")
        ax.set_title(f"20,000 pre-published, one consumer, {handler} handler")
        ax.grid(axis="y", alpha=0.3)
    save(fig, "peers")
    return True


PLOTTERS: list[Callable[[], bool]] = [
    throughput_vs_n,
    rss_vs_n,
    latency_cdf,
    steady_timeline,
    throughput_vs_runners,
    peers_bars,
]


def main() -> None:
    for plot in PLOTTERS:
        if not plot():
            print(f"skipped {plot.__name__}: no results for it yet")


if __name__ == "__main__":
    main()
