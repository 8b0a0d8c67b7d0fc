"""``eventfn upload BUCKET FILE``: store an object in a local bucket and publish its event."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from eventfn.app import App
from eventfn.exceptions import ConfigurationError, UnknownDestination
from eventfn.sources.records import destination, message_id


def add_parser(commands: Any, broker_help: str) -> None:
    """Add ``upload`` to the ``eventfn`` command's subcommands."""
    upload = commands.add_parser(
        "upload", help="store a file in a local bucket and publish its upload event"
    )
    upload.add_argument("bucket")
    upload.add_argument("file", help="the file to store, or - for stdin")
    upload.add_argument("--key", help="the object's key (default: the file's name)")
    upload.add_argument("--content-type", help="default: guessed from the key")
    upload.add_argument(
        "--buckets", help="buckets directory (default: $EVENTFN_BUCKETS or ./buckets)"
    )
    upload.add_argument("--broker", help=broker_help)


async def run_upload(args: argparse.Namespace, url: str) -> int:
    """Store the file atomically; publish its event if a subscriber declared the bucket."""
    if args.file == "-":
        if not args.key:
            raise ConfigurationError("reading stdin: give the object's key with --key")
        data: Any = sys.stdin.buffer
    else:
        try:
            data = open(args.file, "rb")  # noqa: ASYNC230, SIM115 - one file, before any await
        except OSError as exc:
            raise ConfigurationError(f"{args.file}: {exc.strerror}") from None
    app = App("eventfn-cli", broker=url)
    if args.buckets:
        app.buckets.root = args.buckets
    store = app.buckets.store(args.bucket)
    try:
        record = await store.put(
            args.key or Path(args.file).name, data, content_type=args.content_type
        )
    finally:
        if data is not sys.stdin.buffer:
            data.close()
    where = f"{args.bucket}/{record.key} ({record.size} bytes)"
    try:
        async with app:
            await app.publish(
                destination(args.bucket),
                record,
                type=record.type,
                subject=record.key,
                id=message_id(record.bucket, record.key, record.version, record.event),
            )
    except UnknownDestination:
        print(
            f"stored {where}; no runner has declared bucket {args.bucket!r} yet, so the "
            "first runner that watches it publishes the event",
            flush=True,
        )
        return 0
    await store.mark_published([record])
    print(f"stored {where} and published its upload event", flush=True)
    return 0
