"""The ``eventfn`` command: run | publish | upload | inspect | status | graph | asyncapi | dlq.

``APP`` is ``module:attribute`` (``shop:app``; ``:app`` may be left out) or ``path/to/file.py``;
the current directory is importable, as with uvicorn.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import logging
import os
import signal
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, TextIO

import anyio
import msgspec

from eventfn import telemetry
from eventfn._asyncapi import add_parser as add_asyncapi_parser
from eventfn._asyncapi import run as run_asyncapi
from eventfn._cli_dlq import add_dlq_parser, run_dlq
from eventfn._cli_observe import add_parsers, run_graph, run_status
from eventfn._cli_upload import add_parser as add_upload_parser
from eventfn._cli_upload import run_upload
from eventfn.app import App
from eventfn.brokers import Broker, OutgoingMessage, from_url, installed_schemes, redact_url
from eventfn.exceptions import ConfigurationError, EventfnError
from eventfn.runtime import logs
from eventfn.runtime.health import runner_health
from eventfn.runtime.runner import Runner, format_summary
from eventfn.runtime.supervisor import add_run_arguments, supervise_if_asked

log = logging.getLogger("eventfn.cli")

PUBLISH_BATCH = 500


def load_app(spec: str) -> App:
    """Import ``module:attribute`` (or a ``.py`` path) and return the App it names."""
    module_name, _, attr = spec.partition(":")
    attr = attr or "app"
    if "" not in sys.path and os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        if module_name.endswith(".py"):
            path = Path(module_name).resolve()
            sys.path.insert(0, str(path.parent))
            module = importlib.import_module(path.stem)
        else:
            module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        raise ConfigurationError(
            f"cannot import {module_name!r} for APP {spec!r}: {exc}; run eventfn from the "
            "directory that holds the module, or give its dotted path (package.module:app)"
        ) from None
    app = getattr(module, attr, None)
    if not isinstance(app, App):
        found = type(app).__name__ if app is not None else "nothing"
        raise ConfigurationError(
            f"{module_name}:{attr} is {found}, not an eventfn.App; point APP at the object "
            "made by eventfn.App(...), e.g. shop:app"
        )
    return app


def _broker_url(args: argparse.Namespace, app: App | None = None) -> str:
    if args.broker:
        return str(args.broker)
    return app.resolve_url() if app else os.environ.get("EVENTFN_BROKER", "sqlite:///eventfn.db")


# -- run ----------------------------------------------------------------------------------------


async def _run(args: argparse.Namespace, argv: Sequence[str]) -> int:
    supervised = await supervise_if_asked(args, argv)
    if supervised is not None:
        return supervised
    app = load_app(args.app)
    url = _broker_url(args, app)
    broker = from_url(url)
    flush = telemetry.setup(args.otel, app.name)
    try:
        return await _run_on(args, app, broker)
    finally:
        flush()


async def _run_on(args: argparse.Namespace, app: App, broker: Broker) -> int:
    if args.buckets:
        app.buckets.root = args.buckets
    await broker.connect()
    try:
        await app.connect(broker)
        runner = Runner(
            app,
            broker,
            concurrency=args.concurrency,
            prefetch=args.prefetch,
            lease=args.lease,
            grace=args.grace,
            burst=args.burst,
        )
        log.info(
            "running %s on %s: %d subscriptions, concurrency %d%s",
            app.name,
            broker.describe(),
            len(app.subscriptions),
            args.concurrency,
            ", burst" if args.burst else "",
        )
        async with runner_health(args.health, runner) as health, anyio.create_task_group() as tg:
            tg.start_soon(_watch_signals, runner, tg.cancel_scope)
            if health is not None:
                tg.start_soon(health.serve)
            summary = await runner.run()
            tg.cancel_scope.cancel()
        print(format_summary(summary), flush=True)
        return 0
    finally:
        await app.close()
        await broker.close()


async def _watch_signals(runner: Runner, scope: anyio.CancelScope) -> None:
    with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for signum in signals:
            if runner._stopping:
                log.warning("second %s: stopping now", signal.Signals(signum).name)
                scope.cancel()
                return
            log.info("%s: graceful shutdown", signal.Signals(signum).name)
            runner.stop()


# -- publish --------------------------------------------------------------------------------------


def _documents(args: argparse.Namespace) -> Iterator[tuple[int, bytes]]:
    if args.data not in (None, "-"):
        if args.file:
            raise ConfigurationError(
                "give the data as an argument, with --file, or on stdin; not two"
            )
        yield 1, str(args.data).encode()
        return
    stream: TextIO = open(args.file, encoding="utf-8") if args.file else sys.stdin  # noqa: SIM115
    with stream:
        for number, line in enumerate(stream, 1):
            if line.strip():
                yield number, line.strip().encode()


async def _publish(args: argparse.Namespace) -> int:
    if args.data is None and not args.file and sys.stdin.isatty():
        raise ConfigurationError(
            "no data: give a JSON document, '-' to read lines from stdin, or --file F"
        )
    publisher = App("eventfn-cli", broker=_broker_url(args))
    flush = telemetry.setup(args.otel, "eventfn-cli")
    await publisher.connect()
    sent = 0
    try:
        batch: list[OutgoingMessage] = []
        for number, document in _documents(args):
            try:
                data = msgspec.Raw(msgspec.json.encode(msgspec.json.decode(document)))
            except msgspec.DecodeError as exc:
                await publisher.publish_many(batch)
                sent += len(batch)
                raise ConfigurationError(
                    f"line {number} is not valid JSON ({exc}); published the {sent} messages "
                    "before it, nothing after it"
                ) from None
            batch.append(
                publisher.message(
                    args.destination,
                    data,
                    type=args.type,
                    key=args.key,
                    subject=args.subject,
                    id=args.id,
                    delay=args.delay,
                )
            )
            if len(batch) >= PUBLISH_BATCH:
                await publisher.publish_many(batch)
                sent += len(batch)
                batch = []
        if batch:
            await publisher.publish_many(batch)
            sent += len(batch)
    finally:
        await publisher.close()
        flush()
    if args.quiet:
        return 0
    print(f"published {sent} message{'s' if sent != 1 else ''} to {args.destination}", flush=True)
    return 0


# -- inspect --------------------------------------------------------------------------------------


def _inspect(args: argparse.Namespace) -> int:
    app = load_app(args.app)
    rows = [sub.describe() for sub in app.subscriptions]
    if args.json:
        for row in rows:
            print(json.dumps(row))
        return 0
    print(f"app {app.name}: {len(rows)} subscriptions, event bus {app.event_bus!r}")
    for row in rows:
        types = f" types={','.join(row['types'])}" if row["types"] else ""
        print(
            f"  {row['trigger']:<6} {row['destination']:<20} group={row['group']:<22} "
            f"handler={row['handler']}{types}\n"
            f"         concurrency={row['concurrency'] or 'runner'} timeout={row['timeout']} "
            f"retry={row['retry']}"
        )
    return 0


# -- entry point ----------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="eventfn", description=__doc__)
    parser.add_argument(
        "--log-level", default="info", choices=["debug", "info", "warning", "error"]
    )
    commands = parser.add_subparsers(dest="command", required=True)
    broker_help = "broker URL (default: $EVENTFN_BROKER, else the app's, else sqlite:///eventfn.db)"
    otel: dict[str, Any] = {
        "choices": telemetry.MODES,
        "default": "auto",
        "help": "traces and metrics: otlp (configured by the OTEL_* variables), console (a line "
        "per span on stderr), none; auto (the default) is otlp when "
        "OTEL_EXPORTER_OTLP_ENDPOINT is set, else none",
    }

    run = commands.add_parser("run", help="consume the app's subscriptions")
    run.add_argument("app", help="module:attribute, e.g. shop:app")
    run.add_argument("--broker", help=broker_help)
    run.add_argument("--concurrency", type=_positive_int, default=64)
    run.add_argument("--prefetch", type=int, default=None, help="leased beyond concurrency")
    run.add_argument("--lease", type=float, default=30.0, help="seconds (default 30)")
    run.add_argument("--grace", type=float, default=30.0, help="shutdown grace seconds")
    run.add_argument("--burst", action="store_true", help="exit once everything is handled")
    run.add_argument("--otel", **otel)
    run.add_argument(
        "--buckets",
        help="directory of the local buckets (default: $EVENTFN_BUCKETS, else the "
        "app's, else ./buckets)",
    )
    add_run_arguments(run)

    pub = commands.add_parser("publish", help="publish JSON documents to a destination")
    pub.add_argument("destination")
    pub.add_argument("data", nargs="?", help="a JSON document, or - for one per line on stdin")
    pub.add_argument("--file", help="read one JSON document per line from this file")
    pub.add_argument("--type", default="message", help="CloudEvents type (default: message)")
    pub.add_argument("--key", help="partition key (stream records)")
    pub.add_argument("--subject", help="CloudEvents subject")
    pub.add_argument("--id", help="message id (default: a new UUIDv7)")
    pub.add_argument("--delay", type=float, default=0.0, help="seconds before delivery")
    pub.add_argument("--broker", help=broker_help)
    pub.add_argument("--quiet", action="store_true")
    pub.add_argument("--otel", **otel)

    ins = commands.add_parser("inspect", help="list the app's subscriptions")
    ins.add_argument("app")
    ins.add_argument("--json", action="store_true", help="one JSON object per subscription")

    add_parsers(commands, broker_help)
    add_upload_parser(commands, broker_help)
    add_asyncapi_parser(commands, broker_help)
    add_dlq_parser(commands, "broker URL (default: $EVENTFN_BROKER, else sqlite:///eventfn.db)")
    return parser


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``eventfn`` command line; returns the exit status."""
    args = _parser().parse_args(argv)
    traced = telemetry.wanted(getattr(args, "otel", "none"))
    logs.configure(args.log_level, getattr(args, "log_format", "text"), traced)
    try:
        if args.command == "run":
            return anyio.run(_run, args, sys.argv[1:] if argv is None else list(argv))
        if args.command == "publish":
            return anyio.run(_publish, args)
        if args.command == "dlq":
            return anyio.run(run_dlq, args)
        if args.command == "status":
            app = load_app(args.app)
            return anyio.run(run_status, args, app, _broker_url(args, app))
        if args.command == "asyncapi":
            return run_asyncapi(args)
        if args.command == "upload":
            return anyio.run(run_upload, args, _broker_url(args))
        if args.command == "graph":
            return run_graph(args, load_app(args.app))
        return _inspect(args)
    except EventfnError as exc:
        print(f"eventfn: error: {_safe(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def _safe(exc: BaseException) -> Any:
    text = str(exc)
    for word in text.split():
        if "://" in word and "@" in word:
            text = text.replace(word, redact_url(word.strip("'\"(),")))
    return text


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

__all__ = ["installed_schemes", "load_app", "main"]
