"""``make demo``: the order fan-out on the embedded SQLite broker, start to finish.

1. declares the app's subscriptions on a fresh ``demo-data/shop.db``;
2. publishes a burst of ``order.accepted`` events with the ``eventfn publish`` command
   (plus one whose payload does not match the schema, to show the dead-letter path);
3. runs ``eventfn run examples.orders.shop:app --burst``, which handles everything, retries
   the flaky e-mails, dead-letters the bad order, and exits with a summary;
4. shows what the handlers wrote and what is in the dead-letter queue.
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import anyio

from eventfn.brokers import DeadLetterRecord, from_url

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT / "demo-data"
BROKER = f"sqlite:///{DATA / 'shop.db'}"
ORDERS = int(os.environ.get("DEMO_ORDERS", "200"))


def eventfn(*args: str, stdin: str | None = None) -> None:
    command = [sys.executable, "-m", "eventfn", *args, "--broker", BROKER]
    print(f"\n$ eventfn {' '.join(args)}", flush=True)
    env = {**os.environ, "SHOP_DATA": str(DATA), "PYTHONPATH": str(ROOT)}
    subprocess.run(command, input=stdin, text=True, check=True, cwd=ROOT, env=env)


async def declare() -> None:
    sys.path.insert(0, str(ROOT))
    from examples.orders.shop import app

    await app.connect(BROKER)  # connecting declares the topic and its three groups
    await app.close()


async def dead_letters() -> list[DeadLetterRecord]:
    async with from_url(BROKER) as broker:
        return await broker.dead_letters()


def main() -> None:
    shutil.rmtree(DATA, ignore_errors=True)
    DATA.mkdir()
    os.environ["SHOP_DATA"] = str(DATA)
    anyio.run(declare)
    print(f"subscriptions declared on {BROKER}", flush=True)
    subprocess.run([sys.executable, "-m", "eventfn", "inspect", "examples.orders.shop:app"],
                   check=True, cwd=ROOT)
    orders = [
        json.dumps({"orderId": f"o-{n:04d}", "customerId": f"c-{n % 17}", "units": 1 + n % 3})
        for n in range(ORDERS)
    ]
    orders.append(json.dumps({"orderId": 42, "customerId": None}))  # does not match the schema
    eventfn("publish", "order-events", "-", "--type", "order.accepted", stdin="\n".join(orders))
    eventfn("run", "examples.orders.shop:app", "--burst", "--concurrency", "32")
    with sqlite3.connect(DATA / "state.db") as db:
        rows = db.execute("SELECT grp, COUNT(*) FROM effects GROUP BY grp ORDER BY grp").fetchall()
    print("\neffects in the state store:")
    for group, count in rows:
        print(f"  {group:<22} {count}")
    dead = anyio.run(dead_letters)
    print(f"\ndead-letter queue: {len(dead)} messages")
    for record in dead:
        print(f"  {record.subscription} {record.message_id}: {record.error_message}")


if __name__ == "__main__":
    main()
