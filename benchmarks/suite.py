"""The whole benchmark suite in one command: every workload, every broker, the peers, the plots.

    make bench          # quick: a few minutes, the headline cases (python benchmarks/suite.py)
    make bench-full     # everything, under 60 minutes (python benchmarks/suite.py --full)
    python benchmarks/suite.py --full --only peers workloads    # some steps of a profile

Each step is one of the benchmark scripts beside this file, run as its own process with the
interpreter it needs: eventfn's own benchmarks with this one (the project's ``.venv``), the peer
tools with ``.venv-bench`` (``make bench-deps``), which also has matplotlib for the plots. Every
step writes its ``benchmarks/results/*.json`` (merging with what earlier runs measured), then
``plots.py`` draws ``benchmarks/plots/*.png`` and ``report.py`` regenerates ``RESULTS.md``.
``results/suite.json`` records which steps ran, with which commands, and how long each took.

A step that fails stops the suite (a benchmark that lost an event exits non-zero).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "results"
BENCH_PYTHON = ROOT / ".venv-bench" / "bin" / "python"
NETWORKED = ["redis", "nats", "amqp", "postgresql"]
EVERY = ["sqlite", *NETWORKED]


@dataclass(frozen=True)
class Step:
    name: str
    group: str  # what --only selects
    line: str  # the script under benchmarks/ and its arguments
    peers: bool = False  # runs with .venv-bench's interpreter
    stdout_to: str | None = None  # results file that gets the step's last stdout line (JSON)

    def command(self) -> list[str]:
        python = str(BENCH_PYTHON) if self.peers else sys.executable
        script, *args = self.line.split()
        return [python, str(HERE / script), *args]


def quick() -> list[Step]:
    return [
        Step("burst, SQLite, no-op", "burst", _burst("sqlite", "noop", "10000 100000", 3)),
        Step("burst, SQLite, sleep 5 ms", "burst", _burst("sqlite", "sleep", "20000", 3)),
        Step(
            "bare SQLite loop",
            "loops",
            "sqlite_loop.py --json -n 100000 --rounds 3",
            stdout_to="loops.json",
        ),
        Step(
            "peers, Redis and NATS, no-op",
            "peers",
            "peers/run.py --n 20000 --runs 1 --handler noop --write",
            peers=True,
        ),
        Step(
            "steady 1,000/s, SQLite and Redis",
            "workloads",
            "workloads.py steady --broker sqlite redis --rate 1000 --seconds 10 --runs 1 --write",
        ),
        Step(
            "fan-out, SQLite",
            "workloads",
            "workloads.py fanout --broker sqlite --n 10000 --runs 1 --write",
        ),
    ]


def full() -> list[Step]:
    every, networked = " ".join(EVERY), " ".join(NETWORKED)
    return [
        Step("burst, every broker, no-op", "burst", _burst(every, "noop", "10000 100000", 3)),
        Step("burst, every broker, N = 1M", "burst", _burst(every, "noop", "1000000", 1)),
        Step("burst, every broker, sleep 5 ms", "burst", _burst(every, "sleep", "20000", 3)),
        Step(
            "bare SQLite loop",
            "loops",
            "sqlite_loop.py --json -n 100000 --rounds 5",
            stdout_to="loops.json",
        ),
        Step(
            "peers, Redis and NATS, no-op and sleep 5 ms",
            "peers",
            "peers/run.py --n 20000 --runs 3 --handler noop sleep --write",
            peers=True,
        ),
        *(
            Step(
                f"{workload}, every broker",
                "workloads",
                f"workloads.py {workload} --broker {every} --n 20000 --runs 3 --write",
            )
            for workload in ("fanout", "ordered", "dbwrite")
        ),
        Step(
            "steady 1,000/s and 5,000/s for 30 s",
            "workloads",
            f"workloads.py steady --broker {every} --rate 1000 5000 --seconds 30 --runs 1 --write",
        ),
        Step(
            "middleware overhead (#3)",
            "middleware",
            "middleware_overhead.py --n 100000 --runs 3 --parts --write",
        ),
        Step(
            "scale-out, 1-3 runners",
            "scaleout",
            f"scaleout.py --broker {networked} --n 8000 --runs 3 --write",
        ),
    ]


def _burst(brokers: str, handler: str, sizes: str, runs: int) -> str:
    return f"burst.py --broker {brokers} --handler {handler} --n {sizes} --runs {runs} --write"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--full", action="store_true", help="everything (under 60 minutes)")
    parser.add_argument(
        "--only",
        nargs="+",
        choices=["burst", "loops", "peers", "workloads", "middleware", "scaleout"],
        help="run only these groups of the profile",
    )
    parser.add_argument("--list", action="store_true", help="print the steps and exit")
    args = parser.parse_args()
    steps = full() if args.full else quick()
    if args.only:
        steps = [step for step in steps if step.group in args.only]
    if args.list:
        for step in steps:
            print(f"{step.name}: {' '.join(step.command())}")
        return
    if any(step.peers for step in steps) and not BENCH_PYTHON.exists():
        raise SystemExit(f"{BENCH_PYTHON} is missing: run `make bench-deps` first")
    RESULTS.mkdir(exist_ok=True)
    ran = []
    started = time.monotonic()
    for number, step in enumerate(steps, 1):
        print(f"\n== [{number}/{len(steps)}] {step.name}", flush=True)
        began = time.monotonic()
        if step.stdout_to:
            out = subprocess.run(step.command(), check=True, capture_output=True, text=True)
            line = out.stdout.strip().splitlines()[-1]
            document = {"when": time.strftime("%Y-%m-%d"), **json.loads(line)}
            (RESULTS / step.stdout_to).write_text(json.dumps(document, indent=2) + "\n")
            print(line)
        else:
            subprocess.run(step.command(), check=True, cwd=ROOT)
        took = time.monotonic() - began
        ran.append({"step": step.name, "command": _shown(step), "seconds": round(took, 1)})
        print(f"   ({took:.0f} s)", flush=True)
    total = time.monotonic() - started
    suite = {
        "profile": "full" if args.full else "quick",
        "when": time.strftime("%Y-%m-%d %H:%M"),
        "seconds": round(total, 1),
        "steps": ran,
    }
    (RESULTS / "suite.json").write_text(json.dumps(suite, indent=2) + "\n")
    if BENCH_PYTHON.exists():
        subprocess.run([str(BENCH_PYTHON), str(HERE / "plots.py")], check=True, cwd=ROOT)
    subprocess.run([sys.executable, str(HERE / "report.py")], check=True, cwd=ROOT)
    print(f"\nsuite ({suite['profile']}) took {total / 60:.1f} min; see benchmarks/RESULTS.md")


def _shown(step: Step) -> str:
    python = ".venv-bench/bin/python" if step.peers else "python"
    return f"{python} benchmarks/{step.line}"


if __name__ == "__main__":
    main()
