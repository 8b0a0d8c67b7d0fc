"""The performance targets of the issues, checked against benchmarks/results/*.json.

Each target reads the figures it needs; one whose figures are missing says which command
measures them instead of guessing.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

Results = dict[str, Any]
IDEAL_SLEEP = 64 / 0.005  # concurrency 64, 5 ms handler: 12,800/s


@dataclass
class Row:
    issue: str
    target: str
    measured: str
    met: bool | None  # None: not measured
    command: str

    def cells(self) -> str:
        status = {True: "met", False: "**not met**", None: "not measured"}[self.met]
        if self.met is None and self.measured != "-":
            status = "for reference"
        return f"| {self.issue} | {self.target} | {self.measured} | {status} | `{self.command}` |"


def _cases(results: Results, name: str) -> list[dict[str, Any]]:
    document = results.get(name)
    if document is None:
        return []
    return list(document["cases"] if isinstance(document, dict) else document)


def _burst(results: Results, broker: str, handler: str, n: int) -> dict[str, Any] | None:
    for case in _cases(results, "burst"):
        if (case.get("broker", "sqlite"), case["handler"], case["n"]) == (broker, handler, n):
            return case
    return None


def _peer(results: Results, broker: str, tool: str, handler: str) -> dict[str, Any] | None:
    for case in _cases(results, "peers"):
        if (case["broker"], case["tool"], case.get("handler", "noop")) == (broker, tool, handler):
            return case
    return None


def _rate(case: dict[str, Any]) -> str:
    low, high = case["throughput_min"], case["throughput_max"]
    return f"{case['throughput']:,.0f}/s ({low:,.0f}-{high:,.0f})"


BURST_CMD = "python benchmarks/burst.py --broker {b} --handler {h} --n {n} --runs 3"
PEERS_CMD = ".venv-bench/bin/python benchmarks/peers/run.py --broker {b} --runs 3 --handler {h}"


def peers_rows(results: Results) -> Iterator[Row]:
    for broker, label in (("redis", "Redis Streams"), ("nats", "NATS JetStream")):
        cmd = PEERS_CMD.format(b=broker, h="noop")
        ours = _peer(results, broker, "eventfn", "noop")
        for tool, want, name in (("faststream", 3.0, "FastStream's"), ("raw", 0.5, "raw loop's")):
            theirs = _peer(results, broker, tool, "noop")
            target = f"{label}, no-op: >= {want:g}x {name} drain throughput"
            if ours is None or theirs is None:
                yield Row("bench (#8)", target, "-", None, cmd)
                continue
            ratio = ours["throughput"] / theirs["throughput"]
            measured = (
                f"{ratio:.2f}x ({ours['throughput']:,.0f}/s vs {theirs['throughput']:,.0f}/s)"
            )
            yield Row("bench (#8)", target, measured, ratio >= want, cmd)
        ceiling = _peer(results, broker, "raw-batch-ack", "noop")
        if ours is not None and ceiling is not None:
            ratio = ours["throughput"] / ceiling["throughput"]
            yield Row(
                "bench (#8)",
                f"{label}, no-op: beside the raw loop with one XACK per read (no target)",
                f"{ratio:.2f}x ({ours['throughput']:,.0f}/s vs {ceiling['throughput']:,.0f}/s)",
                None,
                cmd,
            )


def sleep_rows(results: Results) -> Iterator[Row]:
    brokers = sorted(
        {c.get("broker", "sqlite") for c in _cases(results, "burst") if c["handler"] == "sleep"},
        key=_order,
    )
    for broker in brokers or ["sqlite"]:
        case = _burst(results, broker, "sleep", 20_000) or _largest(results, broker, "sleep")
        cmd = BURST_CMD.format(b=broker, h="sleep", n=case["n"] if case else 20000)
        target = f"{broker}, `sleep(5 ms)` at concurrency 64: >= 0.85 of 12,800/s"
        if case is None:
            yield Row("bench (#8)", target, "-", None, cmd)
            continue
        share = case["throughput"] / IDEAL_SLEEP
        yield Row("bench (#8)", target, f"{_rate(case)} = {share:.2f}", share >= 0.85, cmd)


def sqlite_loop_row(results: Results) -> Iterator[Row]:
    loops = results.get("loops")
    ours = _burst(results, "sqlite", "noop", 100_000)
    target = "SQLite, no-op, N = 100,000: >= 0.3x the bare claim-decode-ack loop"
    cmd = "python benchmarks/sqlite_loop.py --json -n 100000 --rounds 5"
    if loops is None or ours is None:
        yield Row("bench (#8)", target, "-", None, cmd)
        return
    bare = loops["bare"]["throughput"]
    ratio = ours["throughput"] / bare
    measured = f"{ratio:.2f}x ({ours['throughput']:,.0f}/s vs {bare:,.0f}/s)"
    yield Row("bench (#8)", target, measured, ratio >= 0.3, cmd)


def cpu_rows(results: Results) -> Iterator[Row]:
    for broker in _brokers(results):
        noop = [c for c in _cases(results, "burst") if _is(c, broker, "noop")]
        worst = max(noop, key=lambda c: c["cpu_us_per_event"])
        target = f"{broker}, no-op, default middleware: <= 60 µs runner CPU per event"
        cmd = BURST_CMD.format(b=broker, h="noop", n=worst["n"]).replace(
            "--runs 3", f"--runs {worst.get('runs', 3)}"
        )
        measured = f"{worst['cpu_us_per_event']:.1f} µs (worst N: {worst['n']:,})"
        yield Row("bench (#8)", target, measured, worst["cpu_us_per_event"] <= 60, cmd)


def rss_rows(results: Results) -> Iterator[Row]:
    for broker in _brokers(results):
        small, big = _burst(results, broker, "noop", 10_000), _burst(results, broker, "noop", 10**6)
        target = f"{broker}: peak RSS at N = 1,000,000 within 1.2x of N = 10,000"
        cmd = f"python benchmarks/burst.py --broker {broker} --handler noop --n 10000 1000000"
        if small is None or big is None:
            yield Row("bench (#8)", target, "-", None, cmd)
            continue
        ratio = big["peak_rss_mb"] / small["peak_rss_mb"]
        measured = f"{big['peak_rss_mb']:.1f} MB vs {small['peak_rss_mb']:.1f} MB = {ratio:.2f}x"
        yield Row("bench (#8)", target, measured, ratio <= 1.2, cmd)


def steady_rows(results: Results) -> Iterator[Row]:
    steady = [c for c in _cases(results, "workloads") if c.get("workload") == "steady"]
    for broker in ("sqlite", "redis"):
        case = next((c for c in steady if c["broker"] == broker and _per_s(c) == 1000), None)
        target = f"{broker}, steady 1,000/s: p99 publish-to-handler latency < 25 ms"
        cmd = f"python benchmarks/workloads.py steady --broker {broker} --rate 1000 --seconds 30"
        if case is None:
            yield Row("bench (#8)", target, "-", None, cmd)
            continue
        p99 = case["pre_spike"]["p99_ms"]
        measured = f"{p99:.1f} ms before the spike ({case['latency']['p99_ms']:.0f} ms with it)"
        yield Row("bench (#8)", target, measured, p99 < 25, cmd)


def core_rows(results: Results) -> Iterator[Row]:
    case = _burst(results, "sqlite", "noop", 100_000)
    cmd = BURST_CMD.format(b="sqlite", h="noop", n=100000)
    if case is not None:
        rate = case["throughput"]
        yield Row("core (#2)", "SQLite, no-op, N = 100,000: >= 30,000 events/s", _rate(case),
                  rate >= 30_000, cmd)  # fmt: skip
        cpu = case["cpu_us_per_event"]
        yield Row("core (#2)", "SQLite, no-op: <= 30 µs runner CPU per event", f"{cpu:.1f} µs",
                  cpu <= 30, cmd)  # fmt: skip
    sleep = _largest(results, "sqlite", "sleep")
    if sleep is not None:
        share = sleep["throughput"] / IDEAL_SLEEP
        yield Row("core (#2)", "SQLite, `sleep(5 ms)` at 64: >= 70% of 12,800/s",
                  f"{_rate(sleep)} = {share:.0%}", share >= 0.7,
                  BURST_CMD.format(b="sqlite", h="sleep", n=sleep["n"]))  # fmt: skip


def middleware_row(results: Results) -> Iterator[Row]:
    document = results.get("middleware")
    target = "full chain (retry + idempotency on SQLite + timeout): >= 0.6 of the no-op rate"
    cmd = "python benchmarks/middleware_overhead.py --parts --runs 3"
    full = next((c for c in document["cases"] if c["case"] == "full"), None) if document else None
    if full is None:
        yield Row("retries (#3)", target, "-", None, cmd)
        return
    yield Row("retries (#3)", target, f"{full['ratio']:.2f}", full["ratio"] >= 0.6, cmd)


TARGETS: list[Callable[[Results], Iterator[Row]]] = [
    core_rows,
    middleware_row,
    peers_rows,
    sleep_rows,
    sqlite_loop_row,
    cpu_rows,
    rss_rows,
    steady_rows,
]


def rows(results: Results) -> list[Row]:
    return [row for target in TARGETS for row in target(results)]


def _is(case: dict[str, Any], broker: str, handler: str) -> bool:
    return bool(case.get("broker", "sqlite") == broker and case["handler"] == handler)


def _largest(results: Results, broker: str, handler: str) -> dict[str, Any] | None:
    mine = [c for c in _cases(results, "burst") if _is(c, broker, handler)]
    return max(mine, key=lambda c: c["n"]) if mine else None


def _brokers(results: Results) -> list[str]:
    return sorted({c.get("broker", "sqlite") for c in _cases(results, "burst")}, key=_order)


def _order(broker: str) -> int:
    known = ["sqlite", "redis", "nats", "amqp", "postgresql"]
    return known.index(broker) if broker in known else len(known)


def _per_s(case: dict[str, Any]) -> int:
    return int(case.get("rate") or 0)
