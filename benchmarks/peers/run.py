"""Burst drain, side by side: eventfn and its peers on the same broker and the same workload.

    make bench-deps        # .venv-bench with eventfn, its plug-ins and the pinned peers
    .venv-bench/bin/python benchmarks/peers/run.py                  # N=20,000, noop, 1 run
    .venv-bench/bin/python benchmarks/peers/run.py --runs 3 --handler noop sleep --write
    .venv-bench/bin/python benchmarks/peers/run.py --tool eventfn dramatiq --broker redis

Every case (tool, broker, handler): a fresh key, N messages of about 200 bytes published by
one process, then ONE consumer process started against the backlog, then a clean-up process;
each step is ``run.py _child publish|consume|cleanup`` in a fresh interpreter. Measured inside
the consumer, from right before it starts consuming to the N-th unique id handled: wall time
(throughput = N / wall), process CPU time per message, peak RSS, and latency from publish to
handler start (p50/p90/p99/max and a CDF; in a pre-published burst it is mostly time spent in
the backlog). Handlers: ``noop``, or ``sleep`` (5 ms: ``asyncio.sleep`` in asyncio tools,
``time.sleep`` in a thread-pool worker for Dramatiq and Celery). A case fails the run unless
every id was handled and nothing is left unacked. Runs rotate the order of the tools (the
first meets a colder server); the median run is reported, min-max beside it; ``redelivered``
counts handler calls beyond the first per id (the worst run).

eventfn is ``benchmarks/burst.py``'s own ``run_case`` (a Runner in burst mode). Every other
tool is a module here, one of ``MODULES`` (a module whose peer is not installed stops the run:
``make bench-deps`` installs them all). A module
follows the interface in ``_common.py`` (TOOL, BROKERS, settings, publish, consume, leftover)
as module-level names, or, when it holds several variants of one tool, exposes
``TOOLS``: a list of objects with those same attributes and methods, each with its own TOOL
name (``_faststream.py``: ``faststream`` and ``faststream-batch``).

Servers: 127.0.0.1 only (``--redis``, ``--nats``). Everything a case created is deleted
afterwards. ``--write`` saves the cases to benchmarks/results/peers.json.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
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

from benchmarks._stats import machine, median_of, spread  # noqa: E402

MODULES = ["_raw", "_faststream", "_dramatiq", "_arq", "_saq", "_taskiq", "_celery"]
BROKERS = ("redis", "nats")
HANDLERS = ("noop", "sleep")
MEDIANS = ["cpu_us_per_message", "peak_rss_mb", "p50_ms", "p90_ms", "p99_ms", "max_ms"]


def discover() -> dict[str, tuple[str, Any]]:
    """Tool name -> (module name, tool object) for every module file that exists."""
    tools: dict[str, tuple[str, Any]] = {}
    for name in MODULES:
        try:
            module = importlib.import_module(f"benchmarks.peers.{name}")
        except ImportError as error:  # its peer is not installed in this interpreter
            raise SystemExit(
                f"benchmarks/peers/{name}.py cannot be imported ({error}): run the peers with "
                ".venv-bench/bin/python after `make bench-deps`"
            ) from None
        for tool in getattr(module, "TOOLS", [module]):
            tools[tool.TOOL] = (name, tool)
    return tools


def find(module_name: str, name: str) -> Any:
    module = importlib.import_module(f"benchmarks.peers.{module_name}")
    for tool in getattr(module, "TOOLS", [module]):
        if name == tool.TOOL:
            return tool
    raise SystemExit(f"no tool {name!r} in {module_name}")


# ----------------------------------------------------------------------- the child steps


def child(argv: list[str]) -> None:
    """``_child STEP MODULE TOOL BROKER URL KEY N [HANDLER CONCURRENCY]``, one fresh process."""
    from benchmarks.peers._common import Done

    step, module, name, broker, url, key, n = argv[:7]
    tool = find(module, name)
    if step == "publish":
        tool.publish(broker, url, key, int(n))
    elif step == "consume":
        handler, concurrency = argv[7], int(argv[8])
        done = Done(int(n))
        tool.consume(broker, url, key, int(n), handler, concurrency, done)
        if not done.event.is_set():
            raise SystemExit(f"{name}: consume returned after {done.unique} of {n}")
        print(json.dumps(done.result()), flush=True)
    elif step == "cleanup":
        print(json.dumps({"unacked": tool.leftover(broker, url, key)}), flush=True)
    else:
        raise SystemExit(f"unknown step {step!r}")


def last_json(out: str) -> dict[str, Any]:
    lines = [line for line in out.splitlines() if line.startswith("{")]
    if not lines:
        raise SystemExit(f"no result in {out!r}")
    result: dict[str, Any] = json.loads(lines[-1])
    return result


def run_peer(
    module: str, tool: str, broker: str, handler: str, args: argparse.Namespace
) -> dict[str, Any]:
    url = args.redis if broker == "redis" else args.nats
    key = "peers" + "".join(c for c in tool if c.isalnum())[:6] + uuid.uuid4().hex[:8]
    me = [sys.executable, str(Path(__file__).resolve()), "_child"]
    common = [module, tool, broker, url, key, str(args.n)]
    try:
        subprocess.run([*me, "publish", *common], check=True)
        consume = [*me, "consume", *common, handler, str(args.concurrency)]
        try:
            out = subprocess.run(consume, capture_output=True, text=True, timeout=args.timeout)
        except subprocess.TimeoutExpired:
            took = f"the consumer ran over {args.timeout:.0f} s"
            raise SystemExit(f"{tool}/{broker}/{handler}: {took}") from None
        if out.returncode:
            sys.stderr.write(out.stderr[-4000:])
            raise SystemExit(f"{tool}/{broker}/{handler}: the consumer exited {out.returncode}")
    finally:  # in a child too: this process stays small
        cleanup = [*me, "cleanup", *common]
        left = subprocess.run(cleanup, check=True, capture_output=True, text=True).stdout
    result = last_json(out.stdout)
    result["unacked"] = last_json(left)["unacked"]
    return result


def run_eventfn(broker: str, handler: str, args: argparse.Namespace) -> dict[str, Any]:
    """One run of ``benchmarks/burst.py``'s case (its own fresh publish and drain processes);
    it raises SystemExit itself when any event was not handled, and drains until nothing is
    left (a burst-mode Runner stops when the queue is empty and nothing is in flight)."""
    from benchmarks import burst

    result: dict[str, Any] = burst.run_case(broker, args.n, handler, args.concurrency)
    result["cpu_us_per_message"] = result.pop("cpu_us_per_event")
    result["handled"] = args.n - result.pop("missing")
    result["unacked"] = 0
    return result


def eventfn_settings(handler: str, concurrency: int) -> str:
    return f"Runner(burst=True, concurrency={concurrency}, poll=0.05)"


# -------------------------------------------------------------------------------- driver


def summarize(
    tool: str, broker: str, handler: str, runs: list[dict[str, Any]], settings: str, args: Any
) -> dict[str, Any]:
    ordered = sorted(runs, key=lambda r: r["throughput"])
    median_run = ordered[(len(ordered) - 1) // 2]
    case: dict[str, Any] = {
        "tool": tool,
        "broker": broker,
        "handler": handler,
        "n": args.n,
        "concurrency": args.concurrency,
        **spread(runs),
        **median_of(runs, MEDIANS),
        "cdf": median_run.get("cdf", []),
        "handled": min(r["handled"] for r in runs),
        "redelivered": max(r.get("calls", r["handled"]) - r["handled"] for r in runs),
        "runs": len(runs),
        "settings": settings,
    }
    return case


def main() -> None:
    tools = discover()
    names = ["eventfn", *tools]
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--n", type=int, default=20_000)
    parser.add_argument("--runs", type=int, default=1, help="runs per case (median reported)")
    parser.add_argument("--handler", choices=HANDLERS, nargs="+", default=["noop"])
    parser.add_argument("--broker", choices=BROKERS, nargs="+", default=list(BROKERS))
    parser.add_argument("--tool", choices=names, nargs="+", default=names)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--nats", default="nats://127.0.0.1:4222")
    parser.add_argument(
        "--timeout", type=float, default=900, help="seconds a consumer may take before it is killed"
    )
    parser.add_argument("--write", action="store_true", help="write results/peers.json")
    args = parser.parse_args()

    def supports(tool: str, broker: str) -> bool:
        return tool == "eventfn" or broker in tools[tool][1].BROKERS

    runs: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    for run in range(args.runs):
        shift = run % len(args.tool)
        order = args.tool[shift:] + args.tool[:shift]  # rotate who goes first
        for broker in args.broker:
            for handler in args.handler:
                for tool in (t for t in order if supports(t, broker)):
                    if tool == "eventfn":
                        result = run_eventfn(broker, handler, args)
                    else:
                        result = run_peer(tools[tool][0], tool, broker, handler, args)
                    if result["handled"] != args.n or result["unacked"]:
                        raise SystemExit(
                            f"{tool}/{broker}/{handler}: handled {result['handled']} of "
                            f"{args.n}, {result['unacked']} left unacked"
                        )
                    print(
                        f"  run {run + 1}: {broker:<5} {handler:<5} {tool:<16} "
                        f"{result['throughput']:>9,.0f} msg/s",
                        file=sys.stderr,
                        flush=True,
                    )
                    runs.setdefault((tool, broker, handler), []).append(result)
    cases = []
    for broker in args.broker:
        for handler in args.handler:
            for tool in (t for t in args.tool if supports(t, broker)):
                settings = (eventfn_settings if tool == "eventfn" else tools[tool][1].settings)(
                    handler, args.concurrency
                )
                key = (tool, broker, handler)
                cases.append(summarize(tool, broker, handler, runs[key], settings, args))
    table(cases)
    if args.write:
        write(cases)


def write(cases: list[dict[str, Any]]) -> None:
    """Save to results/peers.json, keeping earlier cases this run did not measure."""
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / "peers.json"
    measured = {(c["tool"], c["broker"], c["handler"]) for c in cases}
    if path.exists():
        earlier = json.loads(path.read_text())
        for c in earlier["cases"] if isinstance(earlier, dict) else []:
            if (c["tool"], c["broker"], c["handler"]) not in measured:
                cases.append(c)
    tools = ["eventfn", *discover()]

    def order(c: dict[str, Any]) -> tuple[bool, bool, int]:
        return c["handler"] != "noop", c["broker"] != "redis", tools.index(c["tool"])

    cases.sort(key=order)
    document = {"benchmark": "peers", "machine": machine(), "when": time.strftime("%Y-%m-%d")}
    path.write_text(json.dumps({**document, "cases": cases}, indent=2) + "\n")
    print(f"wrote {path}")


def table(cases: list[dict[str, Any]]) -> None:
    print(
        f"{'broker':<6} {'handler':<7} {'tool':<16} {'N':>7} {'msg/s':>9} {'(min-max)':>17} "
        f"{'µs CPU/msg':>10} {'p50 ms':>8} {'p99 ms':>8} {'RSS MB':>7}  settings"
    )
    for c in cases:
        between = f"{c['throughput_min']:,.0f}-{c['throughput_max']:,.0f}"
        print(
            f"{c['broker']:<6} {c['handler']:<7} {c['tool']:<16} {c['n']:>7,} "
            f"{c['throughput']:>9,.0f} {between:>17} {c['cpu_us_per_message']:>10.1f} "
            f"{c.get('p50_ms', float('nan')):>8.1f} {c.get('p99_ms', float('nan')):>8.1f} "
            f"{c['peak_rss_mb']:>7.1f}  {c['settings']}"
        )


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "_child":
        child(sys.argv[2:])
    else:
        main()
