"""The eventfn runner on NATS JetStream against a raw nats-py pull-consumer loop, same server.

    python benchmarks/nats_loop.py                 # 20,000 messages, concurrency 64
    python benchmarks/nats_loop.py -n 50000 --rounds 3

Raw loop: a work-queue stream and a durable pull consumer; ``fetch(256)``, then ``ack()`` each
message (nats-py's own calls, no decoding). eventfn: the same number of messages published to a
queue, then ``Runner(app, broker, burst=True, concurrency=64)`` with a no-op handler that decodes
each message into a ``msgspec.Struct``; the runner fetches, dispatches, settles and checks the
backlog until drained. CPU is this process's (``time.process_time``). Both use
``nats://127.0.0.1:4222`` (``--url``) in a namespace of their own, deleted afterwards.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import time
import uuid

import msgspec
import nats
from nats.js.api import AckPolicy, ConsumerConfig, RetentionPolicy

import eventfn
from eventfn.brokers import from_url


class Job(msgspec.Struct, frozen=True):
    n: int


class Measure:
    """Wall time and this process's CPU time of a block of work."""

    def __enter__(self) -> Measure:
        self.wall, self.cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.wall = time.perf_counter() - self.wall
        self.cpu = time.process_time() - self.cpu

    def line(self, label: str, n: int) -> str:
        return f"{label:<16} {n / self.wall:>10,.0f} msg/s  {self.cpu / n * 1e6:>7.2f} µs CPU/msg"


async def raw_loop(server: str, count: int, batch: int) -> Measure:
    nc = await nats.connect(server)
    js = nc.jetstream()
    stream = f"rawbench{uuid.uuid4().hex[:8]}"
    await js.add_stream(name=stream, subjects=[f"{stream}.>"], retention=RetentionPolicy.WORK_QUEUE)
    try:
        await js.add_consumer(
            stream,
            ConsumerConfig(durable_name="raw", ack_policy=AckPolicy.EXPLICIT, ack_wait=30),
        )
        body = msgspec.json.encode({"n": 0, "pad": "x" * 200})
        for start in range(0, count, 1000):
            acks = [js.publish(f"{stream}.m", body) for _ in range(min(1000, count - start))]
            await asyncio.gather(*acks)
        psub = await js.pull_subscribe_bind("raw", stream)
        handled = 0
        with Measure() as measure:
            while handled < count:
                for msg in await psub.fetch(batch, timeout=1):
                    await msg.ack()
                    handled += 1
            await nc.flush()
        return measure
    finally:
        await js.delete_stream(stream)
        await nc.close()


def make_app(seen: bytearray) -> eventfn.App:
    app = eventfn.App("natsbench")

    @app.on_queue("bench")
    async def noop(job: Job) -> None:
        seen[job.n] = 1

    return app


async def eventfn_burst(url: str, count: int, concurrency: int) -> tuple[Measure, int]:
    seen = bytearray(count)
    app = make_app(seen)
    async with from_url(url) as broker:
        await app.connect(broker)
        await app.declare()
        for start in range(0, count, 5000):
            stop = min(count, start + 5000)
            await app.publish_many(app.message("bench", Job(n)) for n in range(start, stop))
        runner = eventfn.Runner(app, broker, concurrency=concurrency, burst=True, poll=0.05)
        with Measure() as measure:
            summary = await runner.run()
        await app.close()
        await broker.drop()
    missing = count - sum(seen)
    if missing:
        raise SystemExit(f"eventfn left {missing} of {count} messages unhandled")
    return measure, summary.handled


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("-n", type=int, default=20_000, help="messages (default 20000)")
    parser.add_argument("--concurrency", type=int, default=64, help="runner concurrency")
    parser.add_argument("--batch", type=int, default=256, help="raw loop fetch size")
    parser.add_argument("--rounds", type=int, default=3, help="rounds; the best is shown")
    parser.add_argument("--url", default="nats://127.0.0.1:4222", help="the NATS server")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    print(f"{args.n:,} messages, runner concurrency {args.concurrency}, best of {args.rounds}")
    best: dict[str, Measure] = {}
    for _ in range(args.rounds):
        raw = asyncio.run(raw_loop(args.url, args.n, args.batch))
        namespace = f"bench{uuid.uuid4().hex[:8]}"
        url = f"{args.url}?namespace={namespace}"
        ours, _ = asyncio.run(eventfn_burst(url, args.n, args.concurrency))
        for label, measure in (("raw nats-py", raw), ("eventfn runner", ours)):
            if label not in best or measure.wall < best[label].wall:
                best[label] = measure
    for label, measure in best.items():
        print(measure.line(label, args.n))
    raw, ours = best["raw nats-py"], best["eventfn runner"]
    print(
        f"eventfn/raw: {raw.wall / ours.wall:.2f}x the rate, "
        f"{ours.cpu / raw.cpu:.2f}x the CPU per message"
    )


if __name__ == "__main__":
    main()
