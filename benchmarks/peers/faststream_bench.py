"""Burst drain, side by side: eventfn vs FastStream vs raw client loops, Redis Streams and NATS.

    make bench-deps        # .venv-bench with eventfn, its plug-ins and the pinned peers
    .venv-bench/bin/python benchmarks/peers/faststream_bench.py                 # N=20,000
    .venv-bench/bin/python benchmarks/peers/faststream_bench.py --runs 3 --write

Every case: a fresh key/stream, N no-op messages published by one process, then ONE consumer
process started against the backlog. Measured inside the consumer, from the start of consuming
to the last message handled: wall time (throughput = N / wall), process CPU time
(``time.process_time``, µs per message), peak RSS (``ru_maxrss``). Each consumer records the id
carried in every message; a case with fewer than N unique ids handled fails the run.

- eventfn: ``benchmarks/burst.py``'s own ``run_case`` (``--handler noop``): a Runner in burst
  mode, concurrency 64.
- FastStream (``--fs-batch`` records per read, default 256):
  Redis ``@broker.subscriber(stream=StreamSub(s, group, consumer, max_records, polling_interval),
  max_workers=64)``; NATS ``@broker.subscriber(subject, stream=JStream(...), durable,
  pull_sub=PullSub(batch_size), max_workers=64)``; ``logger=None``; the handler takes a pydantic
  model. Default ack policy (ack after the handler returns).
- raw: redis-py ``XREADGROUP COUNT 256`` + ``XACK`` of the ids read (as benchmarks/redis_loop.py);
  nats-py pull consumer ``fetch(256)`` + ``ack()`` each message (as benchmarks/nats_loop.py).

Servers: 127.0.0.1 only (``--redis``, ``--nats``). Everything created is deleted afterwards.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import resource
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
BENCH = HERE.parent
ROOT = BENCH.parent
RESULTS = BENCH / "results"
sys.path.insert(0, str(ROOT))

import msgspec  # noqa: E402

BROKERS = ("redis", "nats")
TOOLS = ("eventfn", "faststream", "faststream-batch", "raw")
FS_TIMEOUT = 0.05  # PullSub timeout: what a partial (last) batch waits; eventfn polls at 0.05 s
PAD = {"sku": "ABC-123", "quantity": 3, "note": "x" * 120}  # bodies of about 200 bytes


# ---------------------------------------------------------------- helpers (consumer side)


class Done:
    """Unique ids handled, and the moment the N-th unique one was."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.seen = bytearray(n)
        self.unique = 0
        self.at = 0.0
        self.cpu = 0.0
        self.event = asyncio.Event()

    def mark(self, number: int) -> None:
        if not self.seen[number]:
            self.seen[number] = 1
            self.unique += 1
            if self.unique == self.n:
                self.at, self.cpu = time.perf_counter(), time.process_time()
                self.event.set()


def outcome(done: Done, wall0: float, cpu0: float) -> dict[str, Any]:
    wall, cpu = done.at - wall0, done.cpu - cpu0
    return {
        "handled": done.unique,
        "seconds": wall,
        "throughput": done.n / wall,
        "cpu_us_per_message": cpu / done.n * 1e6,
        "peak_rss_mb": peak_rss_mb(),
    }


def peak_rss_mb() -> float:
    """This process's own peak RSS. ``ru_maxrss`` is not: Linux carries the parent's peak over
    fork + exec, so a child of a big parent reports at least the parent's size."""
    status = Path("/proc/self/status")
    if status.exists():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


async def wait_all(done: Done, limit: float) -> None:
    try:
        await asyncio.wait_for(done.event.wait(), limit)
    except TimeoutError:
        raise SystemExit(f"only {done.unique} of {done.n} handled after {limit:.0f} s") from None


# ------------------------------------------------------------------------------ raw loops


async def raw_redis_publish(url: str, key: str, n: int) -> None:
    from redis.asyncio import Redis

    async with Redis.from_url(url) as client:
        await client.xgroup_create(key, "g", "0", mkstream=True)
        for start in range(0, n, 1000):
            pipe = client.pipeline(transaction=False)
            for number in range(start, min(n, start + 1000)):
                body = msgspec.json.encode({"n": number, **PAD})
                pipe.xadd(key, {"i": str(number), "b": body})
            await pipe.execute()


