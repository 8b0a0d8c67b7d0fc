"""The dead-letter queue: the Python API on every broker, and ``eventfn dlq`` end to end."""

from __future__ import annotations

import argparse
import io
import json
import os
import re
import sqlite3
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import anyio
import pytest

import eventfn
from eventfn import App
from eventfn._cli_dlq import ProgressBar, add_dlq_parser, format_table, run_dlq
from eventfn.brokers import (
    Broker,
    DeadLetterRecord,
    Delivery,
    Failure,
    Settlement,
    SubscriptionRef,
    from_url,
)
from eventfn.brokers.memory import MemoryBroker
from eventfn.deadletters import (
    DeadLetterQueue,
    error_matches,
    format_record,
    parse_since,
    record_json,
)
from tests.apps import flaky_topic

ROOT = Path(__file__).resolve().parents[1]
EMAIL = SubscriptionRef(destination="orders", kind="topic", group="email")
STOCK = SubscriptionRef(destination="orders", kind="topic", group="stock")
DECODE = "eventfn.exceptions.DecodeError"
T0 = 1_764_151_200.0  # 2025-11-26T10:00:00Z

_publisher = App("dlq-tests")


# -- the Python API, on every broker ------------------------------------------------------------


@pytest.fixture
async def broker(broker_url: str) -> AsyncIterator[Broker]:
    async with from_url(broker_url) as broker:
        await broker.declare([EMAIL, STOCK])
        yield broker


async def fail_all(broker: Broker, ref: SubscriptionRef, count: int) -> list[Delivery]:
    """Dead-letter the next ``count`` deliveries of ``ref``: even ones as DecodeError, odd ones
    as ValueError, the i-th failing at ``T0 + 100 * i``."""
    deliveries: list[Delivery] = []
    while len(deliveries) < count:
        deliveries += await broker.fetch(ref, count - len(deliveries), lease=60)
    await broker.settle(
        [
            Settlement(
                delivery=delivery,
                outcome="dead",
                failure=Failure(
                    error_type=DECODE if i % 2 == 0 else "ValueError",
                    message=f"failure {i}",
                    traceback=f"Traceback (most recent call last):\nValueError: failure {i}\n",
                    at=T0 + 100 * i,
                ),
            )
            for i, delivery in enumerate(deliveries)
        ]
    )
    return deliveries


async def populate(broker: Broker, count: int) -> list[str]:
    """Publish ``count`` orders; group email dead-letters all of them, group stock acks all."""
    messages = [_publisher.message("orders", {"n": n}) for n in range(count)]
    await broker.publish(messages)
    await fail_all(broker, EMAIL, count)
    acked: list[Delivery] = []
    while len(acked) < count:
        acked += await broker.fetch(STOCK, count - len(acked), lease=60)
    await broker.settle([Settlement(delivery=d, outcome="ack") for d in acked])
    return [m.id for m in messages]


async def test_list_pages_through_the_broker_and_filters(
    broker: Broker, monkeypatch: pytest.MonkeyPatch
) -> None:
    ids = await populate(broker, 8)
    pages: list[str | None] = []
    original = broker.dead_letters

    async def spy(
        subscription: str | None = None, *, limit: int = 100, after: str | None = None
    ) -> list[DeadLetterRecord]:
        pages.append(after)
        return await original(subscription, limit=limit, after=after)

    monkeypatch.setattr(broker, "dead_letters", spy)
    dlq = DeadLetterQueue(broker, page_size=3)

    records = await dlq.list()
    assert [r.message_id for r in records] == ids
    assert [int(r.id) for r in records] == sorted(int(r.id) for r in records)
    assert len(pages) == 3 and pages[0] is None  # 3 + 3 + 2, keyset by the last id
    assert {r.subscription for r in records} == {EMAIL.name}

    decode = [r.message_id for r in await dlq.list(error="DecodeError")]
    assert decode == ids[0::2]
    assert [r.message_id for r in await dlq.list(error=DECODE)] == decode
    assert [r.message_id for r in await dlq.list(error="exceptions.DecodeError")] == decode
    assert await dlq.list(error="Decode") == []  # a dotted part, not a substring
    assert [r.message_id for r in await dlq.list(error="ValueError", limit=2)] == ids[1:4:2]
    assert [r.message_id for r in await dlq.list(since=T0 + 500)] == ids[5:]
    since = datetime.fromtimestamp(T0 + 650, UTC)
    assert [r.message_id for r in await dlq.list(since=since)] == ids[7:]
    assert await dlq.list(limit=0) == []
    assert await dlq.list(subscription=STOCK.name) == []
    assert await dlq.count() == 8 and await dlq.count(STOCK.name) == 0

    bound = DeadLetterQueue(broker, EMAIL.name, page_size=2)
    assert [r.message_id async for r in bound] == ids


