"""Idempotency across a SIGKILL: a real ``eventfn run`` process on the SQLite broker.

Each of 1,000 events is published three times (same message id). The first runner is killed
with SIGKILL mid-burst; a second one, started with ``--burst``, finishes the work. Every effect
must have happened exactly once: the dead runner's in-progress keys are taken over once their
leases run out, its completed-but-unacked messages come back and are acked as duplicates, and
the copies still queued are duplicates too.

What no idempotency layer can do is tell whether a handler that died *between* its side effect
and the completion record did its effect (a window of a few milliseconds; see
``eventfn.middleware.idempotency``). So the test kills the runner at a moment when no handler is
in that window: it pauses the app (handlers that start from then on park before their effect,
holding their keys in progress) and waits until every counted effect has its completion record.
Everything else about the kill is as it comes: prefetched and leased messages, keys in
progress, completions whose acks were not yet settled, copies not yet fetched.
"""

from __future__ import annotations

import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from contextlib import closing
from pathlib import Path

import anyio
import pytest

from eventfn.brokers import SubscriptionRef, from_url
from tests.apps import idempotent_counter as counter

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
JOBS = SubscriptionRef(destination="jobs", kind="queue")
EVENTS = 1000


def wait_for(condition: Callable[[], bool], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not reached")
        time.sleep(0.01)


def rows(path: Path, sql: str) -> list[tuple[int, ...]]:
    if not path.exists():
        return []
    with closing(sqlite3.connect(path, timeout=30)) as db:
        try:
            return db.execute(sql).fetchall()
        except sqlite3.OperationalError as exc:  # the runner has not created the table yet
            if "no such table" in str(exc):
                return []
            raise


class Setup:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.broker = f"sqlite:///{tmp / 'broker.db'}"
        self.keys = tmp / "broker.idempotency.db"
        self.counter = tmp / "counter.db"
        self.runs = 0
        counter.setup(str(self.counter))

    def runner(self, *args: str) -> subprocess.Popen[str]:
        self.runs += 1
        log = (self.tmp / f"runner-{self.runs}.log").open("w")
        command = [sys.executable, "-m", "eventfn", "--log-level", "warning", "run"]
        command += ["tests.apps.idempotent_counter:app", "--broker", self.broker, *args]
        environ = {
            **os.environ,
            "PYTHONPATH": str(ROOT),
            "COUNTER_DB": str(self.counter),
            "HANDLER_SLEEP": "0.05",
            "EVENTFN_IDEMPOTENCY_LEASE": "2",
        }
        with log:
            return subprocess.Popen(
                command, cwd=self.tmp, env=environ, text=True, stdout=log, stderr=subprocess.STDOUT
            )

    def log(self, run: int) -> str:
        return (self.tmp / f"runner-{run}.log").read_text()

    def counted(self) -> int:
        return int(rows(self.counter, "SELECT coalesce(sum(count), 0) FROM effects")[0][0])

    def completed(self) -> int:
        found = rows(self.keys, "SELECT count(*) FROM idempotency_keys WHERE state = 1")
        return int(found[0][0]) if found else 0

    def in_progress(self) -> int:
        found = rows(self.keys, "SELECT count(*) FROM idempotency_keys WHERE state = 0")
        return int(found[0][0]) if found else 0


async def publish(url: str) -> None:
    # Every event three times with the same id, the copies spread out: some meet their first
    # copy in progress, some find it completed, some are still queued at the kill.
    copies = [n for n in range(EVENTS) for _ in range(3)]
    random.Random(7).shuffle(copies)
    await counter.app.connect(url)
    await counter.app.publish_many(
        counter.app.message("jobs", counter.Job(n), id=f"job-{n}") for n in copies
    )
    await counter.app.close()


async def leftovers(url: str) -> tuple[int, int]:
    async with from_url(url) as broker:
        return (await broker.stats(JOBS)).pending, len(await broker.dead_letters())


def test_sigkill_mid_burst_then_restart_every_effect_happens_once(tmp_path: Path) -> None:
    setup = Setup(tmp_path)
    anyio.run(publish, setup.broker)
    first = setup.runner("--concurrency", "64", "--lease", "2")
    try:
        wait_for(lambda: setup.counted() >= 300)
        counter.pause(True, str(setup.counter))
        # no handler between its effect and its completion record: each effect is recorded
        wait_for(lambda: setup.completed() == setup.counted())
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=30)
    counted, held = setup.counted(), setup.in_progress()
    assert counted < EVENTS, "the burst finished before the kill; make it longer"
    assert held > 0, "no key was in progress at the kill: the take-over path went untested"

    counter.pause(False, str(setup.counter))
    second = setup.runner("--concurrency", "64", "--lease", "2", "--burst")
    try:
        status = second.wait(timeout=120)
    finally:
        if second.poll() is None:
            second.kill()
            second.wait()
    assert status == 0, setup.log(2)

    effects = {n: count for n, count in rows(setup.counter, "SELECT n, count FROM effects")}
    assert effects == {n: 1 for n in range(EVENTS)}
    assert anyio.run(leftovers, setup.broker) == (0, 0)
    assert "handled" in setup.log(2)
