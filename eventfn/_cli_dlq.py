"""``eventfn dlq``: list, show, replay and purge dead letters, on any broker.

Exit status: 0 done; 1 refused or partly done (unconfirmed, unknown ids); 2 a usage or
broker error. ``eventfn.cli`` adds the command with :func:`add_dlq_parser` and runs it with
:func:`run_dlq`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import TextIO

import anyio

from eventfn.brokers import DEFAULT_URL, Broker, DeadLetterRecord, from_url
from eventfn.brokers.sqlite import SQLiteBroker
from eventfn.deadletters import (
    DeadLetterQueue,
    format_record,
    iso_time,
    parse_since,
    printable,
    record_json,
)

PROGRESS_OVER = 100
"""A replay of more records than this shows a progress bar (on a terminal)."""
REPLAY_BATCH = 100
MESSAGE_WIDTH = 48

Action = Callable[[DeadLetterQueue, argparse.Namespace], Awaitable[int]]


def add_dlq_parser(
    subparsers: argparse._SubParsersAction[argparse.ArgumentParser], broker_help: str
) -> None:
    """Add ``dlq list | show | replay | purge`` to the ``eventfn`` parser."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--broker", help=broker_help)
    dlq = subparsers.add_parser(
        "dlq",
        help="list, show, replay or purge dead letters",
        description="Dead letters are kept per subscription (destination/group for a topic).",
    )
    actions = dlq.add_subparsers(dest="dlq_command", required=True, metavar="ACTION")

    ls = actions.add_parser("list", parents=[common], help="list dead letters, oldest first")
    ls.add_argument("--subscription", "-s", metavar="S", help="e.g. payments/notify")
    ls.add_argument("--error", metavar="TYPE", help="error type, e.g. DecodeError")
    ls.add_argument(
        "--since", type=_since, metavar="T", help="last failure at or after T: ISO (UTC), 10m, 2h"
    )
    ls.add_argument("--limit", type=int, metavar="N", help="at most N records")
    ls.add_argument("--json", action="store_true", help="one JSON object per line")

    show = actions.add_parser("show", parents=[common], help="one dead letter in full")
    show.add_argument("id", help="a record id from `eventfn dlq list`")
    show.add_argument("--json", action="store_true", help="as one JSON object")

    replay = actions.add_parser(
        "replay",
        parents=[common],
        help="deliver dead letters again to their own subscription",
        description="Each message keeps its id and goes only to the subscription it failed in.",
    )
    replay.add_argument("ids", nargs="*", metavar="ID", help="record ids from `eventfn dlq list`")
    replay.add_argument("--all", action="store_true", help="every dead letter of --subscription")
    replay.add_argument("--subscription", "-s", metavar="S", help="only this subscription's")
    replay.add_argument("--dry-run", action="store_true", help="list what would be replayed")
    replay.add_argument("--yes", "-y", action="store_true", help="do not ask before --all")

    purge = actions.add_parser("purge", parents=[common], help="delete dead letters")
    purge.add_argument("--subscription", "-s", metavar="S", help="only this subscription's")
    purge.add_argument("--yes", "-y", action="store_true", help="do not ask for confirmation")


