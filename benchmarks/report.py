"""Regenerate benchmarks/RESULTS.md from benchmarks/results/*.json."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._report_workloads import workloads_section
from benchmarks._targets import rows

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
TARGETS = HERE / "targets.md"
GAPS = HERE / "gaps.md"  # prose on the targets not met


def machine_line(machine: dict[str, Any]) -> str:
    return (
        f"{machine['cpu']}, {machine['cores']} cores, {machine['memory_gib']} GiB; "
        f"Python {machine['python']}, SQLite {machine['sqlite']}; {machine['platform']}"
    )


def burst_section(doc: dict[str, Any]) -> list[str]:
    lines = [
        "## Burst drain on every broker (`benchmarks/burst.py`)",
        "",
        f"Measured {doc['when']} on: {machine_line(doc['machine'])}.",
        "",
        "N events are published to a queue before the runner starts; the runner (one process, "
        "`--burst`, concurrency as shown) drains them. Throughput is N / drain time, from "
        "the start of `Runner.run()` to the return of the last handler, as the peers are "
        "measured (median of the runs, min-max in brackets; `run()` returns a few to a hundred "
        "ms later, once the last settles are flushed and burst mode has seen the queue empty: "
        "`exit_seconds` in the JSON); CPU is the runner process's CPU time (its SQLite thread "
        "included, up to `run()` returning) per event; latency is publish time to handler "
        "start (in a pre-published burst "
        "it is mostly time spent waiting in the backlog); peak RSS is the runner process's. "
        "Every run checks that every event was handled.",
        "",
        "![throughput vs N](plots/throughput_vs_n.png) ![RSS vs N](plots/rss_vs_n.png)",
        "",
        "| broker | handler | N | concurrency | events/s | CPU µs/event | p50 ms | p99 ms "
        "| max ms | peak RSS MB | runs | reproduce |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for c in doc["cases"]:
        spread = f"({c['throughput_min']:,.0f}-{c['throughput_max']:,.0f})"
        lines.append(
            f"| {c.get('broker', 'sqlite')} | {c['handler']} | {c['n']:,} | {c['concurrency']} "
            f"| {c['throughput']:,.0f} {spread} | {c['cpu_us_per_event']:.1f} "
            f"| {c['p50_ms']:.1f} | {c['p99_ms']:.1f} | {c['max_ms']:.1f} "
            f"| {c['peak_rss_mb']:.1f} | {c['runs']} "
            f"| `python benchmarks/burst.py --broker {c.get('broker', 'sqlite')} --handler "
            f"{c['handler']} --n {c['n']} --runs {c['runs']}` |"
        )
    lines += [
        "",
        "Each row's command reproduces it (`--write` saves it to results/burst.json).",
        "",
    ]
    return lines


def scaleout_section(doc: dict[str, Any]) -> list[str]:
    lines = [
        "## Scale-out: 1, 2 and 3 runner processes on one broker (`benchmarks/scaleout.py`)",
        "",
        f"Measured {doc['when']} on the same machine. Each runner (`eventfn run --burst`): "
        "concurrency 16, a handler that sleeps 10 ms (ideal 1,600 events/s per runner). The "
        "backlog is published first and the runners start together; each records when it "
        "handled which event, so the time runs from the first event any runner handled to the "
        "last (interpreter start-up excluded). Every event is counted once across the runners. "
        "The machine has 2 cores: a third runner competes with the other two and the broker "
        "server for CPU.",
        "",
        "![throughput vs runners](plots/throughput_vs_runners.png)",
        "",
        "| broker | runners | N | events/s | vs one runner | events per runner | runs "
        "| reproduce |",
        "|---|---:|---:|---:|---:|---|---:|---|",
    ]
    for c in doc["cases"]:
        spread = f"({c.get('throughput_min', c['throughput']):,.0f}-"
        spread += f"{c.get('throughput_max', c['throughput']):,.0f})"
        shares = ", ".join(f"{n:,}" for n in c.get("per_runner", []))
        lines.append(
            f"| {c['broker']} | {c['runners']} | {c['n']:,} | {c['throughput']:,.0f} {spread} "
            f"| {c['ratio']:.2f}x | {shares} | {c.get('runs', 1)} "
            f"| `python benchmarks/scaleout.py --broker {c['broker']} --n {c['n']} "
            f"--runs {c.get('runs', 1)}` |"
        )
    lines += [
        "",
        "Reproduce: `python benchmarks/scaleout.py --broker redis nats amqp postgresql --n 8000 "
        "--runs 3`.",
        "",
    ]
    return lines


def telemetry_section(doc: dict[str, Any]) -> list[str]:
    lines = [
        "## What telemetry costs (`benchmarks/telemetry_overhead.py`)",
        "",
        f"Measured {doc['when']} on the same machine. The no-op burst on SQLite (one runner, "
        "concurrency 64), each case in fresh processes, interleaved runs, median and range. "
        "`off`: no providers (what `eventfn run` does without an OTLP endpoint); `noop`: the "
        "API's no-op providers set explicitly; `unsampled`: SDK providers, a sampler that drops "
        "every trace and a meter provider without a reader; `memory`: SDK providers recording "
        "everything (a `BatchSpanProcessor` into the in-memory exporter, the in-memory metric "
        "reader). The ratio is to `off`.",
        "",
        "| telemetry | N | events/s | CPU µs/event | ratio to off | spans kept |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for c in doc["cases"]:
        spread = f"({c['throughput_min']:,.0f}-{c['throughput_max']:,.0f})"
        lines.append(
            f"| {c['case']} | {c['n']:,} | {c['throughput']:,.0f} {spread} "
            f"| {c['cpu_us_per_event']:.1f} | {c['ratio']:.2f} | {c['spans']:,} |"
        )
    lines += ["", "Reproduce: `python benchmarks/telemetry_overhead.py --write`.", ""]
    return lines


def uploads_section(doc: dict[str, Any]) -> list[str]:
    lines = [
        "## Upload burst (`benchmarks/upload_burst.py`)",
        "",
        f"Measured {doc['when']} on the same machine. A runner (SQLite broker, one `on_upload` "
        "handler, watcher settle time 1 s) watches an empty bucket; a separate process writes N "
        "small files straight into the directory. Time runs from the writer's start to the last "
        "handled event (the writer's own time included); every run checks N keys handled, none "
        "twice. CPU is the runner process's (watcher, publishing and handling).",
        "",
        "| N | handled after (s) | writer took (s) | events/s | runner CPU µs/event | runs |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for c in doc["cases"]:
        spread = f"({c['throughput_min']:,.0f}-{c['throughput_max']:,.0f})"
        lines.append(
            f"| {c['n']:,} | {c['elapsed']:.2f} | {c['written']:.2f} "
            f"| {c['throughput']:,.0f} {spread} | {c['cpu_us_per_event']:.0f} | {c['runs']} |"
        )
    lines += ["", "Reproduce: `python benchmarks/upload_burst.py --write`.", ""]
    return lines


def peers_section(doc: dict[str, Any] | list[dict[str, Any]]) -> list[str]:
    cases = doc["cases"] if isinstance(doc, dict) else doc
    lines = [
        "## eventfn beside the tools a team would pick instead (`benchmarks/peers/run.py`)",
        "",
        "N messages pre-published to Redis Streams or NATS JetStream; then one consumer process "
        "drains them, at concurrency 64 where the tool has a knob. Median of the runs, min-max "
        "in brackets; tools take turns going first. Every case checks all N unique ids handled "
        "and nothing left unacknowledged. Latency is publish time to handler start (in a "
        "pre-published burst: time spent waiting in the backlog). CPU and peak RSS are the "
        "consumer process's. `raw` is a hand-written client loop that acks every message "
        "(redis-py `XREADGROUP`/`XACK`, a nats-py pull consumer): the practical limit of Python "
        "on that broker. How each tool is configured is in the last column; peers are "
        "installed only into `.venv-bench` (`make bench-deps`).",
        "",
        "![peers](plots/peers.png)",
        "",
        "| handler | broker | tool | N | msg/s | CPU µs/msg | p99 ms | peak RSS MB "
        "| eventfn / this | settings |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    ours = {(c.get("handler", "noop"), c["broker"]): c for c in cases if c["tool"] == "eventfn"}
    for c in cases:
        handler = c.get("handler", "noop")
        spread = f"({c['throughput_min']:,.0f}-{c['throughput_max']:,.0f})"
        mine = ours.get((handler, c["broker"]))
        ratio = f"{mine['throughput'] / c['throughput']:.2f}x" if mine else "-"
        p99 = f"{c['p99_ms']:,.0f}" if "p99_ms" in c else "-"
        lines.append(
            f"| {handler} | {c['broker']} | {c['tool']} | {c['n']:,} "
            f"| {c['throughput']:,.0f} {spread} | {c['cpu_us_per_message']:.1f} | {p99} "
            f"| {c['peak_rss_mb']:.1f} | {ratio} | {c.get('settings', '')} |"
        )
    lines += [
        "",
        "Reproduce: `make bench-deps && .venv-bench/bin/python benchmarks/peers/run.py --runs 3 "
        "--handler noop sleep` (`--tool`, `--broker` pick cases).",
        "",
    ]
    return lines


def loops_section(doc: dict[str, Any]) -> list[str]:
    broker, bare = doc["broker"], doc["bare"]
    return [
        "## The SQLite broker beside a bare loop over its schema (`benchmarks/sqlite_loop.py`)",
        "",
        f"Measured {doc['when']}. {doc['n']:,} messages; the broker's own fetch/settle loop "
        "(no runner) and a bare synchronous sqlite3 loop with the same claim statement, each "
        "body decoded with msgspec, and the acks deleted in one transaction per batch: the "
        f"practical limit of SQLite from Python. Median of {doc['rounds']} rounds.",
        "",
        "| loop | msg/s | CPU µs/msg |",
        "|---|---:|---:|",
        f"| broker fetch/settle | {broker['throughput']:,.0f} "
        f"({broker['throughput_min']:,.0f}-{broker['throughput_max']:,.0f}) "
        f"| {broker['cpu_us_per_message']:.1f} |",
        f"| bare sqlite3 claim-decode-ack | {bare['throughput']:,.0f} "
        f"({bare['throughput_min']:,.0f}-{bare['throughput_max']:,.0f}) "
        f"| {bare['cpu_us_per_message']:.1f} |",
        "",
        "Reproduce: `python benchmarks/sqlite_loop.py --json -n 100000 --rounds 5`.",
        "",
    ]


def middleware_section(doc: dict[str, Any]) -> list[str]:
    lines = [
        "## Middleware overhead (#3) and where the time goes (`middleware_overhead.py`)",
        "",
        f"Measured {doc['when']}. SQLite broker, no-op handler, concurrency 64, N = "
        f"{doc['cases'][0]['n']:,}, fresh processes per run, runs interleaved; median and range.",
        "",
        "| chain | events/s | CPU µs/event | ratio to bare |",
        "|---|---:|---:|---:|",
    ]
    names = {
        "bare": "bare (retry and dead letter on, as always)",
        "timeout": "`timeout=10` only",
        "idempotent": "`idempotent=True` only",
        "full": "full: `idempotent=True, timeout=10, retry=Retry()`",
    }
    for c in doc["cases"]:
        spread = f"({c['throughput_min']:,.0f}-{c['throughput_max']:,.0f})"
        lines.append(
            f"| {names.get(c['case'], c['case'])} | {c['throughput']:,.0f} {spread} "
            f"| {c['cpu_us_per_event']:.1f} | {c['ratio']:.2f} |"
        )
    lines.append("")
    if TARGETS.exists():
        lines += [TARGETS.read_text().rstrip(), ""]
    return lines


def header(results: dict[str, Any]) -> list[str]:
    lines = [
        "# Benchmark results",
        "",
        "Generated by `benchmarks/report.py` from `benchmarks/results/*.json`; the plots in "
        "`benchmarks/plots/` by `benchmarks/plots.py`. `make bench` runs the quick profile (a "
        "few minutes), `make bench-full` everything (`benchmarks/suite.py --full`). The machine "
        "is shared and has 2 cores, so single runs vary by up to about 30%: tables give medians "
        "of several runs with min-max, and comparisons are made side by side in one run.",
        "",
    ]
    suite = results.get("suite")
    if suite:
        lines += [
            f"Last suite run: `{suite['profile']}` profile, {suite['when']}, "
            f"{suite['seconds'] / 60:.1f} minutes:",
            "",
            "| step | command | seconds |",
            "|---|---|---:|",
        ]
        for step in suite["steps"]:
            lines.append(f"| {step['step']} | `{step['command']}` | {step['seconds']:.0f} |")
        lines.append("")
    return lines


def targets_section(results: dict[str, Any]) -> list[str]:
    lines = [
        "## Targets and where they stand",
        "",
        "Checked by `report.py` against the results below, each with the command that measures "
        "it. Where a target is not met, the section on that benchmark says where the time goes.",
        "",
        "| issue | target | measured | status | command |",
        "|---|---|---|---|---|",
    ]
    lines += [row.cells() for row in rows(results)]
    lines.append("")
    if GAPS.exists():
        lines += [GAPS.read_text().rstrip(), ""]
    return lines


def main() -> None:
    results = {path.stem: json.loads(path.read_text()) for path in sorted(RESULTS.glob("*.json"))}
    out = header(results) + targets_section(results)
    sections: list[tuple[str, Callable[[Any], list[str]]]] = [
        ("burst", burst_section),
        ("loops", loops_section),
        ("peers", peers_section),
        ("workloads", workloads_section),
        ("scaleout", scaleout_section),
        ("telemetry", telemetry_section),
        ("uploads", uploads_section),
        ("middleware", middleware_section),
    ]
    for name, section in sections:
        if name in results:
            out += section(results[name])
    (HERE / "RESULTS.md").write_text("\n".join(out))


if __name__ == "__main__":
    main()
