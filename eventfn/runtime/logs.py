"""Log set-up for ``eventfn run``: the usual text lines, or one JSON object per line.

JSON lines carry ``time``, ``level``, ``logger`` and ``message``; ``trace_id`` and ``span_id``
when the line was written inside a span (``--otel``); every field given with ``extra=`` (such as
``message_id``, ``subscription``, ``attempt``); and ``exception`` with the traceback, if any.
A worker of ``--workers`` says which one it is: ``[worker 1]`` in text, ``"worker": 1`` in JSON.
"""

from __future__ import annotations

import logging
import os
import sys
from datetime import UTC, datetime
from typing import Any, Literal

import msgspec

from eventfn import telemetry

Format = Literal["text", "json"]
FORMATS: tuple[Format, ...] = ("text", "json")

WORKER_ENV = "EVENTFN_WORKER"
"""Set by the supervisor in each worker's environment to its index (0 to N-1)."""

# what every LogRecord has; whatever else a record carries came from ``extra=``
_STANDARD = frozenset(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {
    "message",
    "asctime",
    "taskName",
    "otelTraceID",
    "otelSpanID",
    "otelServiceName",
    "otelTraceSampled",
}


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line.

    >>> handler.setFormatter(JsonFormatter())
    >>> log.info("handled", extra={"message_id": "0191...", "attempt": 1})
    {"time": "2025-01-01T12:00:00.000+00:00", "level": "INFO", ..., "attempt": 1}
    """

    def __init__(self, fields: dict[str, Any] | None = None) -> None:
        super().__init__()
        self.fields = dict(fields or {})
        # extras may hold anything: what JSON cannot say is written as its str()
        self._encoder = msgspec.json.Encoder(enc_hook=str)

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            **self.fields,
        }
        trace_id = getattr(record, "otelTraceID", "0")
        if trace_id != "0":  # "0" is how the record factory says "outside a span"
            line["trace_id"] = trace_id
            line["span_id"] = getattr(record, "otelSpanID", "0")
        for key, value in record.__dict__.items():
            if key not in _STANDARD and not key.startswith("_") and key not in line:
                line[key] = value
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            line["stack"] = self.formatStack(record.stack_info)
        return self._encoder.encode(line).decode()


def text_formatter(traced: bool, worker: str | None = None) -> logging.Formatter:
    """The human format: time, level, logger (and span ids when traced), message."""
    ids = " [trace_id=%(otelTraceID)s span_id=%(otelSpanID)s]" if traced else ""
    who = f"[worker {worker}] " if worker is not None else ""
    return logging.Formatter(f"%(asctime)s %(levelname)-7s {who}%(name)s{ids}: %(message)s")


def configure(level: str, fmt: Format = "text", traced: bool = False) -> None:
    """Send the process's logs to stderr at ``level`` in format ``fmt``.

    ``traced``: log records carry the ids of the span they were written in.

    >>> configure("info", "json", traced=False)
    """
    if traced:
        telemetry.correlate_logs()
    worker = os.environ.get(WORKER_ENV)
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        fields = {"worker": int(worker) if worker.isdigit() else worker} if worker else None
        handler.setFormatter(JsonFormatter(fields))
    else:
        handler.setFormatter(text_formatter(traced, worker))
    logging.basicConfig(level=getattr(logging, level.upper()), handlers=[handler])
    if level.lower() != "debug":  # watchfiles says "N changes detected" at INFO for every batch
        logging.getLogger("watchfiles").setLevel(logging.WARNING)


__all__ = ["FORMATS", "WORKER_ENV", "Format", "JsonFormatter", "configure", "text_formatter"]