async def test_replay_reaches_only_its_own_subscription_and_keeps_the_id(broker: Broker) -> None:
    ids = await populate(broker, 4)
    dlq = DeadLetterQueue(broker)
    target = (await dlq.list())[2]

    assert await dlq.replay([target.id]) == 1
    assert await broker.fetch(STOCK, 10, lease=60) == []  # the group that succeeded: nothing
    [again] = await broker.fetch(EMAIL, 10, lease=60)
    assert (again.id, again.attempt) == (ids[2], 1)
    replayed = await dlq.get(target.id)
    assert replayed is not None
    assert (replayed.state, replayed.replayed, replayed.message_id) == ("replayed", 1, ids[2])
    assert target.id not in {r.id for r in await dlq.list()}
    assert await dlq.replay([target.id, "999999"]) == 0  # not dead any more; unknown
    assert await dlq.replay((await dlq.list())[0].id) == 1  # one id, not its characters

    # It fails again: the same record is dead again and keeps its replay count.
    await broker.settle(
        [Settlement(delivery=again, outcome="dead", failure=Failure(error_type="E", message="m"))]
    )
    dead = await dlq.get(target.id)
    assert dead is not None and (dead.state, dead.replayed) == ("dead", 1)
    assert await dlq.replay([target.id]) == 1
    twice = await dlq.get(target.id)
    assert twice is not None and (twice.state, twice.replayed) == ("replayed", 2)


async def test_the_broker_url_is_never_printed_with_its_password(
    capsys: pytest.CaptureFixture[str],
) -> None:
    url = "memory://user:hunter2@dlq-redact"
    try:
        assert await run_dlq(dlq_args("list", "--broker", url)) == 0
        assert await run_dlq(dlq_args("show", "1", "--broker", url)) == 1
    finally:
        MemoryBroker.reset(url)
    out, err = capsys.readouterr()
    assert "no dead letters on memory://user:***@dlq-redact" in out
    assert "no dead letter with id '1' on memory://user:***@dlq-redact" in err
    assert "hunter2" not in out + err


async def test_replay_all_of_one_subscription_in_batches_with_progress(broker: Broker) -> None:
    ids = await populate(broker, 8)
    dlq = DeadLetterQueue(broker, batch_size=3)
    seen: list[tuple[int, int]] = []

    assert (
        await dlq.replay(all=True, subscription=EMAIL.name, progress=lambda *p: seen.append(p)) == 8
    )
    assert seen == [(0, 8), (3, 8), (6, 8), (8, 8)]
    redelivered = await broker.fetch(EMAIL, 20, lease=60)
    assert sorted(d.id for d in redelivered) == sorted(ids)
    assert await broker.fetch(STOCK, 20, lease=60) == []
    assert await dlq.count() == 0

    with pytest.raises(ValueError, match="needs a subscription"):
        await dlq.replay(all=True)
    with pytest.raises(ValueError, match="not both"):
        await dlq.replay(["1"], all=True, subscription=EMAIL.name)
    with pytest.raises(ValueError, match="give record ids"):
        await dlq.replay()