async def raw_redis_consume(url: str, key: str, n: int, batch: int) -> dict[str, Any]:
    from redis.asyncio import Redis

    done = Done(n)
    async with Redis.from_url(url) as client:
        await client.ping()
        wall0, cpu0 = time.perf_counter(), time.process_time()
        while not done.event.is_set():
            reply = await client.xreadgroup("g", "c", {key: ">"}, count=batch, block=1000)
            if not reply:
                raise SystemExit(f"raw redis: nothing more after {done.unique} of {n}")
            entries = reply[0][1]
            for _, fields in entries:
                done.mark(int(fields[b"i"]))
            await client.xack(key, "g", *(entry_id for entry_id, _ in entries))
        done.at, done.cpu = time.perf_counter(), time.process_time()  # after the last XACK
    return outcome(done, wall0, cpu0)


async def raw_nats_publish(url: str, key: str, n: int) -> None:
    import nats
    from nats.js.api import AckPolicy, ConsumerConfig, RetentionPolicy

    nc = await nats.connect(url)
    js = nc.jetstream()
    await js.add_stream(name=key, subjects=[f"{key}.>"], retention=RetentionPolicy.WORK_QUEUE)
    await js.add_consumer(
        key, ConsumerConfig(durable_name="raw", ack_policy=AckPolicy.EXPLICIT, ack_wait=30)
    )
    await _js_publish(js, f"{key}.m", n, None)
    await nc.close()


async def _js_publish(js: Any, subject: str, n: int, headers: dict[str, str] | None) -> None:
    for start in range(0, n, 1000):
        bodies = (msgspec.json.encode({"n": i, **PAD}) for i in range(start, min(n, start + 1000)))
        await asyncio.gather(*(js.publish(subject, body, headers=headers) for body in bodies))


async def raw_nats_consume(url: str, key: str, n: int, batch: int) -> dict[str, Any]:
    import nats

    done = Done(n)
    decoder = msgspec.json.Decoder(dict[str, Any])
    nc = await nats.connect(url)
    js = nc.jetstream()
    psub = await js.pull_subscribe_bind("raw", key)
    wall0, cpu0 = time.perf_counter(), time.process_time()
    while not done.event.is_set():
        for msg in await psub.fetch(batch, timeout=5):
            done.mark(decoder.decode(msg.data)["n"])
            await msg.ack()
    await nc.flush()
    done.at, done.cpu = time.perf_counter(), time.process_time()  # after the acks are flushed
    await nc.close()
    return outcome(done, wall0, cpu0)


# ----------------------------------------------------------------------------- FastStream


async def fs_redis_publish(url: str, key: str, n: int) -> None:
    from faststream.redis import RedisBroker
    from redis.asyncio import Redis

    async with Redis.from_url(url) as client:  # the group from 0: FastStream would create at $
        await client.xgroup_create(key, "g", "0", mkstream=True)
    async with RedisBroker(url, logger=None) as broker:
        for start in range(0, n, 50):  # within redis-py's connection pool
            stop = min(n, start + 50)
            await asyncio.gather(
                *(broker.publish({"n": i, **PAD}, stream=key) for i in range(start, stop))
            )


async def fs_redis_consume(
    url: str, key: str, n: int, batch: int, workers: int, batched: bool
) -> dict[str, Any]:
    from faststream.redis import RedisBroker, StreamSub
    from pydantic import BaseModel

    class Job(BaseModel):
        n: int

    done = Done(n)
    broker = RedisBroker(url, logger=None)
    sub = StreamSub(
        key, group="g", consumer="c", max_records=batch, polling_interval=10, batch=batched
    )
    if batched:

        @broker.subscriber(stream=sub)
        async def handle_batch(jobs: list[Job]) -> None:
            for job in jobs:
                done.mark(job.n)

    else:

        @broker.subscriber(stream=sub, max_workers=workers)
        async def handle(job: Job) -> None:
            done.mark(job.n)

    await broker.connect()
    wall0, cpu0 = time.perf_counter(), time.process_time()
    await broker.start()
    await wait_all(done, 300)
    result = outcome(done, wall0, cpu0)
    await broker.stop()
    return result


async def fs_nats_publish(url: str, key: str, n: int) -> None:
    import nats
    from nats.js.api import RetentionPolicy

    nc = await nats.connect(url)
    js = nc.jetstream()
    await js.add_stream(name=key, subjects=[f"{key}.>"], retention=RetentionPolicy.WORK_QUEUE)
    # the bytes and header FastStream's own publisher sends for a dict
    await _js_publish(js, f"{key}.m", n, {"content-type": "application/json"})
    await nc.close()


