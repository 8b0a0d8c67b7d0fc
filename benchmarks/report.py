"""Regenerate benchmarks/RESULTS.md from benchmarks/results/*.json."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
TARGETS = HERE / "targets.md"


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
        "`--burst`, concurrency as shown) drains them. Throughput is N / drain time (median of "
        "the runs, min-max in brackets); CPU is the runner process's CPU time (its SQLite thread "
        "included) per event; latency is publish time to handler start (in a pre-published burst "
        "it is mostly time spent waiting in the backlog); peak RSS is the runner process's. "
        "Every run checks that every event was handled.",
        "",
        "| broker | handler | N | concurrency | events/s | CPU µs/event | p50 ms | p99 ms "
        "| max ms | peak RSS MB | runs |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for c in doc["cases"]:
        spread = f"({c['throughput_min']:,.0f}-{c['throughput_max']:,.0f})"
        lines.append(
            f"| {c.get('broker', 'sqlite')} | {c['handler']} | {c['n']:,} | {c['concurrency']} "
            f"| {c['throughput']:,.0f} {spread} | {c['cpu_us_per_event']:.1f} "
            f"| {c['p50_ms']:.1f} | {c['p99_ms']:.1f} | {c['max_ms']:.1f} "
            f"| {c['peak_rss_mb']:.1f} | {c['runs']} |"
        )
    lines += [
        "",
        "Reproduce one row: `python benchmarks/burst.py --broker sqlite --n 100000 --handler noop "
        "--runs 3` (`make bench` runs the SQLite rows, `make bench-big` adds N = 1,000,000, "
        "`make bench-brokers` the networked rows).",
        "",
    ]
    return lines


def scaleout_section(doc: dict[str, Any]) -> list[str]:
    lines = [
        "## Elasticity: 1, 2 and 3 runner processes on one broker (`benchmarks/scaleout.py`)",
        "",
        f"Measured {doc['when']} on the same machine. Each runner: concurrency 16, a handler "
        "that sleeps 10 ms (ideal 1,600 events/s per runner); the backlog is published first, "
        "the runners start together in burst mode; every event is counted. The time runs from "
        "starting the processes (interpreter start-up included, about 0.5-1 s of a 4-8 s "
        "drain) to the last exit. The machine has 2 cores, so the third runner competes with "
        "the other two, the broker and the thread that counts events for CPU.",
        "",
        "| broker | runners | N | events/s | vs one runner |",
        "|---|---:|---:|---:|---:|",
    ]
    for c in doc["cases"]:
        lines.append(
            f"| {c['broker']} | {c['runners']} | {c['n']:,} | {c['throughput']:,.0f} | "
            f"{c['ratio']:.2f}x |"
        )
    lines += ["", "Reproduce: `python benchmarks/scaleout.py --broker redis nats postgresql`.", ""]
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


def peers_section(cases: list[dict[str, Any]]) -> list[str]:
    lines = [
        "## eventfn beside FastStream and raw client loops (`benchmarks/peers/`)",
        "",
        "N no-op messages pre-published to Redis Streams or NATS JetStream; one consumer process "
        "(concurrency 64 where the tool has a knob) drains them; median of the runs, min-max in "
        "brackets. Every case checks all N unique ids handled. FastStream per message uses its "
        "documented `max_workers=64`; `batch=True` is its high-throughput mode (the handler gets "
        "a list, `max_workers` does not apply), shown for completeness. The raw loops are "
        "redis-py `XREADGROUP`/`XACK` and a nats-py pull consumer acking each message: the "
        "practical limit of Python on that broker. CPU and peak RSS are the consumer process's.",
        "",
        "| broker | tool | N | msg/s | CPU µs/msg | peak RSS MB | eventfn / this |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    ours = {c["broker"]: c["throughput"] for c in cases if c["tool"] == "eventfn"}
    for c in cases:
        spread = f"({c['throughput_min']:,.0f}-{c['throughput_max']:,.0f})"
        ratio = ours.get(c["broker"], float("nan")) / c["throughput"]
        lines.append(
            f"| {c['broker']} | {c['tool']} | {c['n']:,} | {c['throughput']:,.0f} {spread} "
            f"| {c['cpu_us_per_message']:.1f} | {c['peak_rss_mb']:.1f} | {ratio:.2f}x |"
        )
    lines += [
        "",
        "Reproduce: `make bench-deps && .venv-bench/bin/python benchmarks/peers/faststream_bench.py"
        " --runs 3 --write`.",
        "",
    ]
    return lines


def main() -> None:
    out = ["# Benchmark results", ""]
    if TARGETS.exists():
        out += [TARGETS.read_text().rstrip(), ""]
    burst = RESULTS / "burst.json"
    if burst.exists():
        out += burst_section(json.loads(burst.read_text()))
    scaleout = RESULTS / "scaleout.json"
    if scaleout.exists():
        out += scaleout_section(json.loads(scaleout.read_text()))
    telemetry = RESULTS / "telemetry.json"
    if telemetry.exists():
        out += telemetry_section(json.loads(telemetry.read_text()))
    uploads = RESULTS / "uploads.json"
    if uploads.exists():
        out += uploads_section(json.loads(uploads.read_text()))
    peers = RESULTS / "peers.json"
    if peers.exists():
        out += peers_section(json.loads(peers.read_text()))
    (HERE / "RESULTS.md").write_text("\n".join(out))


if __name__ == "__main__":
    main()