async def test_a_bound_queue_sees_only_its_subscription(broker: Broker) -> None:
    await broker.publish([_publisher.message("orders", {"n": n}) for n in range(3)])
    await fail_all(broker, EMAIL, 3)
    await fail_all(broker, STOCK, 3)
    email, stock = DeadLetterQueue(broker, EMAIL.name), DeadLetterQueue(broker, STOCK.name)
    [stock_first, *_] = await stock.list()
    [email_first, *_] = await email.list()

    assert await email.get(stock_first.id) is None
    assert await stock.get(stock_first.id) == stock_first
    assert await email.replay([stock_first.id, email_first.id]) == 1
    assert [d.id for d in await broker.fetch(EMAIL, 10, lease=60)] == [email_first.message_id]
    assert await broker.fetch(STOCK, 10, lease=60) == []

    assert await stock.purge() == 3
    assert await stock.count() == 0
    assert await email.count() == 2
    # a purge takes the replayed record too
    assert await DeadLetterQueue(broker).purge() == 3
    assert await email.get(email_first.id) is None


async def test_unknown_subscription_is_a_clear_error(broker: Broker) -> None:
    with pytest.raises(Exception, match="never declared"):
        await DeadLetterQueue(broker).list(subscription="orders/nobody")


# -- parsing and rendering ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("90s", T0 - 90),
        ("10m", T0 - 600),
        ("2h", T0 - 7200),
        ("1.5d", T0 - 1.5 * 86400),
        ("1w", T0 - 7 * 86400),
        ("3 h", T0 - 3 * 3600),
        ("1764151200", T0),
        ("2025-11-26T10:00", T0),
        ("2025-11-26T10:00:00Z", T0),
        ("2025-11-26T11:00:00+01:00", T0),
        ("2025-11-26", T0 - 10 * 3600),
    ],
)
def test_parse_since(text: str, expected: float) -> None:
    assert parse_since(text, now=T0) == pytest.approx(expected)


def test_parse_since_other_values() -> None:
    assert parse_since(T0) == T0
    assert parse_since(int(T0)) == T0
    assert parse_since(datetime(2025, 11, 26, 10)) == T0  # naive is UTC, as eventfn prints
    assert parse_since(datetime(2025, 11, 26, 12, tzinfo=timezone(timedelta(hours=2)))) == T0
    with pytest.raises(ValueError, match=r"cannot read 'yesterday'.*10m, 2h"):
        parse_since("yesterday")
    with pytest.raises(ValueError, match="cannot read"):
        parse_since("10y")


def test_error_matches() -> None:
    assert error_matches(DECODE, None) and error_matches(DECODE, "")
    assert error_matches(DECODE, DECODE) and error_matches(DECODE, "DecodeError")
    assert not error_matches(DECODE, "decodeerror") and not error_matches(DECODE, "Error")
    assert error_matches("ValueError", "ValueError")


def make_record(body: bytes, **changes: Any) -> DeadLetterRecord:
    fields: dict[str, Any] = {
        "id": "7",
        "subscription": "orders/email",
        "message_id": "m-1",
        "body": body,
        "key": None,
        "error_type": "tests.Boom",
        "error_message": "it broke",
        "traceback": "Traceback (most recent call last):\n  File x\ntests.Boom: it broke\n",
        "attempts": 5,
        "first_failed_at": T0,
        "last_failed_at": T0 + 60.5,
        "published_at": T0 - 1,
    }
    return DeadLetterRecord(**{**fields, **changes})


def test_format_record_shows_the_envelope_error_times_and_traceback() -> None:
    body = _publisher.message("orders", {"n": 3, "name": "Zoë"}, id="m-1").body
    text = format_record(make_record(body, replayed=1, state="replayed"))
    assert text.startswith("dead letter 7\n")
    for expected in (
        "subscription:  orders/email",
        "message id:    m-1",
        "state:         replayed (replayed 1 time)",
        "error type:    tests.Boom",
        "error:         it broke",
        "attempts:      5",
        "first failure: 2025-11-26T10:00:00.000Z",
        "last failure:  2025-11-26T10:01:00.500Z",
        "published:     2025-11-26T09:59:59.000Z",
        '"type": "message"',
        '"n": 3',
        '"name": "Zoë"',
        "  tests.Boom: it broke",
    ):
        assert expected in text


