"""Workloads beyond the plain burst drain, on any broker, each run in fresh processes.

    python benchmarks/workloads.py fanout  --broker sqlite redis --n 20000 --runs 3
    python benchmarks/workloads.py ordered --broker sqlite nats --n 20000
    python benchmarks/workloads.py dbwrite --broker sqlite postgresql --rate 2000/s none
    python benchmarks/workloads.py steady  --broker redis --rate 1000 5000 --seconds 30
    python benchmarks/workloads.py fanout ordered dbwrite steady --broker sqlite --write

- fanout: N events on one topic with three groups (a, b, c) of no-op handlers, published before
  the runner starts; one burst runner drains all three. Throughput is deliveries (3 N) per
  second of the drain; every group must see every id exactly once (a duplicate passes only
  after a failure, which at-least-once allows).
- ordered: N records on a stream of 64 keys (key n % 64, published in order), one burst
  runner at concurrency 64. The handler checks while it runs that each key's sequence number
  goes up by exactly one and that no two records of a key are in it at once.
- dbwrite: a handler that inserts one row per event into a real database: a SQLite file of its
  own (aiosqlite, WAL) for the sqlite broker, PostgreSQL (asyncpg, a pool of at most
  concurrency connections) for the networked ones; with ``rate=`` on the decorator and
  without (``--rate 2000/s none``). The table must end with exactly N rows; the most handler
  starts in any one-second window must not exceed the rate.
- steady: a publisher process sends ``--rate`` events/s for ``--seconds``, paced against the
  clock, with ``--spike`` extra events at once at half time (default: 5 s worth); the runner
  (not burst: it stops when it has seen every id) measures publish-to-handler-start latency:
  overall, before the spike, of the spike's own events, per publish second of the steady
  events (p99), and ``recovery_s``: from the spike to the start of the first publish second
  whose p99 is back under twice the pre-spike p99 (0 when the spike's own second is). Its
  throughput is events handled (steady and spike) per second from first publish to last start.

Networked brokers run against their servers on 127.0.0.1 (URLs in burst.py), each run in a
namespace of its own that is dropped afterwards. ``--write`` merges the cases into
results/workloads.json (key: broker, workload, variant).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "results"
sys.path.insert(0, str(ROOT))

import anyio  # noqa: E402

from benchmarks._stats import machine, median_of, spread  # noqa: E402
from benchmarks.burst import URLS, drop  # noqa: E402

WORKLOADS = ("fanout", "ordered", "dbwrite", "steady")
BROKERS = ("sqlite", *URLS)
PG_DSN = "postgresql://127.0.0.1:5432/test"


class CaseFailed(Exception):
    pass


def child(kind: str, spec: dict[str, Any], cwd: Path, timeout: float) -> dict[str, Any]:
    """Run one child process of this script; its last stdout line, as JSON."""
    command = [sys.executable, str(Path(__file__).resolve()), kind, json.dumps(spec)]
    done = subprocess.run(command, capture_output=True, text=True, cwd=cwd, timeout=timeout)
    if done.returncode:
        sys.stderr.write(done.stderr[-4000:])
        raise CaseFailed(f"{kind} exited with {done.returncode}")
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


@contextlib.contextmanager
def place(broker: str) -> Iterator[tuple[str, Path, str]]:
    """(broker URL, temporary directory, namespace) of one run; dropped afterwards."""
    ns = f"wl{os.getpid()}x{time.monotonic_ns() % 10**9}"
    with tempfile.TemporaryDirectory(prefix="eventfn-workloads-") as tmp:
        url = f"sqlite:///{tmp}/broker.db" if broker == "sqlite" else URLS[broker].format(ns=ns)
        try:
            yield url, Path(tmp), ns
        finally:
            if broker != "sqlite":
                anyio.run(drop, url)


def duplicate_problem(result: dict[str, Any]) -> list[str]:
    """Duplicates are allowed by at-least-once only after a failure (a retry or redelivery)."""
    if result["duplicates"] and not (result["retried"] or result["redelivered"]):
        return [f"{result['duplicates']} duplicates without any failure"]
    return []


def burst_run(
    broker: str, workload: str, n: int, args: argparse.Namespace, rate: str | None
) -> dict[str, Any]:
    """One run of fanout, ordered or dbwrite: publish N, then drain in a fresh process."""
    from benchmarks._workloads_apps import GROUPS, count_and_drop_rows, create_rows_table

    with place(broker) as (url, tmp, ns):
        spec: dict[str, Any] = {"workload": workload, "url": url, "n": n}
        spec |= {"concurrency": args.concurrency, "rate": rate}
        if workload == "dbwrite":
            pool = min(args.pool, args.concurrency)
            spec["db"] = (
                {"kind": "sqlite", "path": str(tmp / "rows.db")}
                if broker == "sqlite"
                else {"kind": "postgresql", "dsn": PG_DSN, "table": f"{ns}_rows", "pool": pool}
            )
            create_rows_table(spec["db"])
        try:
            timeout = 600 + n / 100
            published = child("_publish", spec, tmp, timeout)
            result = child("_run", spec, tmp, timeout)
        finally:
            if workload == "dbwrite":
                rows, distinct = count_and_drop_rows(spec["db"])
    result["publish_rate"] = published["publish_rate"]
    deliveries = n * (len(GROUPS) if workload == "fanout" else 1)
    result["throughput"] = deliveries / result["seconds"]
    result["events_per_s"] = n / result["seconds"]
    result["cpu_us_per_event"] = result["cpu_s"] / n * 1e6
    result["cpu_us_per_delivery"] = result["cpu_s"] / deliveries * 1e6
    problems = duplicate_problem(result)
    if workload == "dbwrite":
        result["rows"] = rows
        result["missing"] = max(0, n - distinct)
        if rows != n or distinct != n:
            problems.append(f"table holds {rows} rows ({distinct} distinct ids), not {n}")
        if rate is not None:
            per_second = float(rate.split("/")[0])
            if result["max_starts_per_s"] > per_second + 1:  # +1: a window's both ends
                problems.append(f"rate limit overshoot: {result['max_starts_per_s']} starts in 1 s")
    if result["missing"]:
        problems.append(f"{result['missing']} not handled")
    if workload == "ordered" and (result["order_violations"] or result["key_overlaps"]):
        problems.append(
            f"{result['order_violations']} order violations, {result['key_overlaps']} "
            f"overlaps: {result['violation_examples']}"
        )
    result["problems"] = problems
    return result


def steady_run(broker: str, rate: float, args: argparse.Namespace) -> dict[str, Any]:
    """One steady run: the runner starts first, then the paced publisher."""
    spike = round(5 * rate) if args.spike is None else args.spike
    with place(broker) as (url, tmp, _):
        spec = {"workload": "steady", "url": url, "rate": rate, "seconds": args.seconds}
        spec |= {"spike": spike, "concurrency": args.concurrency, "timeout": args.seconds + 120}
        me = [sys.executable, str(Path(__file__).resolve())]
        with (tmp / "runner.log").open("w+") as log:
            runner = subprocess.Popen(
                [*me, "_run", json.dumps(spec)], stdout=subprocess.PIPE, stderr=log, text=True
            )
            try:
                assert runner.stdout is not None
                if runner.stdout.readline().strip() != "ready":
                    raise CaseFailed("the steady runner did not start")
                published = child("_publish", spec, tmp, args.seconds + 120)
                out, _ = runner.communicate(timeout=args.seconds + 180)
            finally:
                if runner.poll() is None:
                    runner.kill()
                    runner.wait()
                log.seek(0)
                errors = log.read()
            if runner.returncode:
                sys.stderr.write(errors[-4000:])
                raise CaseFailed(f"the steady runner exited with {runner.returncode}")
    result: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    result |= {key: published[key] for key in published if key != "published"}
    result["spike"] = spike
    problems = duplicate_problem(result)
    if result["missing"] or result["timed_out"]:
        problems.append(f"{result['missing']} not handled (timed out: {result['timed_out']})")
    result["problems"] = problems
    return result


def middle(runs: list[dict[str, Any]], key: str) -> dict[str, Any]:
    return sorted(runs, key=lambda r: r[key])[len(runs) // 2]


def burst_case(
    broker: str, workload: str, args: argparse.Namespace, rate: str | None
) -> dict[str, Any]:
    runs = [burst_run(broker, workload, args.n, args, rate) for _ in range(args.runs)]
    median = middle(runs, "throughput")
    variant = {"fanout": "3 groups", "ordered": "64 keys"}.get(workload)
    case: dict[str, Any] = {
        "broker": broker,
        "workload": workload,
        "variant": variant or (f"rate {rate}" if rate else "no rate limit"),
        "n": args.n,
        "concurrency": args.concurrency,
        **spread(runs, "throughput"),
        **median_of(runs, ["events_per_s", "cpu_us_per_event", "cpu_us_per_delivery"]),
        **median_of(runs, ["peak_rss_mb", "publish_rate"]),
        "latency": median["latency"],
    }
    keep = ["missing", "duplicates", "retried", "redelivered", "dead_lettered"]
    keep += {
        "fanout": ["per_group"],
        "ordered": ["order_violations", "key_overlaps"],
        "dbwrite": ["rows", "max_starts_per_s", "start_rate", "write"],
    }[workload]
    case |= {key: median[key] for key in keep}
    if workload == "dbwrite":
        case["rate"] = rate
        case["pool"] = None if broker == "sqlite" else min(args.pool, args.concurrency)
        case["max_starts_per_s"] = max(r["max_starts_per_s"] for r in runs)
    return finish(case, runs)


def steady_case(broker: str, rate: float, args: argparse.Namespace) -> dict[str, Any]:
    runs = [steady_run(broker, rate, args) for _ in range(args.runs)]
    for run in runs:
        run["p99_ms"] = run["latency"]["p99_ms"]
    median = middle(runs, "p99_ms")
    case: dict[str, Any] = {
        "broker": broker,
        "workload": "steady",
        "variant": f"{rate:g}/s",
        "rate": rate,
        "seconds": args.seconds,
        "spike": median["spike"],
        "concurrency": args.concurrency,
        **spread(runs, "throughput"),
        **spread(runs, "publish_rate"),
        **median_of(runs, ["cpu_us_per_event", "peak_rss_mb", "publish_behind_max_ms"]),
    }
    keep = ["latency", "pre_spike", "spike_events", "per_second_p99", "recovery_s"]
    keep += ["spike_publish_ms", "missing", "duplicates", "retried", "redelivered"]
    case |= {key: median[key] for key in keep}
    return finish(case, runs)


def finish(case: dict[str, Any], runs: list[dict[str, Any]]) -> dict[str, Any]:
    case["runs"] = len(runs)
    case["problems"] = sorted({p for run in runs for p in run["problems"]})
    case["verified"] = not case["problems"]
    report(case)
    return case


def report(case: dict[str, Any]) -> None:
    lat = case["latency"]
    head = f"{case['broker']:<10} {case['workload']:<7} {case['variant']:<14}"
    if case["workload"] == "steady":
        recovery = case["recovery_s"]
        body = (
            f"{case['publish_rate']:7,.0f} published/s  p50 {lat['p50_ms']:7.1f} ms  "
            f"p99 {lat['p99_ms']:7.1f} ms (before spike {case['pre_spike']['p99_ms']:.1f}, "
            f"spike {case['spike_events']['p99_ms']:.0f})  recovery "
            f"{'never' if recovery is None else f'{recovery:.1f} s'}  "
            f"{case['cpu_us_per_event']:5.0f} µs CPU/event"
        )
    else:
        body = (
            f"N={case['n']:<7,} {case['throughput']:8,.0f}/s "
            f"({case['throughput_min']:,.0f}-{case['throughput_max']:,.0f})  "
            f"{case['cpu_us_per_delivery']:5.0f} µs CPU  p50 {lat['p50_ms']:7.1f} ms  "
            f"p99 {lat['p99_ms']:7.1f} ms"
        )
        if case["workload"] == "fanout":
            body += f"  {case['events_per_s']:,.0f} events/s  dup {case['duplicates']}"
        elif case["workload"] == "ordered":
            body += f"  violations {case['order_violations']}"
        else:
            body += (
                f"  max {case['max_starts_per_s']}/1s window  write p99 "
                f"{case['write']['p99_ms']:.1f} ms  rows {case['rows']:,}"
            )
    body += f"  RSS {case['peak_rss_mb']:.0f} MB  "
    body += "ok" if case["verified"] else "FAILED: " + "; ".join(case["problems"])
    print(f"{head} {body}", flush=True)


def write(cases: list[dict[str, Any]]) -> None:
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / "workloads.json"

    def key(c: dict[str, Any]) -> tuple[str, str, str]:
        return c["broker"], c["workload"], c["variant"]

    measured = {key(c) for c in cases}
    if path.exists():  # keep earlier cases this run did not measure
        cases += [c for c in json.loads(path.read_text())["cases"] if key(c) not in measured]
    cases.sort(key=lambda c: (BROKERS.index(c["broker"]), WORKLOADS.index(c["workload"])))
    document = {
        "benchmark": "workloads",
        "machine": machine(),
        "when": time.strftime("%Y-%m-%d"),
        "cases": cases,
    }
    path.write_text(json.dumps(document, indent=2) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("workload", nargs="+", choices=WORKLOADS)
    parser.add_argument("--broker", nargs="+", choices=BROKERS, default=["sqlite"])
    parser.add_argument("--n", type=int, default=20_000, help="events (fanout/ordered/dbwrite)")
    parser.add_argument("--runs", type=int, default=3, help="runs per case (median reported)")
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument(
        "--rate",
        nargs="+",
        help="dbwrite: rate= values or none (default 2000/s none); "
        "steady: events/s (default 1000 5000)",
    )
    parser.add_argument("--seconds", type=float, default=30.0, help="steady: duration")
    parser.add_argument("--spike", type=int, help="steady: extra events (default 5 s worth)")
    parser.add_argument("--pool", type=int, default=16, help="dbwrite: PostgreSQL pool size")
    parser.add_argument("--write", action="store_true", help="merge into workloads.json")
    args = parser.parse_args()
    cases: list[dict[str, Any]] = []
    for broker in args.broker:
        for workload in args.workload:
            try:
                if workload == "steady":
                    for value in args.rate or ["1000", "5000"]:
                        cases.append(steady_case(broker, float(value.split("/")[0]), args))
                elif workload == "dbwrite":
                    for value in args.rate or ["2000/s", "none"]:
                        rate = None if value == "none" else value
                        rate = rate if rate is None or "/" in rate else f"{rate}/s"
                        cases.append(burst_case(broker, workload, args, rate))
                else:
                    cases.append(burst_case(broker, workload, args, None))
            except (CaseFailed, subprocess.TimeoutExpired) as exc:
                print(f"{broker:<10} {workload:<7} FAILED: {exc}", flush=True)
                cases.append({"broker": broker, "workload": workload, "verified": False})
    measured = [c for c in cases if "variant" in c]
    if args.write and measured:
        write(measured)
    if not all(c["verified"] for c in cases):
        raise SystemExit(1)


def _child() -> None:
    from benchmarks import _workloads_apps as apps
    from benchmarks import _workloads_steady as steady

    kind, spec = sys.argv[1], json.loads(sys.argv[2])
    if spec["workload"] == "steady":
        work = steady.publish if kind == "_publish" else steady.run
    else:
        work = apps.publish if kind == "_publish" else apps.drain
    print(json.dumps(anyio.run(work, spec)), flush=True)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] in ("_publish", "_run"):
        _child()
    else:
        main()