def _since(text: str) -> float:
    try:
        return parse_since(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


async def run_dlq(args: argparse.Namespace) -> int:
    """Run one ``eventfn dlq`` action; returns the exit status."""
    broker = from_url(args.broker or os.environ.get("EVENTFN_BROKER") or DEFAULT_URL)
    missing = _missing_database(broker)
    if missing:
        return _error(missing, 2)
    async with broker:
        dlq = DeadLetterQueue(broker, batch_size=REPLAY_BATCH)
        try:
            return await _ACTIONS[args.dlq_command](dlq, args)
        except BrokenPipeError:
            # `eventfn dlq list --json | head`: the reader left. Point stdout at /dev/null so
            # that Python's flush at exit does not fail a second time (the Python docs' advice).
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            os.close(devnull)
            return 1


def _missing_database(broker: Broker) -> str | None:
    # Opening a SQLite file that is not there creates an empty one: a typo in --broker would
    # then report "no dead letters" and leave a stray database behind.
    if not isinstance(broker, SQLiteBroker) or broker.path == ":memory:":
        return None
    if Path(broker.path).exists():
        return None
    return (
        f"no SQLite broker at {broker.describe()} ({broker.path} does not exist); "
        "pass --broker or set EVENTFN_BROKER to the broker the runners use"
    )


# -- list and show --------------------------------------------------------------------------


async def _list(dlq: DeadLetterQueue, args: argparse.Namespace) -> int:
    records = await dlq.list(
        subscription=args.subscription, error=args.error, since=args.since, limit=args.limit
    )
    if args.json:
        for record in records:
            print(json.dumps(record_json(record)))
        return 0
    if not records:
        print(f"no dead letters{_filters(args)} on {dlq.broker.describe()}")
        return 0
    print(format_table(records))
    print(f"{_count(len(records), 'dead letter')}{_filters(args)}")
    return 0


def _filters(args: argparse.Namespace) -> str:
    parts = []
    if args.subscription:
        parts.append(f" in {args.subscription}")
    if args.error:
        parts.append(f" with error {args.error}")
    if args.since is not None:
        parts.append(f" since {iso_time(args.since, 'seconds')}")
    return "".join(parts)


def format_table(records: Sequence[DeadLetterRecord]) -> str:
    """Records as an aligned table: id, subscription, error, message, attempts, last failure."""
    rows = [("ID", "SUBSCRIPTION", "ERROR", "MESSAGE", "ATTEMPTS", "LAST FAILURE")]
    rows += [
        (
            record.id,
            record.subscription,
            record.error_type.rsplit(".", 1)[-1],
            _short(record.error_message),
            str(record.attempts),
            iso_time(record.last_failed_at, "seconds") or "-",
        )
        for record in records
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)) for row in rows]
    return printable("\n".join(line.rstrip() for line in lines))


def _short(message: str) -> str:
    line = message.strip().splitlines()[0] if message.strip() else "-"
    return line if len(line) <= MESSAGE_WIDTH else line[: MESSAGE_WIDTH - 3] + "..."


async def _show(dlq: DeadLetterQueue, args: argparse.Namespace) -> int:
    record = await dlq.get(args.id)
    if record is None:
        return _error(f"no dead letter with id {args.id!r} on {dlq.broker.describe()}", 1)
    if args.json:
        print(json.dumps(record_json(record, full=True)))
    else:
        print(format_record(record))
    return 0


# -- replay ---------------------------------------------------------------------------------


async def _replay(dlq: DeadLetterQueue, args: argparse.Namespace) -> int:
    if args.all and args.ids:
        return _error("give record ids or --all, not both", 2)
    if args.all:
        return await _replay_all(dlq, args)
    if not args.ids:
        return _error(
            "name the dead letters to replay (ids from `eventfn dlq list`), "
            "or replay every one of a subscription with --all --subscription S",
            2,
        )
    return await _replay_ids(dlq, args)


async def _replay_all(dlq: DeadLetterQueue, args: argparse.Namespace) -> int:
    subscription = args.subscription
    if not subscription:
        return _error(
            "replay --all needs --subscription S: it replays one subscription's dead letters, "
            "never every subscription's at once (see `eventfn dlq list` for their names)",
            2,
        )
    records = await dlq.list(subscription=subscription)
    if not records:
        print(f"no dead letters in {subscription} to replay")
        return 0
    if args.dry_run:
        return _dry_run(records)
    question = f"Replay {_count(len(records), 'dead letter')} of {subscription}?"
    if not await confirm(question, yes=args.yes):
        return 1
    return await _replay_records(dlq, records)


async def _replay_ids(dlq: DeadLetterQueue, args: argparse.Namespace) -> int:
    records: list[DeadLetterRecord] = []
    problems: list[str] = []
    for record_id in dict.fromkeys(args.ids):
        record = await dlq.get(record_id)
        problem = _unreplayable(record_id, record, args.subscription)
        if problem:
            problems.append(problem)
        elif record is not None:
            records.append(record)
    for problem in problems:
        print(f"eventfn: error: {problem}", file=sys.stderr)
    if not records:
        return 1
    status = _dry_run(records) if args.dry_run else await _replay_records(dlq, records)
    return 1 if problems else status