def test_format_record_shows_a_poison_body_safely_and_truncated() -> None:
    body = b"\xff\x00\x1b[31mnot json" * 300
    record = make_record(body, traceback="", error_message="bad\x1b[2J\u202eevil")
    text = format_record(record)
    assert "not a valid envelope (malformed envelope" in text
    assert f"{len(body)} bytes" in text and f"({len(body) - 1024} more bytes)" in text
    assert "traceback: none" in text
    assert "\x1b" not in text and "\x00" not in text and "\u202e" not in text
    assert "bad\\x1b[2J\\u202eevil" in text
    assert "\x1b" not in format_table([record])


def test_record_json_is_one_json_line_with_iso_times() -> None:
    body = _publisher.message("orders", {"n": 3}, id="m-1").body
    data = record_json(make_record(body))
    assert json.loads(json.dumps(data)) == data
    assert data == {
        "id": "7",
        "subscription": "orders/email",
        "message_id": "m-1",
        "key": None,
        "error_type": "tests.Boom",
        "error_message": "it broke",
        "attempts": 5,
        "first_failed_at": "2025-11-26T10:00:00.000Z",
        "last_failed_at": "2025-11-26T10:01:00.500Z",
        "published_at": "2025-11-26T09:59:59.000Z",
        "replayed": 0,
        "state": "dead",
    }
    full = record_json(make_record(body), full=True)
    assert full["envelope"]["data"] == {"n": 3} and "tests.Boom" in full["traceback"]
    poison = record_json(make_record(b"\xff"), full=True)
    assert poison["envelope"] is None and poison["body_preview"] == "b'\\xff'"


# -- the CLI in-process: what a subprocess cannot show (a terminal) -------------------------------


class Terminal(io.StringIO):
    """A stream that says it is a terminal."""

    def isatty(self) -> bool:
        return True


def dlq_args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="eventfn")
    add_dlq_parser(parser.add_subparsers(dest="command", required=True), "broker URL")
    return parser.parse_args(["dlq", *argv])


