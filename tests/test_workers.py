"""``eventfn run`` in production: --workers, --reload, --health, --log-format; real processes."""

from __future__ import annotations

import http.client
import json
import logging
import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest

import eventfn
from eventfn.runtime.logs import JsonFormatter
from eventfn.runtime.supervisor import Backoff, describe_exit, worker_argv
from tests.apps import recorder

ROOT = Path(__file__).resolve().parents[1]
STARTED = re.compile(r"worker (\d+) started: pid (\d+)")

RELOADABLE = """
import os
import sqlite3

import msgspec

import eventfn

VERSION = {version!r}


class Job(msgspec.Struct, frozen=True):
    n: int


app = eventfn.App("reloadable")


@app.on_queue("jobs")
async def record(job: Job) -> None:
    with sqlite3.connect(os.environ["SEEN_DB"], timeout=30) as db:
        db.execute("INSERT INTO seen VALUES (?, ?)", (job.n, VERSION))
"""


def wait_for(condition: Callable[[], object], timeout: float = 60, what: str = "") -> Any:
    """Poll ``condition`` until it returns something truthy; return that."""
    deadline = time.monotonic() + timeout
    while not (result := condition()):
        if time.monotonic() > deadline:
            raise TimeoutError(f"not reached within {timeout}s: {what or condition}")
        time.sleep(0.02)
    return result


class Process:
    """An ``eventfn`` process whose stdout and stderr go to files (no pipe to fill up)."""

    def __init__(self, args: list[str], cwd: Path, env: dict[str, str], logs: Path) -> None:
        self.out, self.err = logs.with_suffix(".out"), logs.with_suffix(".err")
        with self.out.open("w") as out, self.err.open("w") as err:
            self.popen = subprocess.Popen(
                [sys.executable, "-m", "eventfn", *args], cwd=cwd, env=env, stdout=out, stderr=err
            )

    def log(self) -> str:
        return self.err.read_text()

    def workers(self) -> list[tuple[int, int]]:
        """(index, pid) of every worker the supervisor started, in order."""
        return [(int(i), int(pid)) for i, pid in STARTED.findall(self.log())]

    def wait_log(self, pattern: str, timeout: float = 60) -> re.Match[str]:
        def found() -> re.Match[str] | None:
            exited = self.popen.poll() is not None  # read before the log: it is complete then
            match = re.search(pattern, self.log())
            if match is None and exited:
                raise AssertionError(f"exited without logging {pattern!r}:\n{self.log()}")
            return match

        match: re.Match[str] = wait_for(found, timeout, f"{pattern!r} in the log")
        return match

    def health_port(self) -> int:
        return int(self.wait_log(r"health on http://127\.0\.0\.1:(\d+)").group(1))

    def finish(self, timeout: float = 90) -> str:
        """Wait for the exit; return the log, asserting exit status 0."""
        try:
            self.popen.wait(timeout=timeout)
        finally:
            self.kill()
        assert self.popen.returncode == 0, self.log()
        return self.log()

    def kill(self) -> None:
        """Leave nothing running: the process, and any worker it started."""
        if self.popen.poll() is None:
            self.popen.kill()
            self.popen.wait()
        for _, pid in self.workers():
            if _is_eventfn(pid):
                os.kill(pid, signal.SIGKILL)


def _is_eventfn(pid: int) -> bool:
    try:
        return b"eventfn" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


class Env:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.broker = f"sqlite:///{tmp / 'broker.db'}"
        self.records = str(tmp / "records.db")
        self.started: list[Process] = []
        recorder.setup(self.records)

    def environ(self, **extra: str) -> dict[str, str]:
        return {**os.environ, "RECORD_DB": self.records, "PYTHONPATH": str(ROOT), **extra}

    def start(self, *args: str, cwd: Path = ROOT, level: str = "info", **env: str) -> Process:
        argv = ["--log-level", level, "run", *args, "--broker", self.broker]
        name = self.tmp / f"eventfn-{len(self.started)}"
        process = Process(argv, cwd, self.environ(**env), name)
        self.started.append(process)
        return process

    def publish(self, *documents: dict[str, int]) -> None:
        lines = "\n".join(json.dumps(d) for d in documents)
        result = subprocess.run(
            [sys.executable, "-m", "eventfn", "publish", "jobs", "-", "--broker", self.broker],
            input=lines,
            capture_output=True,
            text=True,
            cwd=ROOT,
            env=self.environ(),
            timeout=120,
        )
        assert result.returncode == 0, result.stderr

    def declare(self, app: eventfn.App) -> None:
        async def go() -> None:
            await app.connect(self.broker)
            await app.close()

        anyio.run(go)

    def rows(self, database: str, sql: str) -> list[tuple[Any, ...]]:
        with sqlite3.connect(database, timeout=30) as db:
            return db.execute(sql).fetchall()

    def count(self, kind: str) -> int:
        sql = f"SELECT COUNT(DISTINCT n) FROM events WHERE kind = '{kind}'"
        return int(self.rows(self.records, sql)[0][0])


