"""The examples in ``examples/`` run as their docstrings and ``examples/README.md`` say.

Each is run as a user would: ``eventfn publish`` (or ``eventfn upload``) in a subprocess, then
``eventfn run ... --burst``, then a look at what the handlers wrote. The nightly reconciliation
cannot wait for 02:00, so one of its tests runs the app in a runner whose broker clock starts
on a chosen morning, when the 02:00 tick is overdue and ``missed="last"`` runs it once.
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from contextlib import closing
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import anyio
import msgspec
import pytest

import eventfn
from eventfn.brokers.memory import MemoryBroker
from examples.documents import docs
from examples.reconciliation import nightly
from tests.conftest import drop, networked_url, require_networked

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]


class Cli:
    """``python -m eventfn`` in a subprocess, from a scratch directory, with the repository
    importable (as ``pip install -e .`` and a checkout would make it)."""

    def __init__(self, cwd: Path, broker: str, **env: str) -> None:
        self.cwd = cwd
        self.broker = broker
        inherited = {k: v for k, v in os.environ.items() if not k.startswith("EVENTFN_")}
        self.env = {**inherited, "PYTHONPATH": str(ROOT), **env}

    def __call__(self, *args: str, stdin: str | None = None) -> str:
        """Run ``eventfn ARGS --broker URL``; its stdout, failing the test on a non-zero exit."""
        done = subprocess.run(
            [sys.executable, "-m", "eventfn", *args, "--broker", self.broker],
            input=stdin,
            capture_output=True,
            text=True,
            cwd=self.cwd,
            env=self.env,
            timeout=100,
        )
        assert done.returncode == 0, f"eventfn {' '.join(args)}:\n{done.stdout}\n{done.stderr}"
        return done.stdout


def lines(*documents: dict[str, Any]) -> str:
    return "\n".join(json.dumps(d) for d in documents)


def select(path: Path, sql: str) -> list[tuple[Any, ...]]:
    with closing(sqlite3.connect(path)) as db:
        return db.execute(sql).fetchall()


# -- the clickstream --------------------------------------------------------------------------


def test_clickstream_builds_sessions_per_user_in_click_order(tmp_path: Path) -> None:
    eventfn = Cli(tmp_path, f"sqlite:///{tmp_path / 'broker.db'}", CLICKS_DATA=str(tmp_path))
    app = "examples.clickstream.clicks:app"
    eventfn("run", app, "--burst")  # declares the stream and its groups
    pages = ["/", "/pricing", "/docs"]
    start = 1_770_000_000.0
    expected: dict[str, list[tuple[int, int, int]]] = {}
    for user, gap_after in (("ada", 6), ("bob", 3), ("cyd", None)):
        at, clicks = start, []
        for seq in range(1, 11):
            at += 50 * 60 if seq - 1 == gap_after else 60  # a 50-minute pause starts a session
            clicks.append({"user_id": user, "seq": seq, "at": at, "page": pages[seq % 3]})
        # (session number, first seq, last seq)
        expected[user] = [(1, 1, gap_after), (2, gap_after + 1, 10)] if gap_after else [(1, 1, 10)]
        out = eventfn(
            "publish", "clicks", "-", "--key", user, "--type", "click", stdin=lines(*clicks)
        )
        assert "published 10 messages to clicks" in out

    summary = eventfn("run", app, "--burst", "--concurrency", "16")

    # seq 3 and 10 of each user fail once; their later clicks wait for the retry
    assert "handled 60, retried 6, dead-lettered 0" in summary
    sessions = select(
        tmp_path / "clicks.db",
        "SELECT user_id, number, first_seq, last_seq, clicks FROM sessions ORDER BY 1, 2",
    )
    assert sessions == [
        (user, number, first, last, last - first + 1)
        for user, spans in sorted(expected.items())
        for number, first, last in spans
    ], "a click was counted out of its user's order"
    views = select(tmp_path / "clicks.db", "SELECT page, count(*) FROM views GROUP BY page")
    assert dict(views) == dict(Counter(pages[seq % 3] for seq in range(1, 11) for _ in "abc"))


# -- the nightly reconciliation ---------------------------------------------------------------

BANK = [{"ref": "r1", "amount_cents": 1000}, {"ref": "r2", "amount_cents": 250}]
BANK += [{"ref": "r3", "amount_cents": 99}]
BOOKS = [{"ref": "r1", "amount_cents": 1000}, {"ref": "r2", "amount_cents": 205}]
BOOKS += [{"ref": "r4", "amount_cents": 10}]
MISMATCHES = [("r2", 250, 205), ("r3", 99, None), ("r4", None, 10)]


def write_ledgers(directory: Path) -> None:
    (directory / "bank.json").write_text(json.dumps(BANK))
    (directory / "books.json").write_text(json.dumps(BOOKS))


def mismatches(directory: Path) -> list[tuple[Any, ...]]:
    return select(directory / "mismatches.db", "SELECT * FROM mismatches ORDER BY night, ref")


async def test_reconciliation_missed_at_two_runs_once_when_the_runner_starts_later(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("RECON_DATA", str(tmp_path))
    write_ledgers(tmp_path)
    caplog.set_level(logging.INFO, logger="eventfn.handler")
    recorded = anyio.Event()
    store = nightly.store_mismatch

    def store_and_tell(mismatch: nightly.MismatchFound) -> None:  # runs in a worker thread
        store(mismatch)
        if len(mismatches(tmp_path)) == len(MISMATCHES):
            anyio.from_thread.run_sync(recorded.set)

    monkeypatch.setattr(nightly, "store_mismatch", store_and_tell)
    # the runner starts at 07:30 in Berlin (CET): 02:00 passed while nothing ran
    morning = datetime(2026, 3, 10, 6, 30, tzinfo=UTC).timestamp()
    offset = morning - time.time()
    clock = lambda: time.time() + offset  # noqa: E731 - runs on from that morning
    app = nightly.app
    async with MemoryBroker(f"memory://recon-{uuid.uuid4().hex}", clock=clock) as broker:
        await app.connect(broker)
        try:
            runner = eventfn.Runner(app, broker, poll=0.05, grace=1)
            async with anyio.create_task_group() as tasks:
                tasks.start_soon(runner.run)
                with anyio.fail_after(30):
                    await recorded.wait()
                runner.stop()
        finally:
            await app.close()
    by_subscription = {s.subscription: s.handled for s in runner.summary().subscriptions}
    assert by_subscription == {
        "schedule.nightly-reconciliation": 1,
        "events/record-mismatch": len(MISMATCHES),
    }
    night = "2026-03-10T01:00:00Z"  # 02:00 in Berlin
    assert mismatches(tmp_path) == [(night, *m) for m in MISMATCHES]
    assert "3 mismatches (catching up a missed night)" in caplog.text


def test_reconciliation_by_hand_with_a_published_tick(tmp_path: Path) -> None:
    write_ledgers(tmp_path)
    eventfn = Cli(tmp_path, f"sqlite:///{tmp_path / 'broker.db'}", RECON_DATA=str(tmp_path))
    app = "examples.reconciliation.nightly:app"
    eventfn("run", app, "--burst")  # declares the schedule's queue and the event bus group
    due = "2026-03-10T01:00:00Z"
    tick = {"schedule": "nightly-reconciliation", "due": due, "due_at": 1_773_104_400}
    queue = "schedule.nightly-reconciliation"
    eventfn("publish", queue, json.dumps(tick), "--type", "eventfn.schedule.tick")
    summary = eventfn("run", app, "--burst")
    assert "handled 4, retried 0, dead-lettered 0" in summary
    assert mismatches(tmp_path) == [(due, *m) for m in MISMATCHES]


# -- the transactional outbox on PostgreSQL ---------------------------------------------------


@pytest.fixture
def outbox_url() -> Iterator[str]:
    """A PostgreSQL broker URL of a namespace of its own, whose schema is also the
    ``search_path`` (the example's tables are unqualified); dropped afterwards."""
    url = networked_url("postgresql")
    require_networked("postgresql", url)
    schema = parse_qs(urlsplit(url).query)["namespace"][0]
    url = f"{url}&search_path={schema}"
    yield url
    anyio.run(drop, url)


async def postgres(url: str, *statements: str) -> list[Any]:
    """Run statements on the broker's database in its namespace; the last one's rows."""
    import asyncpg  # the plug-in's dependency: there when require_networked passed

    schema = parse_qs(urlsplit(url).query)["namespace"][0]
    connection = await asyncpg.connect("postgresql://127.0.0.1:5432/test")
    try:
        await connection.execute(f"SET search_path = {schema}")
        rows: list[Any] = []
        for statement in statements:
            rows = await connection.fetch(statement)
        return [tuple(row) for row in rows]
    finally:
        await connection.close()


def test_outbox_commits_the_order_and_its_event_together_or_neither(
    tmp_path: Path, outbox_url: str
) -> None:
    eventfn = Cli(tmp_path, outbox_url)
    app = "examples.outbox.orders_outbox:app"
    eventfn("run", app, "--burst")  # creates the namespace and declares the app
    anyio.run(
        postgres,
        outbox_url,
        "CREATE TABLE stock (sku text PRIMARY KEY, available integer NOT NULL)",
        "CREATE TABLE orders (id text PRIMARY KEY, sku text NOT NULL, units integer NOT NULL)",
        "CREATE TABLE confirmations (order_id text PRIMARY KEY)",
        "INSERT INTO stock VALUES ('tea', 3), ('coffee', 1)",
    )
    commands = lines(
        {"order_id": "o1", "sku": "tea", "units": 2},
        {"order_id": "o2", "sku": "coffee", "units": 5},  # more than there is: fails
        {"order_id": "o3", "sku": "tea", "units": 1},
    )
    eventfn("publish", "place-order", "-", "--type", "place.order", stdin=commands)

    summary = eventfn("run", app, "--burst")

    assert "handled 4, retried 0, dead-lettered 1" in summary
    orders = anyio.run(postgres, outbox_url, "SELECT id FROM orders ORDER BY id")
    confirmed = anyio.run(postgres, outbox_url, "SELECT order_id FROM confirmations ORDER BY 1")
    stock = anyio.run(postgres, outbox_url, "SELECT sku, available FROM stock ORDER BY sku")
    assert orders == [("o1",), ("o3",)], "the failed order's row was committed"
    assert confirmed == [("o1",), ("o3",)], "an OrderPlaced event is missing or was kept"
    assert stock == [("coffee", 1), ("tea", 0)]
    dead = [json.loads(line) for line in eventfn("dlq", "list", "--json").splitlines()]
    assert [(d["subscription"], d["error_message"]) for d in dead] == [
        ("place-order", "not enough 'coffee' for order o2")
    ]


# -- document processing on upload -----------------------------------------------------------


def analysis(buckets: Path, key: str) -> docs.Analysis:
    return msgspec.json.decode(
        (buckets / "processed" / f"{key}.json").read_bytes(), type=docs.Analysis
    )


def notifications(buckets: Path) -> list[dict[str, Any]]:
    log = (buckets / "notifications.log").read_text().splitlines()
    return sorted((json.loads(line) for line in log), key=lambda n: n["source"])


def test_documents_waiting_in_the_inbox_are_analysed_and_announced(tmp_path: Path) -> None:
    buckets = tmp_path / "buckets"
    (buckets / "inbox").mkdir(parents=True)
    (buckets / "inbox" / "memo.txt").write_text(
        "Queues distribute work.\nTopics distribute facts.\n"
    )
    (buckets / "inbox" / "notes.md").write_text(
        "# Streams\n\nStreams keep order per key, per key.\n"
    )
    (buckets / "inbox" / "table.csv").write_text("not,a,document\n")  # matches no pattern
    eventfn = Cli(tmp_path, f"sqlite:///{tmp_path / 'broker.db'}")

    summary = eventfn("run", "examples.documents.docs:app", "--burst", "--buckets", str(buckets))

    assert "dead-lettered 0" in summary
    assert sorted(p.name for p in (buckets / "processed").glob("*.json")) == [
        "memo.txt.json",
        "notes.md.json",
    ]
    memo = analysis(buckets, "memo.txt")
    assert (memo.source, memo.words, memo.lines) == ("memo.txt", 6, 3)
    assert analysis(buckets, "notes.md").top[:2] == [("streams", 2), ("keep", 1)]
    assert notifications(buckets) == [
        {"source": "memo.txt", "result": "memo.txt.json", "words": 6},
        {"source": "notes.md", "result": "notes.md.json", "words": 8},
    ]


def test_documents_uploaded_with_the_cli_before_and_after_the_first_run(tmp_path: Path) -> None:
    buckets = tmp_path / "buckets"
    eventfn = Cli(tmp_path, f"sqlite:///{tmp_path / 'broker.db'}")
    run = ("run", "examples.documents.docs:app", "--burst", "--buckets", str(buckets))
    first, second = tmp_path / "first.txt", tmp_path / "second.md"
    first.write_text("An upload before any runner declared the bucket.\n")
    second.write_text("An upload once the runner has declared it.\n")

    stored = eventfn("upload", "inbox", str(first), "--buckets", str(buckets))
    assert "no runner has declared bucket 'inbox' yet" in stored
    eventfn(*run)  # the first runner publishes what it finds in the bucket
    published = eventfn("upload", "inbox", str(second), "--buckets", str(buckets))
    assert "published its upload event" in published
    eventfn(*run)

    assert [n["source"] for n in notifications(buckets)] == ["first.txt", "second.md"]
    assert analysis(buckets, "first.txt").words == 8
    assert analysis(buckets, "second.md").words == 8