async def test_a_large_replay_draws_a_progress_bar_on_a_terminal(
    broker: Broker,
    broker_url: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    await populate(broker, 150)
    stderr = Terminal()
    monkeypatch.setattr(sys, "stderr", stderr)
    args = dlq_args("replay", "--all", "-s", EMAIL.name, "--yes", "--broker", broker_url)
    assert await run_dlq(args) == 0
    assert "replayed 150 dead letters" in capsys.readouterr().out
    drawn = stderr.getvalue()
    assert drawn.startswith("\rreplaying [....") and drawn.endswith("] 150/150\n")
    assert "] 100/150" in drawn


def test_progress_bar_draws_in_place() -> None:
    stream = Terminal()
    bar = ProgressBar(stream, "replaying", width=10)
    bar(0, 4)
    bar(2, 4)
    bar(4, 4)
    bar.close()
    assert stream.getvalue() == (
        "\rreplaying [..........] 0/4\rreplaying [#####.....] 2/4\rreplaying [##########] 4/4\n"
    )


@pytest.mark.parametrize(("answer", "status", "left"), [("y\n", 0, 0), ("\n", 1, 3), ("", 1, 3)])
async def test_purge_asks_on_a_terminal(
    broker: Broker,
    broker_url: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    answer: str,
    status: int,
    left: int,
) -> None:
    await populate(broker, 3)
    monkeypatch.setattr(sys, "stdin", Terminal(answer))
    assert await run_dlq(dlq_args("purge", "-s", EMAIL.name, "--broker", broker_url)) == status
    assert "Purge 3 dead letters of orders/email? [y/N]" in capsys.readouterr().err
    assert await DeadLetterQueue(broker).count() == left


async def test_replay_all_asks_on_a_terminal(
    broker: Broker,
    broker_url: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    await populate(broker, 2)
    monkeypatch.setattr(sys, "stdin", Terminal("n\n"))
    assert await run_dlq(dlq_args("replay", "--all", "-s", EMAIL.name, "--broker", broker_url)) == 1
    assert "Replay 2 dead letters of orders/email? [y/N]" in capsys.readouterr().err
    assert await DeadLetterQueue(broker).count() == 2


# -- eventfn dlq end to end: real processes on SQLite ---------------------------------------------


class Project:
    """A SQLite broker file and a record of handler calls, used by real ``eventfn`` processes."""

    def __init__(self, tmp: Path) -> None:
        self.broker = f"sqlite:///{tmp / 'broker.db'}"
        self.records = str(tmp / "records.db")
        flaky_topic.setup(self.records)

    def eventfn(self, *args: str, stdin: str = "", **env: str) -> subprocess.CompletedProcess[str]:
        # stdin is always a pipe, never the terminal pytest runs in: purge must see "no tty"
        return subprocess.run(
            [sys.executable, "-m", "eventfn", "--log-level", "warning", *args],
            input=stdin,
            capture_output=True,
            text=True,
            cwd=ROOT,
            env={**os.environ, "RECORD_DB": self.records, "PYTHONPATH": str(ROOT), **env},
            timeout=120,
        )

    def dlq(self, *args: str, status: int = 0, **env: str) -> subprocess.CompletedProcess[str]:
        result = self.eventfn("dlq", *args, "--broker", self.broker, **env)
        assert result.returncode == status, result.stdout + result.stderr
        return result

    def burst(self, **env: str) -> str:
        result = self.eventfn(
            "run", "tests.apps.flaky_topic:app", "--burst", "--broker", self.broker, **env
        )
        assert result.returncode == 0, result.stderr
        return result.stdout

    def listed(self, *args: str) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.dlq("list", "--json", *args).stdout.splitlines()]

    def shown(self, record_id: str) -> dict[str, Any]:
        return dict(json.loads(self.dlq("show", record_id, "--json").stdout))

    def calls(self, group: str, message_id: str) -> list[tuple[Any, ...]]:
        with sqlite3.connect(self.records, timeout=30) as db:
            rows = db.execute(
                "SELECT id, attempt, outcome FROM calls WHERE grp = ? AND id = ? ORDER BY rowid",
                (group, message_id),
            ).fetchall()
        return rows

    def message_id(self, n: int) -> str:
        with sqlite3.connect(self.records, timeout=30) as db:
            [(message_id,)] = db.execute(
                "SELECT id FROM calls WHERE grp = 'ledger' AND n = ?", (n,)
            ).fetchall()
        return str(message_id)


@pytest.fixture
def project(tmp_path: Path) -> Iterator[Project]:
    """Six payments and one poison message, after one burst: 4 dead letters in 2 groups."""
    project = Project(tmp_path)

    async def declare() -> None:
        await flaky_topic.app.connect(project.broker)
        await flaky_topic.app.close()

    anyio.run(declare)
    lines = "\n".join([*(json.dumps({"n": n}) for n in range(6)), '{"n": "oops"}'])
    published = project.eventfn("publish", "payments", "-", "--broker", project.broker, stdin=lines)
    assert published.returncode == 0, published.stderr
    assert "handled 10, retried 0, dead-lettered 4" in project.burst()
    yield project


@pytest.mark.slow
def test_cli_list_and_show(project: Project) -> None:
    table = project.dlq("list").stdout
    lines = table.splitlines()
    assert lines[0].split() == [
        "ID",
        "SUBSCRIPTION",
        "ERROR",
        "MESSAGE",
        "ATTEMPTS",
        "LAST",
        "FAILURE",
    ]
    assert len(lines) == 1 + 4 + 1 and lines[-1] == "4 dead letters"
    assert "customer 0 has no email address" in table and "DecodeError" in table

    records = project.listed()
    assert len(records) == 4
    for record in records:
        assert set(record) >= {
            "id", "subscription", "message_id", "error_type", "error_message", "attempts",
            "first_failed_at", "last_failed_at", "replayed", "state",
        }  # fmt: skip
        assert (record["attempts"], record["replayed"], record["state"]) == (1, 0, "dead")
        assert datetime.fromisoformat(record["last_failed_at"]) > datetime.now(UTC) - timedelta(
            hours=1
        )
    by_group = sorted((r["subscription"], r["error_type"]) for r in records)
    assert by_group == [
        ("payments/ledger", "eventfn.exceptions.DecodeError"),
        ("payments/notify", "eventfn.exceptions.DeadLetter"),
        ("payments/notify", "eventfn.exceptions.DeadLetter"),
        ("payments/notify", "eventfn.exceptions.DecodeError"),
    ]

    assert len(project.listed("--error", "DeadLetter")) == 2
    assert len(project.listed("--error", "eventfn.exceptions.DecodeError")) == 2
    assert len(project.listed("--subscription", "payments/ledger")) == 1
    assert len(project.listed("-s", "payments/notify", "--error", "DecodeError")) == 1
    assert len(project.listed("--since", "1h")) == 4
    assert project.listed("--since", "2999-01-01T00:00") == []
    assert (
        "no dead letters since 2999-01-01T00:00:00Z"
        in project.dlq("list", "--since", "2999-01-01").stdout
    )
    assert len(project.listed("--limit", "3")) == 3
    bad_since = project.dlq("list", "--since", "yesterday", status=2)
    assert "cannot read 'yesterday' as a time" in bad_since.stderr
    from_env = project.eventfn("dlq", "list", "--json", EVENTFN_BROKER=project.broker)
    assert len(from_env.stdout.splitlines()) == 4, from_env.stderr

    three = project.message_id(3)
    [record] = [r for r in project.listed("--error", "DeadLetter") if r["message_id"] == three]
    shown = project.dlq("show", record["id"]).stdout
    assert f"dead letter {record['id']}\n" in shown
    assert "subscription:  payments/notify" in shown and f"message id:    {three}" in shown
    assert "error type:    eventfn.exceptions.DeadLetter" in shown
    assert "error:         customer 3 has no email address" in shown
    assert re.search(r"attempts:\s+1\n", shown)
    assert re.search(r"first failure: \d{4}-\d\d-\d\dT[\d:.]+Z", shown)
    assert '"n": 3' in shown and '"source": "/eventfn-cli"' in shown
    assert "Traceback (most recent call last)" in shown and "raise eventfn.DeadLetter" in shown

    [poison] = project.listed("-s", "payments/ledger")
    poisoned = project.dlq("show", poison["id"]).stdout
    assert "payload does not match Payment" in poisoned and '"n": "oops"' in poisoned
    assert "traceback: none" in poisoned
    missing = project.dlq("show", "999999", status=1)
    assert "eventfn: error: no dead letter with id '999999'" in missing.stderr


@pytest.mark.slow
def test_cli_replay_reaches_only_the_failed_group_with_the_same_id(project: Project) -> None:
    three, zero = project.message_id(3), project.message_id(0)
    [record] = [r for r in project.listed("--error", "DeadLetter") if r["message_id"] == three]
    assert project.calls("ledger", three) == [(three, 1, "ok")]
    assert project.calls("notify", three) == [(three, 1, "failed")]

    dry = project.dlq("replay", record["id"], "--dry-run").stdout
    assert "dry run: would replay 1 dead letter; nothing changed" in dry and record["id"] in dry
    assert project.shown(record["id"])["state"] == "dead"
    assert len(project.listed()) == 4

    assert "replayed 1 dead letter\n" in project.dlq("replay", record["id"]).stdout
    after = project.shown(record["id"])
    assert (after["state"], after["replayed"], after["message_id"]) == ("replayed", 1, three)
    assert len(project.listed()) == 3

    # The fix is deployed: the replayed message is handled by notify, and only by notify.
    assert "handled 1, retried 0, dead-lettered 0" in project.burst(FLAKY_FIXED="1")
    assert project.calls("notify", three) == [(three, 1, "failed"), (three, 1, "ok")]
    assert project.calls("ledger", three) == [(three, 1, "ok")]
    assert project.calls("notify", zero) == [(zero, 1, "failed")]  # not replayed: not re-run
    done = project.shown(record["id"])
    assert (done["state"], done["replayed"], done["message_id"]) == ("replayed", 1, three)
    assert "state:         replayed (replayed 1 time)" in project.dlq("show", record["id"]).stdout

    again = project.dlq("replay", record["id"], "999999", status=1)
    assert "eventfn: error: dead letter '999999' not found" in again.stderr
    assert f"dead letter {record['id']} is not in state 'dead' but 'replayed'" in again.stderr
    assert again.stdout == ""


@pytest.mark.slow
def test_cli_replay_all_and_purge_need_consent(project: Project) -> None:
    unbounded = project.dlq("replay", "--all", status=2)
    assert "replay --all needs --subscription S" in unbounded.stderr
    assert "name the dead letters to replay" in project.dlq("replay", status=2).stderr

    dry = project.dlq("replay", "--all", "-s", "payments/notify", "--dry-run").stdout
    assert "would replay 3 dead letters; nothing changed" in dry
    refused = project.dlq("replay", "--all", "-s", "payments/notify", status=1)
    assert "Replay 3 dead letters of payments/notify: refused" in refused.stderr
    assert "pass --yes" in refused.stderr
    assert len(project.listed()) == 4
    replay_all = project.dlq("replay", "--all", "-s", "payments/ledger", "--yes")
    assert "replayed 1 dead letter" in replay_all.stdout
    assert [r["subscription"] for r in project.listed()] == ["payments/notify"] * 3

    no = project.dlq("purge", status=1)
    assert "Purge 3 dead letters of every subscription: refused" in no.stderr
    assert "stdin is not a terminal; pass --yes" in no.stderr
    assert len(project.listed()) == 3
    one = project.dlq("purge", "--subscription", "payments/ledger", "--yes").stdout
    assert "purged 1 dead-letter record of payments/ledger" in one  # the replayed one
    yes = project.dlq("purge", "--yes")
    assert "purged 3 dead-letter records of every subscription" in yes.stdout
    assert project.dlq("list").stdout.startswith("no dead letters on sqlite:///")
    assert project.dlq("list", "--json").stdout == ""


@pytest.mark.slow
def test_cli_broker_errors(tmp_path: Path) -> None:
    project = Project(tmp_path)
    secret = project.eventfn("dlq", "list", "--broker", "kafka://user:hunter2@127.0.0.1/x")
    assert secret.returncode == 2 and "no installed broker handles kafka://" in secret.stderr
    assert "hunter2" not in secret.stderr
    nowhere = tmp_path / "nope.db"
    missing = project.eventfn("dlq", "list", "--broker", f"sqlite:///{nowhere}")
    assert missing.returncode == 2 and "does not exist" in missing.stderr
    assert not nowhere.exists()
    anyio.run(_declare_on, project.broker)
    unknown = project.eventfn("dlq", "list", "-s", "payments/nobody", "--broker", project.broker)
    assert unknown.returncode == 2 and "'payments/nobody' was never declared" in unknown.stderr


async def _declare_on(url: str) -> None:
    await flaky_topic.app.connect(url)
    await flaky_topic.app.close()


async def test_app_dead_letters_is_the_same_queue(broker: Broker) -> None:
    app = eventfn.App("dlq-api", retry=eventfn.Retry(attempts=1))

    @app.on_queue("jobs")
    async def fail(data: dict[str, int]) -> None:
        raise ValueError(f"job {data['n']} is invalid")

    await app.connect(broker)
    await app.publish_many(app.message("jobs", {"n": n}) for n in range(3))
    with anyio.fail_after(30):
        await eventfn.Runner(app, broker, burst=True, poll=0.05).run()
    records = await app.dead_letters("jobs").list(error="ValueError")
    assert sorted(r.error_message for r in records) == [f"job {n} is invalid" for n in range(3)]
    assert await app.dead_letters().replay([records[0].id]) == 1
    assert await app.dead_letters("jobs").count() == 2
