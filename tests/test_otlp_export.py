"""End to end: `eventfn publish` and `eventfn run` export over OTLP/HTTP, configured by the standard
``OTEL_*`` variables alone, to a real receiver; the trace and metrics are read back from it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # imported by pytest_plugins, so that pytest can rewrite its asserts
    from tests.otlp_collector import OtlpCollector

pytest_plugins = ["tests.otlp_collector"]

ROOT = Path(__file__).resolve().parent.parent


def test_one_order_is_one_trace_at_the_collector(
    otlp_collector: OtlpCollector, tmp_path: Path
) -> None:
    url = f"sqlite:///{tmp_path / 'shop.db'}"
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "SHOP_DATA": str(tmp_path / "data"),
        "OTEL_EXPORTER_OTLP_ENDPOINT": otlp_collector.endpoint,
        "OTEL_SERVICE_NAME": "shop-e2e",
        "OTEL_METRIC_EXPORT_INTERVAL": "500",
    }

    def eventfn(*args: str) -> subprocess.CompletedProcess[str]:
        done = subprocess.run(
            [sys.executable, "-m", "eventfn", *args],
            capture_output=True,
            text=True,
            env=env,
            cwd=tmp_path,
            timeout=120,
        )
        assert done.returncode == 0, done.stderr
        return done

    eventfn("run", "examples.orders.shop:app", "--broker", url, "--burst", "--otel", "none")
    order = '{"orderId": "e2e-1", "customerId": "c-1", "units": 1}'
    message_id = "0193a1b2-c3d4-7e5f-8a9b-0c1d2e3f4a5b"
    eventfn(
        "publish", "order-events", order, "--type", "order.accepted", "--id", message_id,
        "--broker", url,
    )  # fmt: skip
    ran = eventfn("run", "examples.orders.shop:app", "--broker", url, "--burst")

    (send,) = [
        s
        for s in otlp_collector.all_spans()
        if s["attributes"].get("messaging.message.id") == message_id and s["kind"] == "PRODUCER"
    ]
    spans = otlp_collector.spans(send["trace_id"], expect=6)
    assert send["name"] == "send order-events" and send["parent_id"] is None
    assert send["resource"]["service.name"] == "shop-e2e"
    processes = [s for s in spans if s["name"] == "process order-events"]
    assert {s["attributes"]["messaging.consumer.group.name"] for s in processes} == {
        "reserve-inventory",
        "send-customer-email",
        "update-analytics",
    }
    for span in processes:
        assert span["kind"] == "CONSUMER" and span["parent_id"] == send["span_id"]
        assert span["attributes"]["messaging.system"] == "sqlite"
        assert span["attributes"]["messaging.operation.type"] == "process"
        assert span["attributes"]["eventfn.outcome"] == "ack"
        assert span["resource"]["service.name"] == "shop-e2e"
    (reserve,) = [
        s
        for s in processes
        if s["attributes"]["messaging.consumer.group.name"] == "reserve-inventory"
    ]
    (emitted,) = [s for s in spans if s["name"] == "send events"]
    assert emitted["kind"] == "PRODUCER" and emitted["parent_id"] == reserve["span_id"]
    (warehouse,) = [s for s in spans if s["name"] == "process events"]
    assert warehouse["parent_id"] == emitted["span_id"]
    assert f"trace_id={send['trace_id']}" in ran.stderr  # the runner's log lines carry it

    names = metric_names(otlp_collector.endpoint)
    for name in (
        "eventfn.handled",
        "messaging.process.duration",
        "eventfn.lag",
        "messaging.client.sent.messages",
    ):
        assert name in names, sorted(names)


def metric_names(endpoint: str) -> set[str]:
    """Names of every metric the receiver got over OTLP (its own ``/test/session/metrics``)."""
    with urllib.request.urlopen(f"{endpoint}/test/session/metrics", timeout=10) as response:
        payloads = json.loads(response.read())
    names: set[str] = set()

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            if "name" in node and ("sum" in node or "histogram" in node or "gauge" in node):
                names.add(node["name"])
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(payloads)
    return names