async def fs_nats_consume(
    url: str, key: str, n: int, batch: int, workers: int, batched: bool
) -> dict[str, Any]:
    from faststream.nats import JStream, NatsBroker, PullSub
    from pydantic import BaseModel

    class Job(BaseModel):
        n: int

    done = Done(n)
    broker = NatsBroker(url, logger=None)
    stream = JStream(key, subjects=[f"{key}.>"], declare=False)
    if batched:

        @broker.subscriber(
            f"{key}.m",
            stream=stream,
            durable="fs",
            pull_sub=PullSub(batch_size=batch, timeout=FS_TIMEOUT, batch=True),
        )
        async def handle_batch(jobs: list[Job]) -> None:
            for job in jobs:
                done.mark(job.n)

    else:

        @broker.subscriber(
            f"{key}.m",
            stream=stream,
            durable="fs",
            pull_sub=PullSub(batch_size=batch, timeout=FS_TIMEOUT),
            max_workers=workers,
        )
        async def handle(job: Job) -> None:
            done.mark(job.n)

    await broker.connect()
    wall0, cpu0 = time.perf_counter(), time.process_time()
    await broker.start()
    await wait_all(done, 300)
    result = outcome(done, wall0, cpu0)
    await broker.stop()
    return result


# -------------------------------------------------------------------- checks and clean-up


async def leftover(broker: str, url: str, key: str) -> int:
    """Messages delivered but never acknowledged (0 unless a tool skipped its acks)."""
    if broker == "redis":
        from redis.asyncio import Redis

        async with Redis.from_url(url) as client:
            pending: int = (await client.xpending(key, "g"))["pending"]
            await client.delete(key)
        return pending
    import nats

    nc = await nats.connect(url)
    js = nc.jetstream()
    try:
        info = await js.stream_info(key)
        left = info.state.messages  # a work-queue stream drops what was acked
    finally:
        await js.delete_stream(key)
        await nc.close()
    return int(left)


# -------------------------------------------------------------------------- orchestration


def child(argv: list[str]) -> None:
    step, broker, tool, url, key, n = argv[0], argv[1], argv[2], argv[3], argv[4], int(argv[5])
    if step == "cleanup":
        print(json.dumps({"unacked": asyncio.run(leftover(broker, url, key))}))
        return
    if step == "publish":
        publishers = {
            ("redis", "raw"): raw_redis_publish,
            ("nats", "raw"): raw_nats_publish,
            ("redis", "faststream"): fs_redis_publish,
            ("nats", "faststream"): fs_nats_publish,
        }
        asyncio.run(publishers[broker, tool.removesuffix("-batch")](url, key, n))
        return
    batch, workers = int(argv[6]), int(argv[7])
    if tool == "raw":
        raw = raw_redis_consume if broker == "redis" else raw_nats_consume
        result = asyncio.run(raw(url, key, n, batch))
    else:
        fast = fs_redis_consume if broker == "redis" else fs_nats_consume
        result = asyncio.run(fast(url, key, n, batch, workers, tool == "faststream-batch"))
    print(json.dumps(result))