@pytest.fixture
def env(tmp_path: Path) -> Iterator[Env]:
    env = Env(tmp_path)
    yield env
    for process in env.started:
        process.kill()


def get(port: int, path: str, method: str = "GET") -> tuple[int, str]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        connection.request(method, path)
        response = connection.getresponse()
        return response.status, response.read().decode()
    finally:
        connection.close()


# -- --workers ---------------------------------------------------------------------------------


@pytest.mark.slow
def test_workers_burst_restarts_a_killed_worker_and_loses_nothing(env: Env) -> None:
    env.declare(recorder.app)
    jobs = 3000
    env.publish(*({"n": n} for n in range(jobs)))
    supervisor = env.start(
        "tests.apps.recorder:app", "--workers", "2", "--burst", "--concurrency", "8", "--lease", "2"
    )
    wait_for(lambda: len(supervisor.workers()) == 2, what="two workers")
    wait_for(lambda: env.count("finished") >= 300, what="300 jobs handled")
    index, pid = supervisor.workers()[0]
    os.kill(pid, signal.SIGKILL)
    assert env.count("finished") < jobs, "the burst ended before the kill; give it more jobs"

    supervisor.wait_log(rf"worker {index} \(pid {pid}\) died: killed by SIGKILL")
    log = supervisor.finish()
    assert [i for i, _ in supervisor.workers()].count(index) == 2, log  # started again
    handled = {n for (n,) in env.rows(env.records, "SELECT n FROM events WHERE kind='finished'")}
    assert handled == set(range(jobs))
    assert log.count("finished its burst") == 2


@pytest.mark.slow
def test_sigterm_stops_the_workers_gracefully(env: Env) -> None:
    env.declare(recorder.app)
    env.publish(*({"n": n} for n in range(200)))
    supervisor = env.start(
        "tests.apps.recorder:app",
        "--workers=2",
        "--concurrency",
        "4",
        "--health",
        "127.0.0.1:0",
        HANDLER_SLEEP="0.5",
    )
    port = supervisor.health_port()
    wait_for(lambda: get(port, "/readyz") == (200, "ready\n"), what="both workers up")
    wait_for(lambda: env.count("started") >= 8, what="both workers busy")
    pids = [pid for _, pid in supervisor.workers()]
    began = time.monotonic()
    supervisor.popen.send_signal(signal.SIGTERM)
    log = supervisor.finish(timeout=60)
    assert time.monotonic() - began < 20, log
    started = env.rows(env.records, "SELECT n FROM events WHERE kind = 'started'")
    finished = env.rows(env.records, "SELECT n FROM events WHERE kind = 'finished'")
    assert sorted(started) == sorted(finished)  # every in-flight handler finished
    assert len(pids) == 2 and not any(_is_eventfn(pid) for pid in pids)
    assert "died" not in log and "second" not in log  # one SIGTERM each: a graceful stop
    assert "[worker 0] eventfn" in log and "[worker 1] eventfn" in log


# -- --reload ----------------------------------------------------------------------------------


@pytest.mark.slow
def test_reload_restarts_the_worker_with_the_new_code(env: Env, tmp_path: Path) -> None:
    module = tmp_path / "reloadable.py"
    module.write_text(RELOADABLE.format(version="v1"))
    seen = str(tmp_path / "seen.db")
    env.rows(seen, "CREATE TABLE seen (n INT, version TEXT)")
    namespace: dict[str, Any] = {}
    exec(compile(module.read_text(), str(module), "exec"), namespace)  # declare its queue
    env.declare(namespace["app"])
    # the rewrite has the same size and may have the same mtime second: no stale .pyc
    runner = env.start(
        "reloadable:app", "--reload", cwd=tmp_path, SEEN_DB=seen, PYTHONDONTWRITEBYTECODE="1"
    )
    runner.wait_log(r"worker 0 started")
    env.publish({"n": 1})
    wait_for(lambda: env.rows(seen, "SELECT version FROM seen WHERE n = 1"), what="n=1 seen")
    assert env.rows(seen, "SELECT version FROM seen WHERE n = 1") == [("v1",)]

    module.write_text(RELOADABLE.format(version="v2"))
    runner.wait_log(r"reloading: reloadable\.py changed")
    wait_for(lambda: len(runner.workers()) >= 2, what="the worker started again")
    env.publish({"n": 2})
    wait_for(lambda: env.rows(seen, "SELECT version FROM seen WHERE n = 2"), what="n=2 seen")
    assert env.rows(seen, "SELECT version FROM seen ORDER BY n") == [("v1",), ("v2",)]
    runner.popen.send_signal(signal.SIGTERM)
    log = runner.finish()
    assert "worker 0 (pid" in log and "stopped for the reload" in log


