"""A real OTLP/HTTP trace receiver on loopback, for tests that check what eventfn exports.

The receiver is the Datadog APM test agent (PyPI ``ddapm-test-agent``), installed by
``make .venv-collector/.installed`` into its own virtualenv ``.venv-collector/`` so that its
pinned dependencies never meet the project's. It accepts OTLP/HTTP protobuf on ``/v1/traces``,
decodes each request with the official ``opentelemetry-proto`` messages (a malformed one is
answered 400) and serves what it received, decoded field by field, on its own query endpoint
``GET /test/session/traces``; :meth:`OtlpCollector.spans` polls that endpoint and flattens the
payloads into one plain dict per span.

It is a receiver made for testing exporters: it keeps the requests in memory for the session, and
one request that is not valid OTLP makes every later query answer 400, so the test that sent it
and those after it fail rather than read a partial picture. Arize Phoenix was tried first and
rejected: it stores spans in SQL but drops the OpenTelemetry span kind (its REST API reports the
OpenInference kind ``UNKNOWN``, its OTLP-shaped endpoint ``INTERNAL``, for a PRODUCER span) and
span links, both of which messaging traces need.

Use it from a test module with ``pytest_plugins = ["tests.otlp_collector"]`` and a parameter
``otlp_collector: OtlpCollector``. Outside CI a missing ``.venv-collector`` skips the test with
the command that creates it; under ``CI=true`` it, or a receiver that will not start, fails it.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NoReturn

import pytest

ROOT = Path(__file__).resolve().parents[1]
COLLECTOR_VENV = ROOT / ".venv-collector"
AGENT = COLLECTOR_VENV / "bin" / "ddapm-test-agent"
MAKE_TARGET = "make .venv-collector/.installed"
START_TIMEOUT = 30.0
"""Seconds the receiver gets to answer its query endpoint (it takes about half a second)."""
START_ATTEMPTS = 3
"""Tries with fresh ports: another process may take a port between picking and binding it."""

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")

_KIND_PREFIX = "SPAN_KIND_"
_STATUS_PREFIX = "STATUS_CODE_"
_OWN_QUERY = '"GET /test/session/traces '


class CollectorError(RuntimeError):
    """The receiver could not be started or stopped answering."""


def _free_ports(count: int) -> list[int]:
    """Distinct ports that were free on 127.0.0.1 a moment ago."""
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind(("127.0.0.1", 0))
            sockets.append(sock)
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def _die_with_parent(command: list[str]) -> list[str]:
    """Where util-linux's setpriv is (Linux), the receiver gets SIGTERM when the test process
    dies, even by SIGKILL or a CI time-out, instead of outliving it on its ports."""
    setpriv = shutil.which("setpriv")
    return [setpriv, "--pdeathsig", "TERM", "--", *command] if setpriv else command


def _hex_id(value: str | None) -> str | None:
    """OTLP ids come back as the proto3 JSON mapping of bytes: base64. Tests want hex."""
    if not value:
        return None
    return base64.b64decode(value).hex()


def _any_value(value: dict[str, Any]) -> Any:
    """An OTLP ``AnyValue`` in its proto3 JSON form, as a plain Python value."""
    if "string_value" in value:
        return value["string_value"]
    if "bool_value" in value:
        return bool(value["bool_value"])
    if "int_value" in value:
        return int(value["int_value"])  # 64-bit integers are JSON strings
    if "double_value" in value:
        return float(value["double_value"])
    if "bytes_value" in value:
        return base64.b64decode(value["bytes_value"])
    if "array_value" in value:
        return [_any_value(v) for v in value["array_value"].get("values", [])]
    if "kvlist_value" in value:
        return _attributes(value["kvlist_value"].get("values", []))
    return None  # an empty AnyValue


def _attributes(key_values: list[dict[str, Any]]) -> dict[str, Any]:
    return {kv["key"]: _any_value(kv.get("value", {})) for kv in key_values}


def _span(raw: dict[str, Any], resource: dict[str, Any], scope: str) -> dict[str, Any]:
    status = raw.get("status", {})
    return {
        "name": raw.get("name", ""),
        "trace_id": _hex_id(raw.get("trace_id")),
        "span_id": _hex_id(raw.get("span_id")),
        "parent_id": _hex_id(raw.get("parent_span_id")),
        "kind": raw.get("kind", "SPAN_KIND_UNSPECIFIED").removeprefix(_KIND_PREFIX),
        "attributes": _attributes(raw.get("attributes", [])),
        "status_code": status.get("code", "STATUS_CODE_UNSET").removeprefix(_STATUS_PREFIX),
        "status_message": status.get("message", ""),
        "start_time_unix_nano": int(raw.get("start_time_unix_nano", 0)),
        "end_time_unix_nano": int(raw.get("end_time_unix_nano", 0)),
        "events": [
            {
                "name": event.get("name", ""),
                "time_unix_nano": int(event.get("time_unix_nano", 0)),
                "attributes": _attributes(event.get("attributes", [])),
            }
            for event in raw.get("events", [])
        ],
        "links": [
            {
                "trace_id": _hex_id(link.get("trace_id")),
                "span_id": _hex_id(link.get("span_id")),
                "attributes": _attributes(link.get("attributes", [])),
            }
            for link in raw.get("links", [])
        ],
        "resource": resource,
        "scope": scope,
    }


def flatten_export_requests(payloads: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every span of decoded ``ExportTraceServiceRequest`` payloads, one plain dict each."""
    spans = []
    for payload in payloads:
        for resource_spans in payload.get("resource_spans", []):
            resource = _attributes(resource_spans.get("resource", {}).get("attributes", []))
            for scope_spans in resource_spans.get("scope_spans", []):
                scope = scope_spans.get("scope", {}).get("name", "")
                spans.extend(_span(raw, resource, scope) for raw in scope_spans.get("spans", []))
    return spans


