"""``eventfn status`` (what waits, runs and failed, per subscription) and ``eventfn graph``."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import anyio

from eventfn._graph import mermaid
from eventfn.app import App
from eventfn.brokers import from_url
from eventfn.exceptions import ConfigurationError


def add_parsers(commands: Any, broker_help: str) -> None:
    """Add ``status`` and ``graph`` to the ``eventfn`` command's subcommands."""
    status = commands.add_parser(
        "status", help="backlog, in-flight and dead letters of each subscription, from the broker"
    )
    status.add_argument("app", help="module:attribute, e.g. shop:app")
    status.add_argument("--broker", help=broker_help)
    status.add_argument("--json", action="store_true", help="one JSON object per subscription")
    status.add_argument(
        "--watch", type=float, metavar="SECONDS", help="print again every SECONDS until ^C"
    )

    graph = commands.add_parser("graph", help="draw the app's flows as a Mermaid flowchart")
    graph.add_argument("app", help="module:attribute, e.g. shop:app")
    graph.add_argument(
        "-o", "--output", help="write to this file (a .md file gets a ```mermaid fence)"
    )


async def run_status(args: argparse.Namespace, app: App, url: str) -> int:
    """Print each subscription's counts as the broker has them now."""
    if args.watch is not None and not args.watch > 0:
        raise ConfigurationError("--watch takes a positive number of seconds")
    async with from_url(url) as broker:
        while True:
            rows = []
            for sub in app.subscriptions:
                row: dict[str, Any] = {"subscription": sub.ref.name, "handler": sub.name}
                try:
                    stats = await broker.stats(sub.ref)
                except ConfigurationError:
                    row["declared"] = False  # no runner has started on this broker yet
                else:
                    row |= {
                        "backlog": stats.ready + stats.delayed,
                        "ready": stats.ready,
                        "delayed": stats.delayed,
                        "in_flight": stats.in_flight,
                        "dead_letters": stats.dead,
                    }
                rows.append(row)
            _print_status(rows, args.json, app, broker.describe())
            if args.watch is None:
                return 0
            await anyio.sleep(args.watch)


def _print_status(rows: list[dict[str, Any]], as_json: bool, app: App, where: str) -> None:
    if as_json:
        for row in rows:
            print(json.dumps(row))
        sys.stdout.flush()
        return
    columns = ("backlog", "delayed", "in_flight", "dead_letters")
    table = [("subscription", "backlog", "(delayed)", "in-flight", "dead-letters")]
    for row in rows:
        if row.get("declared") is False:
            table.append((row["subscription"], "not declared yet", "", "", ""))
        else:
            table.append((row["subscription"], *(str(row[c]) for c in columns)))
    widths = [max(len(line[i]) for line in table) for i in range(len(table[0]))]
    print(f"app {app.name} on {where}")
    for line in table:
        cells = [
            c.ljust(w) if i == 0 else c.rjust(w)
            for i, (c, w) in enumerate(zip(line, widths, strict=True))
        ]
        print("  " + "  ".join(cells).rstrip())
    sys.stdout.flush()


def run_graph(args: argparse.Namespace, app: App) -> int:
    """Print (or write) the app's Mermaid flowchart."""
    text = mermaid(app)
    if not args.output:
        print(text, end="")
        return 0
    path = Path(args.output)
    if path.suffix.lower() in (".md", ".markdown"):
        text = f"```mermaid\n{text}```\n"
    path.write_text(text, encoding="utf-8")
    print(f"wrote the flows of app {app.name} to {path}")
    return 0
