"""``eventfn graph``, ``eventfn status`` and ``--otel console`` across two real processes."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import anyio
import pytest

from eventfn.brokers import Settlement, from_url
from eventfn.brokers.base import Failure
from eventfn.cli import main
from examples.orders import shop

ROOT = Path(__file__).resolve().parent.parent


def edges(text: str) -> set[tuple[str, str, str]]:
    """(source label, edge label, target label) of every edge in a Mermaid flowchart."""
    labels = dict(re.findall(r'^\s*(\w+)[\[\(\{>/]+"(.+?)"', text, re.MULTILINE))
    found = set()
    for source, label, target in re.findall(
        r'^\s*(\w+) (?:-- "(.*?)" )?--> (\w+)$', text, re.MULTILINE
    ):
        found.add((labels[source], label, labels[target]))
    return found


def test_graph_of_the_example_draws_every_declared_flow(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["graph", "examples.orders.shop:app"]) == 0
    text = capsys.readouterr().out
    assert text.startswith("flowchart LR\n")
    assert edges(text) == {
        ("publishers outside the app", "", "topic order-events"),
        ("topic order-events", "reserve-inventory", "reserve_inventory"),
        ("topic order-events", "send-customer-email", "send_customer_email"),
        ("topic order-events", "update-analytics", "update_analytics"),
        ("reserve_inventory", "emits", "inventory.reserved"),
        ("inventory.reserved", "notify-warehouse", "notify_warehouse"),
    }
    assert 'subgraph bus_events["event bus events"]' in text


def test_graph_writes_a_markdown_file_with_a_mermaid_fence(tmp_path: Path) -> None:
    out = tmp_path / "flows.md"
    assert main(["graph", "examples.orders.shop:app", "--output", str(out)]) == 0
    text = out.read_text()
    assert text.startswith("```mermaid\nflowchart LR\n") and text.endswith("```\n")


def test_status_prints_the_brokers_own_counts_under_a_backlog(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url = f"sqlite:///{tmp_path / 'shop.db'}"
    reserve, email, *_ = shop.app.subscriptions

    async def build_backlog() -> dict[str, tuple[int, int, int, int]]:
        async with from_url(url) as broker:
            await shop.app.declare(broker)
            await broker.publish(
                [
                    shop.app.message("order-events", shop.OrderAccepted(f"o{n}", "c"))
                    for n in range(40)
                ]
            )
            leased = await broker.fetch(reserve.ref, 7, lease=60)  # in flight
            failure = Failure(error_type="ValueError", message="no", at=broker.clock())
            await broker.settle(
                [Settlement(delivery=d, outcome="dead", failure=failure) for d in leased[:2]]
                + [Settlement(delivery=d, outcome="retry", delay=600) for d in leased[2:5]]
            )
            taken = await broker.fetch(email.ref, 10, lease=60)
            await broker.settle([Settlement(delivery=d, outcome="ack") for d in taken[:4]])
            counts = {}
            for sub in shop.app.subscriptions:
                s = await broker.stats(sub.ref)
                counts[sub.ref.name] = (s.ready + s.delayed, s.delayed, s.in_flight, s.dead)
            return counts

    expected = anyio.run(build_backlog)
    assert expected["order-events/reserve-inventory"] == (36, 3, 2, 2)
    assert expected["order-events/send-customer-email"] == (30, 0, 6, 0)
    capsys.readouterr()
    assert main(["status", "examples.orders.shop:app", "--broker", url, "--json"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    got = {
        r["subscription"]: (r["backlog"], r["delayed"], r["in_flight"], r["dead_letters"])
        for r in rows
    }
    assert got == expected

    assert main(["status", "examples.orders.shop:app", "--broker", url]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[1].split() == ["subscription", "backlog", "(delayed)", "in-flight", "dead-letters"]
    assert table[2].split() == ["order-events/reserve-inventory", "36", "3", "2", "2"]


def test_status_says_which_subscriptions_no_runner_declared_yet(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url = f"sqlite:///{tmp_path / 'empty.db'}"
    assert main(["status", "examples.orders.shop:app", "--broker", url]) == 0
    assert capsys.readouterr().out.count("not declared yet") == 4


SPAN = re.compile(
    r"^span '(?P<name>[^']+)' (?P<kind>\w+) \S+ trace=(?P<trace>\w{32}) span=(?P<span>\w{16}) "
    r"parent=(?P<parent>\w{16}|-) status=(?P<status>\w+)(?P<attributes>.*)$"
)


def spans_in(text: str) -> list[dict[str, str]]:
    return [m.groupdict() for line in text.splitlines() if (m := SPAN.match(line))]


def test_a_publisher_and_a_runner_process_make_one_trace(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'shop.db'}"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "SHOP_DATA": str(tmp_path / "data")}
    env.pop("OTEL_EXPORTER_OTLP_ENDPOINT", None)

    def eventfn(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "eventfn", *args],
            capture_output=True,
            text=True,
            env=env,
            cwd=tmp_path,
            timeout=120,
        )

    declared = eventfn("run", "examples.orders.shop:app", "--broker", url, "--burst")
    assert declared.returncode == 0, declared.stderr
    order = '{"orderId": "o-42", "customerId": "c-7", "units": 3}'
    published = eventfn(
        "publish", "order-events", order, "--type", "order.accepted", "--broker", url,
        "--otel", "console",
    )  # fmt: skip
    assert published.returncode == 0, published.stderr
    ran = eventfn(
        "run", "examples.orders.shop:app", "--broker", url, "--burst", "--otel", "console"
    )
    assert ran.returncode == 0, ran.stderr

    (send,) = spans_in(published.stderr)
    assert (send["name"], send["kind"], send["parent"]) == ("send order-events", "PRODUCER", "-")
    handled = spans_in(ran.stderr)
    assert {s["trace"] for s in handled} == {send["trace"]}
    processes = [s for s in handled if s["name"] == "process order-events"]
    groups = {re.search(r"group.name=(\S+)", s["attributes"]).group(1) for s in processes}  # type: ignore[union-attr]
    assert groups == {"reserve-inventory", "send-customer-email", "update-analytics"}
    assert all(s["parent"] == send["span"] for s in processes)
    (emitted,) = [s for s in handled if s["name"] == "send events"]
    (reserve,) = [s for s in processes if "reserve-inventory" in s["attributes"]]
    assert emitted["parent"] == reserve["span"]
    (warehouse,) = [s for s in handled if s["name"] == "process events"]
    assert warehouse["parent"] == emitted["span"] and warehouse["kind"] == "CONSUMER"
    # the runner's log lines carry the ids of the span they were written in
    assert f"[trace_id={send['trace']} span_id={warehouse['span']}]" in ran.stderr