class OtlpCollector:
    """One receiver process on free 127.0.0.1 ports, its files in ``workdir``.

    ``endpoint`` is the OTLP/HTTP base URL: export to ``f"{endpoint}/v1/traces"``.
    """

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.log_path = workdir / "collector.log"
        self.endpoint = ""
        self.grpc_port = 0
        self.startup_seconds = 0.0
        self._process: subprocess.Popen[bytes] | None = None

    # -- life cycle --------------------------------------------------------------------------

    def start(self) -> None:
        problems = []
        for _ in range(START_ATTEMPTS):
            try:
                self._start_once()
                return
            except CollectorError as error:
                problems.append(str(error))
                self.stop()
        raise CollectorError("; ".join(problems))

    def _start_once(self) -> None:
        apm_port, http_port, grpc_port = _free_ports(3)
        (self.workdir / "snapshots").mkdir(parents=True, exist_ok=True)
        command = _die_with_parent(
            [
                str(AGENT),
                "--host=127.0.0.1",
                f"--port={apm_port}",  # its Datadog-protocol port, unused here but always opened
                f"--otlp-http-port={http_port}",
                f"--otlp-grpc-port={grpc_port}",
                f"--snapshot-dir={self.workdir / 'snapshots'}",
                f"--vcr-cassettes-directory={self.workdir / 'vcr-cassettes'}",
                "--disable-llmobs-data-forwarding",
                "--log-level=INFO",
            ]
        )
        # A clean environment: the agent reads DD_AGENT_URL, DD_API_KEY, PORT, HOST, ... from it,
        # and one of those left over in a developer's shell must not send our spans anywhere.
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "LANG": "C.UTF-8",
            "PYTHONUNBUFFERED": "1",
            "TMPDIR": str(self.workdir),
        }
        started = time.monotonic()
        with self.log_path.open("ab") as log:
            log.write(f"$ {' '.join(command)}\n".encode())
            log.flush()
            self._process = subprocess.Popen(
                command,
                cwd=self.workdir,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        self.endpoint = f"http://127.0.0.1:{http_port}"
        self.grpc_port = grpc_port
        deadline = started + START_TIMEOUT
        while True:
            code = self._process.poll()
            if code is not None:
                raise CollectorError(f"the OTLP receiver exited with code {code} while starting")
            try:
                self._query(timeout=1.0)
                self.startup_seconds = time.monotonic() - started
                return
            except (OSError, CollectorError):
                pass
            if time.monotonic() >= deadline:
                raise CollectorError(f"the OTLP receiver did not answer within {START_TIMEOUT}s")
            time.sleep(0.05)

    def stop(self) -> int | None:
        """Stop the receiver; its exit code, or None if it was not running."""
        process, self._process = self._process, None
        if process is None:
            return None
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(10)
        return process.returncode

    def alive(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def log(self, tail: int = 200) -> str:
        """The last ``tail`` lines the receiver printed (it logs one line per request)."""
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except FileNotFoundError:
            return "(no log)"
        lines = [line for line in lines if _OWN_QUERY not in line]  # our polling, not news
        return "\n".join(lines[-tail:])

    # -- reading spans back ------------------------------------------------------------------

    def _query(self, timeout: float) -> list[dict[str, Any]]:
        """The decoded export requests the receiver holds (GET /test/session/traces)."""
        url = f"{self.endpoint}/test/session/traces"
        try:
            with urllib.request.urlopen(url, timeout=timeout) as response:
                payloads = json.loads(response.read())
        except urllib.error.HTTPError as error:
            # 400: some stored request is not valid OTLP, and every later query says so too.
            body = error.read().decode(errors="replace")
            raise CollectorError(f"GET {url} answered {error.code}: {body}") from error
        if not isinstance(payloads, list):
            raise CollectorError(f"GET {url} returned {type(payloads).__name__}, not a list")
        return payloads

    def all_spans(self) -> list[dict[str, Any]]:
        """Every span received so far, from every test of the session."""
        return flatten_export_requests(self._query(timeout=10.0))

    def spans(self, trace_id_hex: str, expect: int, timeout: float = 30) -> list[dict[str, Any]]:
        """The spans of one trace, once the receiver holds at least ``expect`` of them.

        Each is a dict with ``name``, ``trace_id`` (32 hex), ``span_id`` (16 hex), ``parent_id``
        (16 hex or None), ``kind`` ("PRODUCER", "CONSUMER", "INTERNAL", ...), ``attributes``,
        ``status_code`` ("UNSET", "OK", "ERROR"), ``status_message``, ``events``, ``links``,
        start and end times, ``resource`` (attributes) and ``scope`` (instrumentation name),
        ordered by start time. Raises AssertionError, with the receiver's log, when the spans
        are not all there by ``timeout`` seconds or the receiver is gone.
        """
        wanted = trace_id_hex.lower()
        if len(wanted) != 32 or any(c not in "0123456789abcdef" for c in wanted):
            raise ValueError(f"a trace id is 32 hex digits, not {trace_id_hex!r}")
        deadline = time.monotonic() + timeout
        found: list[dict[str, Any]] = []
        while True:
            if not self.alive():
                raise AssertionError(f"the OTLP receiver is not running\n{self.log()}")
            try:
                found = [span for span in self.all_spans() if span["trace_id"] == wanted]
            except (OSError, CollectorError) as error:
                raise AssertionError(f"cannot read spans back: {error}\n{self.log()}") from error
            if len(found) >= expect:
                return sorted(found, key=lambda span: span["start_time_unix_nano"])
            if time.monotonic() >= deadline:
                names = [span["name"] for span in found]
                raise AssertionError(
                    f"trace {wanted}: {len(found)} span(s) {names} at the receiver after "
                    f"{timeout}s, expected at least {expect}\n--- receiver log ---\n{self.log()}"
                )
            time.sleep(0.1)

    async def aspans(
        self,
        trace_id_hex: str,
        expect: int,
        timeout: float = 30,  # noqa: ASYNC109 - the polling budget of spans(), spent in a thread
    ) -> list[dict[str, Any]]:
        """:meth:`spans` for async tests: polls in a thread, leaving the event loop free."""
        return await asyncio.to_thread(self.spans, trace_id_hex, expect, timeout)


def _missing(problem: str) -> NoReturn:
    if IN_CI:
        pytest.fail(f"{problem}; under CI=true a missing OTLP receiver is a failure", pytrace=False)
    pytest.skip(f"{problem} (`{MAKE_TARGET}` creates it; `make test` does too)")


def _report(request: pytest.FixtureRequest, title: str, text: str) -> None:
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        reporter.write_sep("-", title)
        reporter.write_line(text)


@pytest.fixture(scope="session")
def otlp_collector(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[OtlpCollector]:
    """A running OTLP/HTTP receiver for the whole session; see the module docstring."""
    if not os.access(AGENT, os.X_OK):
        _missing(f"no OTLP receiver at {AGENT.relative_to(ROOT)}")
    collector = OtlpCollector(tmp_path_factory.mktemp("otlp-collector"))
    problem = None
    try:
        collector.start()
    except (OSError, CollectorError) as error:
        problem = f"the OTLP receiver would not start: {error}\n{collector.log()}"
    if problem is not None:
        pytest.fail(problem, pytrace=False)  # in CI and out: the receiver is installed but broken
    failed_before = request.session.testsfailed
    yield collector
    crashed = not collector.alive()
    code = collector.stop()
    if crashed or request.session.testsfailed > failed_before:
        why = f"exited with code {code}" if crashed else "tests failed"
        _report(request, f"OTLP receiver log ({why})", collector.log())
    if crashed:
        pytest.fail(f"the OTLP receiver died during the session (code {code})", pytrace=False)