# -- --health ----------------------------------------------------------------------------------


@pytest.mark.slow
def test_health_endpoints_of_a_runner(env: Env) -> None:
    env.declare(recorder.app)
    env.publish(*({"n": n} for n in range(20)))
    runner = env.start(
        "tests.apps.recorder:app",
        "--concurrency",
        "2",
        "--grace",
        "3",
        "--health",
        "127.0.0.1:0",
        HANDLER_SLEEP="60",
    )
    port = runner.health_port()
    assert get(port, "/healthz") == (200, "ok\n")
    wait_for(lambda: get(port, "/readyz") == (200, "ready\n"), what="ready")
    status, body = get(port, "/metrics")
    assert status == 404 and "pip install opentelemetry-exporter-prometheus" in body
    assert get(port, "/nowhere")[0] == 404
    assert get(port, "/healthz", "POST")[0] == 405

    wait_for(lambda: env.count("started") >= 2, what="two handlers running")
    runner.popen.send_signal(signal.SIGTERM)  # it waits out the 3 s grace: time to ask
    assert wait_for(lambda: get(port, "/readyz") == (503, "not ready: stopping\n"))
    assert get(port, "/healthz") == (200, "ok\n")
    runner.finish()


@pytest.mark.slow
def test_health_on_a_taken_port_is_a_clear_error(env: Env) -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        runner = env.start("tests.apps.recorder:app", "--health", f"127.0.0.1:{port}")
        runner.popen.wait(timeout=60)
    assert runner.popen.returncode == 2
    assert f"--health cannot listen on 127.0.0.1:{port}" in runner.log()


# -- --log-format ------------------------------------------------------------------------------


@pytest.mark.slow
def test_json_logs_are_one_object_per_line(env: Env) -> None:
    env.declare(recorder.app)
    env.publish({"n": 1}, {"n": 2})
    runner = env.start("tests.apps.recorder:app", "--burst", "--workers", "1", "--log-format=json")
    runner.finish()
    lines = [json.loads(line) for line in runner.log().splitlines()]
    assert lines and all({"time", "level", "logger", "message"} <= set(line) for line in lines)
    handled = [line for line in lines if line["message"].startswith("handled jobs id=")]
    assert len(handled) == 2 and handled[0]["level"] == "INFO" and handled[0]["worker"] == 0
    assert any(line["logger"] == "eventfn.supervisor" for line in lines)  # and its own lines
    assert "handled 2" in runner.out.read_text()  # the summary stays on stdout, as text


def test_json_formatter_carries_span_ids_and_extra_fields() -> None:
    record = logging.LogRecord("eventfn.runner", logging.WARNING, __file__, 1, "x=%d", (1,), None)
    record.__dict__.update(otelTraceID="ab" * 16, otelSpanID="cd" * 8, message_id="m-1", attempt=2)
    line = json.loads(JsonFormatter().format(record))
    assert line["message"] == "x=1" and line["level"] == "WARNING"
    assert line["logger"] == "eventfn.runner" and line["time"].endswith("+00:00")
    assert (line["trace_id"], line["span_id"]) == ("ab" * 16, "cd" * 8)
    assert (line["message_id"], line["attempt"]) == ("m-1", 2)
    record.otelTraceID = "0"  # written outside a span
    assert "trace_id" not in json.loads(JsonFormatter().format(record))


# -- pieces ------------------------------------------------------------------------------------


def test_workers_get_the_arguments_minus_the_supervisors() -> None:
    argv = ["--log-level", "info", "run", "shop:app", "--workers", "4", "--reload", "--burst"]
    argv += ["--health=0.0.0.0:9000", "--work=3", "--heal", "[::1]:80", "--grace", "5"]
    assert worker_argv(argv) == [
        "--log-level",
        "info",
        "run",
        "shop:app",
        "--burst",
        "--grace",
        "5",
    ]


def test_exits_are_described_and_restarts_back_off() -> None:
    assert describe_exit(-signal.SIGKILL) == "killed by SIGKILL"
    assert describe_exit(3) == "exit code 3"
    backoff = Backoff()
    assert [backoff.delay(n) for n in (1, 2, 3, 7, 8, 50)] == [0.5, 1, 2, 30, 30, 30]
