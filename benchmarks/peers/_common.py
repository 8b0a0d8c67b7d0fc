"""What every peer tool's benchmark module shares: the message body, the handled-id counter.

A tool module ``benchmarks/peers/_<tool>.py`` provides (see ``benchmarks/peers/run.py``), as
module-level names or, for several variants of one tool, as objects in a list ``TOOLS``:

    TOOL: str                      # its name in the tables, e.g. "dramatiq"
    BROKERS: tuple[str, ...]       # the brokers it runs on here, e.g. ("redis",)
    def settings(handler: str, concurrency: int) -> str       # its configuration, one line
    def publish(broker: str, url: str, key: str, n: int) -> None
    def consume(broker: str, url: str, key: str, n: int, handler: str,
                concurrency: int, done: Done) -> None
    def leftover(broker: str, url: str, key: str) -> int      # unacked; deletes what key made

``publish`` pre-publishes messages ``body(i)`` for i in range(n), with the tool's own client.
``consume`` runs the tool's consumer in this process until ``done.event`` is set (every handler
calls ``handle_noop``/``handle_sleep`` below, or the same for threads), then stops it cleanly.
Each runs in a fresh process of its own.
"""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

from benchmarks._stats import Histogram, peak_rss_mb

PAD = {"sku": "ABC-123", "quantity": 3, "note": "x" * 120}  # bodies of about 200 bytes
SLEEP = 0.005  # the I/O-bound handler's wait


def body(number: int) -> dict[str, Any]:
    """One message: its number, when it was published (epoch seconds), padding."""
    return {"n": number, "t": time.time(), **PAD}


class Done:
    """Unique ids handled, latency from publish to handler start, and when the N-th came.

    Thread-safe: thread-pool tools (Dramatiq, Celery) mark from their worker threads."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.seen = bytearray(n)
        self.unique = 0
        self.calls = 0
        self.latency = Histogram()
        self.started = 0.0
        self.cpu_started = 0.0
        self.at = 0.0
        self.cpu = 0.0
        self.event = threading.Event()
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._async: asyncio.Event | None = None

    def start(self) -> None:
        """Call right before the consumer starts consuming: the clock starts here."""
        self.started, self.cpu_started = time.perf_counter(), time.process_time()

    def mark(self, number: int, published_at: float) -> None:
        """A handler started on message ``number`` published at ``published_at`` (epoch s)."""
        self.latency.add(time.time() - published_at)
        with self._lock:
            self.calls += 1
            if self.seen[number]:
                return
            self.seen[number] = 1
            self.unique += 1
            if self.unique < self.n:
                return
            self.at, self.cpu = time.perf_counter(), time.process_time()
        self.event.set()
        if self._loop is not None and self._async is not None:
            self._loop.call_soon_threadsafe(self._async.set)

    async def wait(self, limit: float = 600.0) -> None:
        """In an asyncio consumer: until every id was handled (SystemExit after ``limit``)."""
        self._loop = asyncio.get_running_loop()
        self._async = asyncio.Event()
        if self.event.is_set():
            return
        try:
            await asyncio.wait_for(self._async.wait(), limit)
        except TimeoutError:
            missing = f"only {self.unique} of {self.n} handled after {limit:.0f} s"
            raise SystemExit(missing) from None

    def wait_blocking(self, limit: float = 600.0) -> None:
        """In a thread-based consumer: the same, blocking."""
        if not self.event.wait(limit):
            raise SystemExit(f"only {self.unique} of {self.n} handled after {limit:.0f} s")

    def result(self) -> dict[str, Any]:
        """The measured outcome of one consumer run (printed as JSON by the driver)."""
        wall, cpu = self.at - self.started, self.cpu - self.cpu_started
        return {
            "handled": self.unique,
            "calls": self.calls,
            "seconds": wall,
            "throughput": self.n / wall,
            "cpu_us_per_message": cpu / self.n * 1e6,
            "peak_rss_mb": peak_rss_mb(),
            **self.latency.summary(),
        }


async def handle_noop(done: Done, number: int, published_at: float) -> None:
    done.mark(number, published_at)


async def handle_sleep(done: Done, number: int, published_at: float) -> None:
    done.mark(number, published_at)
    await asyncio.sleep(SLEEP)


def handle_noop_sync(done: Done, number: int, published_at: float) -> None:
    done.mark(number, published_at)


def handle_sleep_sync(done: Done, number: int, published_at: float) -> None:
    done.mark(number, published_at)
    time.sleep(SLEEP)
