"""``eventfn run --health HOST:PORT``: liveness, readiness and metrics over plain HTTP/1.1.

- ``GET /healthz``: ``200 ok`` whenever the event loop answers (a blocked loop does not answer,
  and the probe's timeout reports it).
- ``GET /readyz``: ``200 ready`` once the process does its work; ``503 not ready: <why>`` while
  it starts or stops. The runner is ready once it consumes; a supervisor once all its workers run.
- ``GET /metrics``: the Prometheus text format, when ``opentelemetry-exporter-prometheus`` is
  installed; else ``404`` with a hint.

A dozen lines of HTTP rather than a web framework: one request per connection, answered with
``Content-Length`` and ``Connection: close``.
"""

from __future__ import annotations

import argparse
import importlib
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from functools import partial
from typing import TYPE_CHECKING, Any

import anyio
from anyio.abc import SocketAttribute, SocketStream

from eventfn.exceptions import ConfigurationError

if TYPE_CHECKING:
    from types import TracebackType

    from anyio.abc import Listener

    from eventfn.runtime.runner import Runner

log = logging.getLogger("eventfn.health")

Address = tuple[str, int]
Readiness = Callable[[], "str | None"]
"""Returns ``None`` when ready, else the reason it is not (``"stopping"``)."""

MAX_HEAD = 16 * 1024
READ_TIMEOUT = 10.0
METRICS_HINT = (
    "no metrics here: pip install opentelemetry-exporter-prometheus to serve them on /metrics\n"
)
REASONS = {
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    503: "Service Unavailable",
}


def parse_address(text: str) -> Address:
    """``HOST:PORT`` (``[::1]:8080`` for IPv6) as a ``(host, port)`` pair; for argparse."""
    host, sep, port = text.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, e.g. 127.0.0.1:8080, not {text!r}")
    return host, int(port)


class HealthServer:
    """Answers the probes for one process; ``ready`` says whether it does its work.

    >>> async with HealthServer(("127.0.0.1", 8080), ready=lambda: None) as health:
    ...     tg.start_soon(health.serve)
    """

    def __init__(self, address: Address, ready: Readiness) -> None:
        self.address = address
        self.ready = ready
        self.port = address[1]
        self._listener: Listener[SocketStream] | None = None
        self._metrics: Callable[[], tuple[bytes, str]] | None = None

    async def __aenter__(self) -> HealthServer:
        """Listen now, so that a taken port is a clear error before any work starts."""
        host, port = self.address
        try:
            listener = await anyio.create_tcp_listener(local_host=host, local_port=port)
        except OSError as exc:
            raise ConfigurationError(
                f"--health cannot listen on {host}:{port}: {exc.strerror or exc}"
            ) from None
        self._listener = listener
        self.port = int(listener.extra(SocketAttribute.local_port))
        self._metrics = _prometheus()
        shown = f"[{host}]" if ":" in host else host
        log.info("health on http://%s:%d: /healthz /readyz /metrics", shown, self.port)
        return self

    async def __aexit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._listener is not None:
            await self._listener.aclose()
            self._listener = None

    async def serve(self) -> None:
        """Answer requests until cancelled."""
        assert self._listener is not None, "use `async with HealthServer(...)` first"
        await self._listener.serve(self._handle)

    async def _handle(self, stream: SocketStream) -> None:
        async with stream:
            try:
                with anyio.fail_after(READ_TIMEOUT):  # a silent client does not hold a task
                    head = await _read_head(stream)
                status, body, content_type = await self._answer(head)
                await stream.send(_response(status, body, content_type, head.startswith(b"HEAD")))
            except (TimeoutError, anyio.EndOfStream, anyio.BrokenResourceError, OSError):
                pass  # the client went away or never spoke: nothing to answer
            except Exception:  # one bad request must not stop the server
                log.exception("health endpoint failed to answer")

    async def _answer(self, head: bytes) -> tuple[int, bytes, str]:
        parts = head.split(b"\r\n", 1)[0].split()
        if len(parts) != 3 or not parts[2].startswith(b"HTTP/1."):
            return 400, b"bad request\n", "text/plain"
        method, target = parts[0], parts[1].split(b"?", 1)[0]
        if method not in (b"GET", b"HEAD"):
            return 405, b"only GET and HEAD\n", "text/plain"
        if target == b"/healthz":
            return 200, b"ok\n", "text/plain"
        if target == b"/readyz":
            reason = self.ready()
            if reason is None:
                return 200, b"ready\n", "text/plain"
            return 503, f"not ready: {reason}\n".encode(), "text/plain"
        if target == b"/metrics":
            if self._metrics is None:
                return 404, METRICS_HINT.encode(), "text/plain"
            # collecting runs the observable callbacks, which are made for the reader's thread
            body, content_type = await anyio.to_thread.run_sync(self._metrics)
            return 200, body, content_type
        return 404, b"not found: try /healthz, /readyz or /metrics\n", "text/plain"


async def _read_head(stream: SocketStream) -> bytes:
    head = b""
    while b"\r\n\r\n" not in head:
        if len(head) > MAX_HEAD:
            break
        head += await stream.receive()
    return head


def _response(status: int, body: bytes, content_type: str, head_only: bool) -> bytes:
    if content_type == "text/plain":
        content_type = "text/plain; charset=utf-8"
    lines = [
        f"HTTP/1.1 {status} {REASONS[status]}",
        f"Content-Type: {content_type}",
        f"Content-Length: {len(body)}",
        "Connection: close",
        "Cache-Control: no-store",
    ]
    return "\r\n".join(lines).encode() + b"\r\n\r\n" + (b"" if head_only else body)


def _prometheus() -> Callable[[], tuple[bytes, str]] | None:
    """The /metrics renderer, if the Prometheus exporter is installed; installs its reader."""
    try:
        exporter: Any = importlib.import_module("opentelemetry.exporter.prometheus")
        client: Any = importlib.import_module("prometheus_client")
    except ImportError:
        return None
    from opentelemetry import metrics
    from opentelemetry.sdk.metrics import MeterProvider

    if not isinstance(metrics.get_meter_provider(), MeterProvider):
        # A provider is fixed once set and takes its readers when made: with --otel otlp there
        # already is one, and /metrics then shows what prometheus_client itself collects.
        metrics.set_meter_provider(
            MeterProvider(metric_readers=[exporter.PrometheusMetricReader()])
        )
    return lambda: (client.generate_latest(client.REGISTRY), str(client.CONTENT_TYPE_LATEST))


def runner_readiness(runner: Runner) -> str | None:
    """Ready while the runner consumes (it was made after the broker connected)."""
    # Runner has no public state yet; cli.py's signal handler reads the same field.
    if runner._stopping:
        return "stopping"
    if not runner._started:
        return "starting"
    return None


@asynccontextmanager
async def runner_health(
    address: Address | None, runner: Runner
) -> AsyncIterator[HealthServer | None]:
    """A bound :class:`HealthServer` for an in-process runner, or ``None`` without ``--health``.

    >>> async with runner_health(args.health, runner) as health, anyio.create_task_group() as tg:
    ...     if health is not None:
    ...         tg.start_soon(health.serve)
    """
    if address is None:
        yield None
        return
    async with HealthServer(address, partial(runner_readiness, runner)) as server:
        yield server


__all__ = ["Address", "HealthServer", "parse_address", "runner_health", "runner_readiness"]
