"""Real ``eventfn`` processes on the SQLite broker: crash, graceful shutdown, the CLI."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import anyio
import pytest

from eventfn.brokers import SubscriptionRef, from_url
from tests.apps import recorder

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
JOBS = SubscriptionRef(destination="jobs", kind="queue")


class Env:
    def __init__(self, tmp: Path) -> None:
        self.broker = f"sqlite:///{tmp / 'broker.db'}"
        self.records = str(tmp / "records.db")
        self.tmp = tmp
        self.runs = 0
        recorder.setup(self.records)

    def environ(self, **extra: str) -> dict[str, str]:
        return {**os.environ, "RECORD_DB": self.records, "PYTHONPATH": str(ROOT), **extra}

    def eventfn(
        self, *args: str, stdin: str | None = None, **env: str
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "eventfn", *args],
            input=stdin,
            capture_output=True,
            text=True,
            cwd=ROOT,
            env=self.environ(**env),
            timeout=120,
        )

    def start_runner(self, *args: str, **env: str) -> Runner:
        self.runs += 1
        log = self.tmp / f"runner-{self.runs}.log"
        with log.open("w") as sink:
            process = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "eventfn",
                    "--log-level",
                    "warning",
                    "run",
                    "tests.apps.recorder:app",
                    "--broker",
                    self.broker,
                    *args,
                ],
                cwd=ROOT,
                env=self.environ(**env),
                text=True,
                stdout=sink,
                stderr=subprocess.STDOUT,
            )
        return Runner(process, log)

    def rows(self, sql: str) -> list[tuple[object, ...]]:
        with sqlite3.connect(self.records, timeout=30) as db:
            return db.execute(sql).fetchall()

    def count(self, kind: str) -> int:
        return int(self.rows(f"SELECT COUNT(*) FROM events WHERE kind = '{kind}'")[0][0])  # type: ignore[call-overload]


class Runner:
    """A runner process whose output goes to a log file (no pipes to leak or fill up)."""

    def __init__(self, process: subprocess.Popen[str], log: Path) -> None:
        self.process = process
        self.log = log

    def kill(self) -> None:
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=30)

    def terminate(self) -> None:
        self.process.send_signal(signal.SIGTERM)

    def finish(self, timeout: float = 120) -> str:
        """Wait for the exit; return the output, asserting exit status 0."""
        try:
            self.process.wait(timeout=timeout)
        finally:
            if self.process.poll() is None:
                self.process.kill()
                self.process.wait()
        output = self.log.read_text()
        assert self.process.returncode == 0, output
        return output


@pytest.fixture
def env(tmp_path: Path) -> Iterator[Env]:
    yield Env(tmp_path)


def wait_for(condition: Callable[[], bool], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not reached")
        time.sleep(0.01)


def publish_jobs(env: Env, count: int) -> None:
    lines = "\n".join(json.dumps({"n": n}) for n in range(count))
    result = env.eventfn("publish", "jobs", "-", "--broker", env.broker, stdin=lines)
    assert result.returncode == 0, result.stderr
    assert f"published {count} messages to jobs" in result.stdout


def declare(env: Env) -> None:
    async def go() -> None:
        await recorder.app.connect(env.broker)
        await recorder.app.close()

    anyio.run(go)


async def _stats(url: str) -> tuple[int, int, int, int]:
    async with from_url(url) as broker:
        stats = await broker.stats(JOBS)
        return stats.ready, stats.delayed, stats.in_flight, stats.dead


def test_sigkill_mid_burst_loses_nothing(env: Env) -> None:
    declare(env)
    publish_jobs(env, 5000)
    first = env.start_runner("--concurrency", "16", "--lease", "2")
    wait_for(lambda: env.count("finished") >= 1000)
    first.kill()
    handled_before = env.count("finished")
    assert handled_before < 5000, "the burst finished before the kill; make it longer"

    out = env.start_runner("--concurrency", "16", "--lease", "2", "--burst").finish()
    handled = {n for (n,) in env.rows("SELECT DISTINCT n FROM events WHERE kind = 'finished'")}
    assert handled == set(range(5000))
    # the dead runner's leased messages came back after the lease, with the attempt raised
    redelivered = env.rows("SELECT COUNT(*) FROM events WHERE kind = 'started' AND attempt = 2")
    assert redelivered[0][0] >= 1  # type: ignore[operator]
    assert anyio.run(_stats, env.broker) == (0, 0, 0, 0)
    assert "handled" in out


def test_sigterm_finishes_in_flight_and_returns_unstarted_unharmed(env: Env) -> None:
    declare(env)
    publish_jobs(env, 200)
    runner = env.start_runner("--concurrency", "4", "--grace", "30", HANDLER_SLEEP="0.3")
    wait_for(lambda: env.count("started") >= 6)
    runner.terminate()
    runner.finish(timeout=60)
    started = {n for (n,) in env.rows("SELECT n FROM events WHERE kind = 'started'")}
    finished = {n for (n,) in env.rows("SELECT n FROM events WHERE kind = 'finished'")}
    assert started == finished  # every in-flight handler was allowed to finish
    ready, delayed, in_flight, dead = anyio.run(_stats, env.broker)
    assert (ready, delayed, in_flight, dead) == (200 - len(finished), 0, 0, 0)

    env.start_runner("--concurrency", "32", "--burst").finish()
    attempts = env.rows("SELECT n, attempt FROM events WHERE kind = 'started'")
    assert {n for n, _ in attempts} == set(range(200))
    assert all(attempt == 1 for _, attempt in attempts)  # released without counting an attempt


def test_cli_publish_inspect_and_burst(env: Env) -> None:
    declare(env)
    bad = env.eventfn(
        "publish", "jobs", "-", "--broker", env.broker, stdin='{"n": 1}\n{"n": 2\n{"n": 3}'
    )
    assert bad.returncode == 2
    assert "line 2 is not valid JSON" in bad.stderr
    assert "published the 1 messages before it" in bad.stderr
    source = env.tmp / "jobs.jsonl"
    source.write_text('{"n": 10}\n\n{"n": 11}\n')
    ok = env.eventfn("publish", "jobs", "--file", str(source), "--broker", env.broker)
    assert ok.returncode == 0 and "published 2 messages" in ok.stdout
    one = env.eventfn(
        "publish", "jobs", '{"n": 12}', "--type", "job.created", "--broker", env.broker
    )
    assert one.returncode == 0, one.stderr

    inspect = env.eventfn("inspect", "tests.apps.recorder:app")
    assert inspect.returncode == 0
    assert "queue  jobs" in inspect.stdout and "tests.apps.recorder.work" in inspect.stdout

    run = env.eventfn("run", "tests.apps.recorder:app", "--burst", "--broker", env.broker)
    assert run.returncode == 0, run.stderr
    assert "handled 4, retried 0, dead-lettered 0" in run.stdout
    assert sorted(n for (n,) in env.rows("SELECT n FROM events WHERE kind = 'finished'")) == [
        1,
        10,
        11,
        12,
    ]
    assert "handled jobs id=" in run.stderr  # the runner's log shows each message


def test_cli_errors_are_clear(env: Env) -> None:
    declare(env)
    unknown = env.eventfn("publish", "jobs", "{}", "--broker", "kafka://user:hunter2@127.0.0.1/x")
    assert unknown.returncode == 2
    assert "no installed broker handles kafka://" in unknown.stderr
    assert "memory" in unknown.stderr and "sqlite" in unknown.stderr
    assert "hunter2" not in unknown.stderr
    undeclared = env.eventfn("publish", "nowhere", "{}", "--broker", env.broker)
    assert (
        undeclared.returncode == 2
        and "nothing has declared destination 'nowhere'" in undeclared.stderr
    )
    missing = env.eventfn("run", "no_such_module:app", "--broker", env.broker)
    assert missing.returncode == 2 and "cannot import 'no_such_module'" in missing.stderr
    not_app = env.eventfn("inspect", "tests.apps.recorder:Job")
    assert not_app.returncode == 2 and "not an eventfn.App" in not_app.stderr
    from_env = env.eventfn("publish", "jobs", '{"n": 1}', EVENTFN_BROKER=env.broker)
    assert from_env.returncode == 0, from_env.stderr
