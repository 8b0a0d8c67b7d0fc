"""The ``steady`` workload of ``benchmarks/workloads.py``: a paced publisher, a spike, a runner.

The publisher process sends ``rate`` events a second for ``seconds``, in small batches paced
against the clock, and at ``seconds / 2`` adds ``spike`` extra events at once. The runner
process (not in burst mode) was started before it and stops when it has seen every id. Each
event carries the second it was due (``at``), so the runner files its latency (publish time to
handler start) by publish second without sharing a clock origin with the publisher.
"""

from __future__ import annotations

import math
import time
from typing import Any

import anyio

import eventfn
from benchmarks._stats import Histogram, peak_rss_mb
from benchmarks._workloads_apps import BATCH, Tick
from eventfn.brokers import from_url

PACE = 0.005  # seconds between the publisher's batches


class Steady:
    def __init__(self, spec: dict[str, Any]) -> None:
        self.rate: float = spec["rate"]
        self.half: float = spec["seconds"] / 2
        self.steady = round(self.rate * spec["seconds"])
        self.total = self.steady + spec["spike"]
        self.app = eventfn.App("wl-steady")
        self.seen = bytearray(self.total)
        self.handled = self.duplicates = self.redelivered = 0
        self.overall, self.pre, self.spiked = Histogram(), Histogram(), Histogram()
        self.per_second: dict[int, Histogram] = {}
        self.first_published = math.inf
        self.last_handled = 0.0
        self.runner: eventfn.Runner | None = None

        @self.app.on_queue("steady")
        async def tick(event: Tick, ctx: eventfn.Context) -> None:
            now = time.time()
            latency = now - ctx.delivery.published_at
            self.overall.add(latency)
            if event.spike:
                self.spiked.add(latency)
            else:
                if event.at < self.half:
                    self.pre.add(latency)
                second = int(event.at)
                if second not in self.per_second:
                    self.per_second[second] = Histogram()
                self.per_second[second].add(latency)
            self.first_published = min(self.first_published, ctx.delivery.published_at)
            self.last_handled = max(self.last_handled, now)
            if ctx.attempt > 1:
                self.redelivered += 1
            if self.seen[event.n]:
                self.duplicates += 1
                return
            self.seen[event.n] = 1
            self.handled += 1
            if self.handled == self.total and self.runner is not None:
                self.runner.stop()

    def result(self) -> dict[str, Any]:
        pre_p99 = self.pre.quantile(0.99)
        series = [
            [second, hist.quantile(0.99) * 1e3, hist.total]
            for second, hist in sorted(self.per_second.items())
        ]
        recovery = None  # from the spike to the first publish second back under 2x (1 s steps)
        for second, p99_ms, _ in series:
            if second >= int(self.half) and p99_ms < 2 * pre_p99 * 1e3:
                recovery = max(0.0, second - self.half)
                break
        span = self.last_handled - self.first_published
        return {
            "missing": self.total - self.handled,
            "duplicates": self.duplicates,
            "redelivered": self.redelivered,
            "throughput": self.handled / span if span > 0 else 0.0,
            "latency": self.overall.summary(),
            "pre_spike": self.pre.summary(),
            "spike_events": self.spiked.summary(),
            "per_second_p99": series,
            "recovery_s": recovery,
        }


async def publish(spec: dict[str, Any]) -> dict[str, Any]:
    """Publish at the rate, paced against the clock, with the spike at half time."""
    st = Steady(spec)
    app = st.app
    await app.connect(spec["url"])
    start = time.perf_counter()
    sent, spiked, behind, spike_s = 0, st.total == st.steady, 0.0, 0.0
    while sent < st.steady or not spiked:
        now = time.perf_counter() - start
        if not spiked and now >= st.half:
            for first in range(st.steady, st.total, BATCH):
                await app.publish_many(
                    app.message("steady", Tick(n, st.half, spike=True))
                    for n in range(first, min(st.total, first + BATCH))
                )
            spiked = True
            spike_s = time.perf_counter() - start - now
            continue
        due = min(st.steady, int(now * st.rate) + 1)
        if due > sent:
            behind = max(behind, now - sent / st.rate)
            await app.publish_many(
                app.message("steady", Tick(n, n / st.rate)) for n in range(sent, due)
            )
            sent = due
        await anyio.sleep(PACE)
    elapsed = time.perf_counter() - start
    await app.close()
    return {
        "published": st.total,
        "publish_rate": st.steady / elapsed,
        "publish_behind_max_ms": behind * 1e3,
        "spike_publish_ms": spike_s * 1e3,
    }


async def run(spec: dict[str, Any]) -> dict[str, Any]:
    """The runner, as ``eventfn run`` starts it (not burst), until every id was seen; prints
    ``ready`` once it is consuming, so that the publisher starts after it."""
    st = Steady(spec)
    timed_out = False
    async with from_url(spec["url"]) as broker:
        await st.app.connect(broker)
        runner = eventfn.Runner(st.app, broker, concurrency=spec["concurrency"])
        st.runner = runner

        async def watchdog() -> None:
            nonlocal timed_out
            await anyio.sleep(spec["timeout"])
            timed_out = True
            runner.stop()

        async def ready() -> None:
            await anyio.sleep(0.3)
            print("ready", flush=True)

        cpu0, wall0 = time.process_time(), time.perf_counter()
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(watchdog)
            tasks.start_soon(ready)
            summary = await runner.run()
            tasks.cancel_scope.cancel()
        cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
        await st.app.close()
    return {
        "seconds": wall,
        "cpu_s": cpu,
        "cpu_us_per_event": cpu / st.total * 1e6,
        "retried": summary.retried,
        "dead_lettered": summary.dead_lettered,
        "timed_out": timed_out,
        "peak_rss_mb": peak_rss_mb(),
        **st.result(),
    }