def _unreplayable(record_id: str, record: DeadLetterRecord | None, subscription: str | None) -> str:
    if record is None:
        return f"dead letter {printable(record_id)!r} not found"
    if subscription and record.subscription != subscription:
        return f"dead letter {record.id} is of {record.subscription}, not of {subscription}"
    if record.state != "dead":
        return (
            f"dead letter {record.id} is not in state 'dead' but {record.state!r} (replayed "
            f"{_count(record.replayed, 'time')}); it is replayed again only if it fails again"
        )
    return ""


def _dry_run(records: Sequence[DeadLetterRecord]) -> int:
    print(format_table(records))
    print(f"dry run: would replay {_count(len(records), 'dead letter')}; nothing changed")
    return 0


async def _replay_records(dlq: DeadLetterQueue, records: Sequence[DeadLetterRecord]) -> int:
    ids = [record.id for record in records]
    bar = ProgressBar(sys.stderr, "replaying") if _wants_bar(len(ids)) else None
    try:
        replayed = await dlq.replay(ids, progress=bar)
    finally:
        if bar is not None:
            bar.close()
    print(f"replayed {_count(replayed, 'dead letter')}")
    if replayed < len(ids):
        # Another process replayed or purged some of them since they were listed.
        missed = len(ids) - replayed
        return _error(f"{_count(missed, 'dead letter')} changed meanwhile, not replayed", 1)
    return 0


def _wants_bar(total: int) -> bool:
    return total > PROGRESS_OVER and sys.stderr.isatty()


class ProgressBar:
    """An in-place progress bar on a terminal: ``replaying [#####.....] 500/1000``."""

    def __init__(self, stream: TextIO, label: str, width: int = 30) -> None:
        self.stream = stream
        self.label = label
        self.width = width
        self.drawn = False

    def __call__(self, done: int, total: int) -> None:
        filled = self.width * done // total if total else self.width
        bar = "#" * filled + "." * (self.width - filled)
        self.stream.write(f"\r{self.label} [{bar}] {done}/{total}")
        self.stream.flush()
        self.drawn = True

    def close(self) -> None:
        if self.drawn:
            self.stream.write("\n")
            self.stream.flush()


# -- purge ----------------------------------------------------------------------------------


async def _purge(dlq: DeadLetterQueue, args: argparse.Namespace) -> int:
    where = f"of {args.subscription}" if args.subscription else "of every subscription"
    count = await dlq.count(args.subscription)
    if not await confirm(f"Purge {_count(count, 'dead letter')} {where}?", yes=args.yes):
        return 1
    purged = await dlq.purge(subscription=args.subscription)
    # A purge also deletes the records of replayed messages, so it may exceed `count`.
    print(f"purged {_count(purged, 'dead-letter record')} {where}")
    return 0


async def confirm(question: str, *, yes: bool) -> bool:
    """Ask on an interactive stdin; without one, refuse unless ``yes``."""
    if yes:
        return True
    if not sys.stdin.isatty():
        _error(
            f"{question.rstrip('?')}: refused, stdin is not a terminal; pass --yes to confirm", 1
        )
        return False
    sys.stderr.write(f"{question} [y/N] ")
    sys.stderr.flush()
    answer = await anyio.to_thread.run_sync(sys.stdin.readline)
    if answer.strip().lower() in ("y", "yes"):
        return True
    print("nothing changed", file=sys.stderr)
    return False


# -- helpers --------------------------------------------------------------------------------


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def _error(message: str, status: int) -> int:
    print(f"eventfn: error: {message}", file=sys.stderr)
    return status


_ACTIONS: dict[str, Action] = {
    "list": _list,
    "show": _show,
    "replay": _replay,
    "purge": _purge,
}

__all__ = ["ProgressBar", "add_dlq_parser", "confirm", "format_table", "run_dlq"]
