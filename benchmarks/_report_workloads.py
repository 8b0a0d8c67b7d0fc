"""RESULTS.md's section on benchmarks/workloads.py (fan-out, ordered stream, DB writes, steady)."""

from __future__ import annotations

from typing import Any

ORDER = ["sqlite", "redis", "nats", "amqp", "postgresql"]


def _sorted(cases: list[dict[str, Any]], workload: str) -> list[dict[str, Any]]:
    mine = [c for c in cases if c["workload"] == workload]
    return sorted(mine, key=lambda c: (ORDER.index(c["broker"]), str(c.get("variant"))))


def _rate(c: dict[str, Any]) -> str:
    return f"{c['throughput']:,.0f} ({c['throughput_min']:,.0f}-{c['throughput_max']:,.0f})"


def _cmd(c: dict[str, Any], *extra: str) -> str:
    size = f"--n {c['n']}" if "n" in c else ""
    args = " ".join(part for part in (size, *extra, f"--runs {c['runs']}") if part)
    return f"`python benchmarks/workloads.py {c['workload']} --broker {c['broker']} {args}`"


def _ok(c: dict[str, Any]) -> str:
    return "yes" if c.get("verified") else "**no**: " + "; ".join(c.get("problems", []))


def workloads_section(doc: dict[str, Any]) -> list[str]:
    cases = doc["cases"]
    lines = [
        "## Fan-out, ordered streams, database writes, steady load (`benchmarks/workloads.py`)",
        "",
        f"Measured {doc['when']}, one runner process at concurrency 64 unless said otherwise, "
        "each run in fresh processes (one publishes, one runs); median of the runs with min-max. "
        "CPU and peak RSS are the runner process's. Every case is verified while it is "
        "measured (the `ok` column): every id handled, no duplicates without a failure, and the "
        "workload's own rule below.",
        "",
    ]
    lines += _fanout(_sorted(cases, "fanout"))
    lines += _ordered(_sorted(cases, "ordered"))
    lines += _dbwrite(_sorted(cases, "dbwrite"))
    lines += _steady(_sorted(cases, "steady"))
    return lines


def _fanout(cases: list[dict[str, Any]]) -> list[str]:
    if not cases:
        return []
    lines = [
        "### Fan-out: one topic, three subscriber groups",
        "",
        "N events published before the runner starts; one runner drains all three groups (a, "
        "b, c, no-op handlers). Each group must see every id exactly once.",
        "",
        "| broker | N | deliveries/s | events/s | CPU µs/delivery | p99 ms | peak RSS MB "
        "| runs | ok | reproduce |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|---|",
    ]
    for c in cases:
        lines.append(
            f"| {c['broker']} | {c['n']:,} | {_rate(c)} | {c['events_per_s']:,.0f} "
            f"| {c['cpu_us_per_delivery']:.1f} | {c['latency']['p99_ms']:,.0f} "
            f"| {c['peak_rss_mb']:.1f} | {c['runs']} | {_ok(c)} | {_cmd(c)} |"
        )
    return [*lines, ""]


def _ordered(cases: list[dict[str, Any]]) -> list[str]:
    if not cases:
        return []
    lines = [
        "### Ordered stream: 64 keys",
        "",
        "N records on a stream, key = n % 64, published in order. The handler checks while it "
        "runs that each key's sequence number goes up by exactly one and that no two records "
        "of one key are in a handler at once (it yields once while holding the key to give an "
        "overlap the chance to show).",
        "",
        "| broker | N | records/s | CPU µs/record | p99 ms | order violations | overlaps "
        "| peak RSS MB | runs | ok | reproduce |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---|",
    ]
    for c in cases:
        lines.append(
            f"| {c['broker']} | {c['n']:,} | {_rate(c)} | {c['cpu_us_per_event']:.1f} "
            f"| {c['latency']['p99_ms']:,.0f} | {c['order_violations']} | {c['key_overlaps']} "
            f"| {c['peak_rss_mb']:.1f} | {c['runs']} | {_ok(c)} | {_cmd(c)} |"
        )
    return [*lines, ""]


def _dbwrite(cases: list[dict[str, Any]]) -> list[str]:
    if not cases:
        return []
    lines = [
        "### A handler that writes to a database, with and without `rate=`",
        "",
        "Each event inserts one row (its id the primary key) into a real database: a SQLite "
        "file of its own (aiosqlite, WAL) beside the SQLite broker, PostgreSQL (asyncpg, a pool "
        'of 16) beside the networked ones. `rate="2000/s"` on the decorator protects the '
        "database: the most handler starts in any one-second window must not exceed it. The "
        "table must end with exactly N rows.",
        "",
        "| broker | limit | N | rows/s | most starts in 1 s | insert p99 ms | CPU µs/event "
        "| runs | ok | reproduce |",
        "|---|---|---:|---:|---:|---:|---:|---:|---|---|",
    ]
    for c in cases:
        write = c.get("write") or {}
        p99 = f"{write['p99_ms']:.1f}" if "p99_ms" in write else "-"
        lines.append(
            f"| {c['broker']} | {c['variant']} | {c['n']:,} | {_rate(c)} "
            f"| {c['max_starts_per_s']:,} | {p99} | {c['cpu_us_per_event']:.0f} "
            f"| {c['runs']} | {_ok(c)} | {_cmd(c, '--rate ' + (c.get('rate') or 'none'))} |"
        )
    return [*lines, ""]


def _steady(cases: list[dict[str, Any]]) -> list[str]:
    if not cases:
        return []
    lines = [
        "### Steady load, and what a burst does to it",
        "",
        "A publisher process sends a fixed rate, paced against the clock, while a runner (not "
        "in burst mode) handles it with a no-op handler; at half time it sends a spike of five "
        "seconds' worth of events at once. Latency is publish to handler start: of the steady "
        "events before the spike, of the spike's own events, and of all; recovery is the time "
        "from the spike until the p99 of a publish second is back under twice its level before "
        "the spike (1-second steps).",
        "",
        "![steady load: p99 per second](plots/steady_timeline.png)",
        "![latency CDFs](plots/latency_cdf.png)",
        "",
        "| broker | rate/s | seconds | published/s | p50 ms | p99 ms before spike "
        "| spike p99 ms | max ms | recovery s | CPU µs/event | peak RSS MB | ok | reproduce |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|",
    ]
    for c in sorted(cases, key=lambda c: (c["rate"], ORDER.index(c["broker"]))):
        recovery = c.get("recovery_s")
        shown = f"{recovery:.0f}" if isinstance(recovery, (int, float)) else "not within the run"
        steady_args = f"--rate {c['rate']:.0f} --seconds {c['seconds']:.0f}"
        lines.append(
            f"| {c['broker']} | {c['rate']:,.0f} | {c['seconds']:.0f} | {c['publish_rate']:,.0f} "
            f"| {c['pre_spike']['p50_ms']:.1f} | {c['pre_spike']['p99_ms']:.1f} "
            f"| {c['spike_events']['p99_ms']:,.0f} | {c['latency']['max_ms']:,.0f} | {shown} "
            f"| {c['cpu_us_per_event']:.0f} | {c['peak_rss_mb']:.1f} | {_ok(c)} "
            f"| {_cmd(c, steady_args)} |"
        )
    return [*lines, ""]