def run_peer(broker: str, tool: str, args: argparse.Namespace) -> dict[str, Any]:
    url = args.redis if broker == "redis" else args.nats
    key = f"peers{tool[:2]}{uuid.uuid4().hex[:8]}"
    batch = args.raw_batch if tool == "raw" else args.fs_batch
    me = [sys.executable, str(Path(__file__).resolve()), "_child"]
    common = [broker, tool, url, key, str(args.n)]
    try:
        subprocess.run([*me, "publish", *common], check=True)
        out = subprocess.run(
            [*me, "consume", *common, str(batch), str(args.concurrency)],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
    finally:  # in a child too: this process stays small (see peak_rss_mb)
        cleanup = [*me, "cleanup", *common]
        left = subprocess.run(cleanup, check=True, capture_output=True, text=True).stdout
    result: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    result["unacked"] = json.loads(left.strip().splitlines()[-1])["unacked"]
    return result


BURST_LINE = re.compile(
    r"N=\s*(?P<n>[\d,]+)\s+(?P<rate>[\d,]+) events/s.*?(?P<cpu>[\d.]+) µs CPU/event"
    r".*?peak RSS\s+(?P<rss>[\d.]+) MB"
)


def run_eventfn(broker: str, args: argparse.Namespace) -> dict[str, Any]:
    """eventfn's own burst benchmark, one run of the no-op case, parsed from its printed line.

    burst.py exits non-zero when any event was not handled, so success means all N were."""
    command = [sys.executable, str(BENCH / "burst.py"), "--broker", broker, "--n", str(args.n)]
    command += ["--runs", "1", "--handler", "noop", "--concurrency", str(args.concurrency)]
    out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    match = BURST_LINE.search(out)
    if match is None or int(match["n"].replace(",", "")) != args.n:
        raise SystemExit(f"unexpected output from burst.py: {out!r}")
    rate = float(match["rate"].replace(",", ""))
    return {
        "handled": args.n,
        "seconds": args.n / rate,
        "throughput": rate,
        "cpu_us_per_message": float(match["cpu"]),
        "peak_rss_mb": float(match["rss"]),
        "unacked": 0,
    }


def settings(tool: str, args: argparse.Namespace) -> str:
    if tool == "eventfn":
        return f"Runner(burst=True, concurrency={args.concurrency}, poll=0.05)"
    if tool == "faststream":
        return f"max_workers={args.concurrency}, {args.fs_batch} per read, logger=None"
    if tool == "faststream-batch":
        return f"batch=True (list handler, max_workers n/a), {args.fs_batch} per read"
    return f"{args.raw_batch} per read, sequential"


def summarize(tool: str, broker: str, runs: list[dict[str, Any]], args: argparse.Namespace) -> dict:
    case: dict[str, Any] = {"tool": tool, "broker": broker, "n": args.n}
    for key in ("throughput", "cpu_us_per_message", "peak_rss_mb"):
        case[key] = statistics.median(r[key] for r in runs)
    case["throughput_min"] = min(r["throughput"] for r in runs)
    case["throughput_max"] = max(r["throughput"] for r in runs)
    case["handled"] = min(r["handled"] for r in runs)
    case["runs"] = len(runs)
    case["settings"] = settings(tool, args)
    return case


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--n", type=int, default=20_000)
    parser.add_argument("--runs", type=int, default=1, help="runs per case (median reported)")
    parser.add_argument("--broker", choices=BROKERS, nargs="+", default=list(BROKERS))
    parser.add_argument("--tool", choices=TOOLS, nargs="+", default=list(TOOLS))
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--fs-batch", type=int, default=256, help="FastStream records per read")
    parser.add_argument("--raw-batch", type=int, default=256, help="raw loop records per read")
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--nats", default="nats://127.0.0.1:4222")
    parser.add_argument("--write", action="store_true", help="write results/peers.json")
    args = parser.parse_args()
    runs: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for run in range(args.runs):
        order = args.tool[run % len(args.tool) :] + args.tool[: run % len(args.tool)]
        for broker in args.broker:
            for tool in order:  # rotate who goes first: the first meets a colder server
                if tool == "eventfn":
                    result = run_eventfn(broker, args)
                else:
                    result = run_peer(broker, tool, args)
                if result["handled"] != args.n or result["unacked"]:
                    raise SystemExit(f"{tool}/{broker}: {result}")
                runs.setdefault((tool, broker), []).append(result)
    cases = [summarize(t, b, runs[t, b], args) for b in args.broker for t in args.tool]
    table(cases)
    if args.write:
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / "peers.json").write_text(json.dumps(cases, indent=2) + "\n")
        print(f"wrote {RESULTS / 'peers.json'}")


def table(cases: list[dict[str, Any]]) -> None:
    print(
        f"{'broker':<6} {'tool':<16} {'N':>7} {'msg/s':>9} {'(min-max)':>17} "
        f"{'µs CPU/msg':>10} {'RSS MB':>7} {'handled':>8}  settings"
    )
    for c in cases:
        spread = f"{c['throughput_min']:,.0f}-{c['throughput_max']:,.0f}"
        print(
            f"{c['broker']:<6} {c['tool']:<16} {c['n']:>7,} {c['throughput']:>9,.0f} "
            f"{spread:>17} {c['cpu_us_per_message']:>10.1f} {c['peak_rss_mb']:>7.1f} "
            f"{c['handled']:>8,}  {c['settings']}"
        )


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "_child":
        child(sys.argv[2:])
    else:
        main()
