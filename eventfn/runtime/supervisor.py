"""``eventfn run --workers N`` and ``--reload``: a supervisor of runner processes.

The supervisor starts each worker as ``python -m eventfn run ...`` with the same arguments but
its own (``--workers``, ``--reload``, ``--health``) and ``EVENTFN_WORKER=<index>`` in its
environment. It forwards SIGTERM, SIGINT and SIGHUP as SIGTERM (each worker finishes its
in-flight work within ``--grace``; a second signal stops them at once), restarts a worker that
dies with a growing delay, and with ``--reload`` restarts them all when a ``*.py`` file changes.
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import os
import signal
import subprocess
import sys
from collections.abc import Sequence
from contextlib import AsyncExitStack, suppress
from pathlib import Path

import anyio
import msgspec
from anyio.abc import Process, TaskGroup, TaskStatus
from watchfiles import Change, awatch

from eventfn.runtime.health import HealthServer, parse_address
from eventfn.runtime.logs import FORMATS, WORKER_ENV

log = logging.getLogger("eventfn.supervisor")

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
CONFIGURATION_ERROR = 2
"""The CLI's exit status for a usage or configuration error: restarting will not mend it."""

# options only the supervisor acts on, and whether each takes a value
SUPERVISOR_OPTIONS = {"--workers": True, "--reload": False, "--health": True}
IGNORED_PARTS = frozenset({"__pycache__", "node_modules", "site-packages"})


class Backoff(msgspec.Struct, frozen=True):
    """Delays between restarts of a worker that keeps dying.

    The n-th failure in a row waits ``first * 2**(n-1)``, at most ``cap`` seconds; a worker that
    stayed up ``stable`` seconds starts again from ``first``. After ``give_up`` failures in a
    row the supervisor stops everything and exits non-zero (not with ``--reload``).
    """

    first: float = 0.5
    cap: float = 30.0
    stable: float = 60.0
    give_up: int = 10

    def delay(self, failures: int) -> float:
        return float(min(self.cap, self.first * 2 ** max(0, failures - 1)))


BACKOFF = Backoff()


class _Worker:
    """One slot of the pool and the process that fills it now, if any."""

    def __init__(self, index: int) -> None:
        self.index = index
        self.process: Process | None = None
        self.pid = 0
        self.started = 0.0
        self.spawns = 0
        self.failures = 0
        self.reloading = False
        self.done = False
        self.wake = anyio.Event()

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.returncode is None

    def send(self, signum: signal.Signals) -> None:
        if self.process is not None and self.process.returncode is None:
            with suppress(ProcessLookupError):  # it exited and is not reaped yet
                self.process.send_signal(signum)


class Supervisor:
    """Keeps ``workers`` processes running ``command``; :meth:`run` returns the exit status.

    >>> supervisor = Supervisor([sys.executable, "-m", "eventfn", "run", "shop:app"], workers=4)
    >>> status = await supervisor.run()
    """

    def __init__(
        self,
        command: Sequence[str],
        *,
        workers: int = 1,
        burst: bool = False,
        grace: float = 30.0,
        watch: Sequence[Path] = (),
        health: tuple[str, int] | None = None,
        backoff: Backoff = BACKOFF,
    ) -> None:
        if workers < 1:
            raise ValueError("workers must be at least 1")
        self.command = list(command)
        self.burst = burst
        self.watch = list(watch)
        self.backoff = backoff
        # the worker has `grace` for its handlers, then up to max(5, grace) to give back the rest
        self.kill_after = grace + max(5.0, grace) + 10.0
        self.health = HealthServer(health, self.readiness) if health else None
        self._workers = [_Worker(i) for i in range(workers)]
        self._stopping = False
        self._stopped = anyio.Event()
        self._status = 0
        self._tg: TaskGroup | None = None

    # -- control ------------------------------------------------------------------------------

    async def run(self) -> int:
        """Run the workers until stopped (or, with ``burst``, until each exited 0)."""
        async with AsyncExitStack() as stack:
            if self.health is not None:  # bound first: a taken port is an error, not a restart
                await stack.enter_async_context(self.health)
            tg = self._tg = await stack.enter_async_context(anyio.create_task_group())
            await tg.start(self._watch_signals)
            if self.health is not None:
                tg.start_soon(self.health.serve)
            if self.watch:
                await tg.start(self._watch_changes)
            async with anyio.create_task_group() as keepers:
                for worker in self._workers:
                    keepers.start_soon(self._keep, worker)
            self._stopped.set()  # lets the file watcher's thread return at once
            tg.cancel_scope.cancel()
        return self._status

    def stop(self) -> None:
        """Stop gracefully: SIGTERM to every worker, no more restarts. Again: SIGTERM again."""
        first = not self._stopping
        self._stopping = True
        self._stopped.set()
        for worker in self._workers:
            worker.wake.set()
            worker.send(signal.SIGTERM)
        if first and self._tg is not None:
            self._tg.start_soon(self._kill_stragglers)

    def reload(self) -> None:
        """Restart every worker gracefully: SIGTERM, wait for its exit, start it again."""
        for worker in self._workers:
            if worker.done or worker.reloading:
                continue
            worker.reloading = True
            worker.send(signal.SIGTERM)
            worker.wake.set()  # one waiting out a restart delay starts now

    def readiness(self) -> str | None:
        """``None`` when every worker runs, else why not (for ``/readyz``)."""
        if self._stopping:
            return "stopping"
        up = sum(1 for w in self._workers if w.alive and not w.reloading)
        return None if up == len(self._workers) else f"{up}/{len(self._workers)} workers up"

    # -- one worker -----------------------------------------------------------------------------

    async def _keep(self, worker: _Worker) -> None:
        """Run a worker's process, again and again, until it is done or we stop."""
        while not self._stopping:
            worker.reloading = False
            code = await self._run_once(worker)
            delay = self._after_exit(worker, code)
            if delay is None:
                return
            worker.wake = anyio.Event()
            with anyio.move_on_after(delay):
                await worker.wake.wait()

    async def _run_once(self, worker: _Worker) -> int:
        env = {
            **os.environ,
            WORKER_ENV: str(worker.index),
            "EVENTFN_WORKERS": str(len(self._workers)),
        }
        # In a session of its own, a terminal's Ctrl-C reaches only the supervisor, which
        # forwards it once; the worker would otherwise get it twice and take the second as
        # "stop now". If the supervisor is cancelled, closing the process kills the worker.
        async with await anyio.open_process(
            self.command,
            stdin=subprocess.DEVNULL,
            stdout=None,
            stderr=None,
            env=env,
            start_new_session=True,
        ) as process:
            worker.process, worker.pid = process, process.pid
            worker.started = anyio.current_time()
            worker.spawns += 1
            log.info("worker %d started: pid %d", worker.index, process.pid)
            if self._stopping or worker.reloading:  # asked while it was being started
                worker.send(signal.SIGTERM)
            code = await process.wait()
        worker.process = None
        return code

    def _after_exit(self, worker: _Worker, code: int) -> float | None:
        """Seconds until the worker starts again, or ``None`` if it should not."""
        label = f"worker {worker.index} (pid {worker.pid})"
        uptime = anyio.current_time() - worker.started
        if self._stopping:
            if code != 0 and -code not in STOP_SIGNALS:
                log.warning("%s stopped with %s", label, describe_exit(code))
                self._status = self._status or 1
            return None
        if worker.reloading:
            log.info("%s stopped for the reload", label)
            worker.failures = 0
            return 0.0
        if code == 0 and self.burst:
            log.info("%s finished its burst", label)
            worker.done = True
            return None
        worker.failures = 1 if uptime >= self.backoff.stable else worker.failures + 1
        if self._gives_up(worker, code):
            log.error("%s died: %s; giving up", label, describe_exit(code))
            self._status = code if code > 0 else 1
            self.stop()
            return None
        delay = self.backoff.delay(worker.failures)
        verb, why = "died" if code else "exited", describe_exit(code)
        log.warning("%s %s: %s after %.1fs; restarting in %.1fs", label, verb, why, uptime, delay)
        return delay

    def _gives_up(self, worker: _Worker, code: int) -> bool:
        if self.watch:  # under --reload the next saved file may fix it
            return False
        if code == CONFIGURATION_ERROR and worker.spawns == 1:
            return True
        return worker.failures >= self.backoff.give_up

    # -- background duties ---------------------------------------------------------------------

    async def _watch_signals(self, *, task_status: TaskStatus[None]) -> None:
        with anyio.open_signal_receiver(*STOP_SIGNALS) as signals:
            task_status.started()  # from now on a signal cannot kill us before the workers
            async for signum in signals:
                name = signal.Signals(signum).name
                if self._stopping:
                    log.warning("second %s: telling the workers to stop now", name)
                else:
                    log.info("%s: stopping %d workers gracefully", name, len(self._workers))
                self.stop()

    async def _kill_stragglers(self) -> None:
        await anyio.sleep(self.kill_after)
        for worker in self._workers:
            if worker.alive:
                log.warning(
                    "worker %d (pid %d) still runs %.0fs after the stop: killing it",
                    worker.index,
                    worker.pid,
                    self.kill_after,
                )
                worker.send(signal.SIGKILL)

    async def _watch_changes(self, *, task_status: TaskStatus[None]) -> None:
        changes = awatch(
            *self.watch, watch_filter=SourceFilter(self.watch), stop_event=self._stopped
        )
        log.info("reload: watching *.py under %s", ", ".join(map(str, self.watch)))
        # started() before the first __anext__, which makes the watcher before it ever awaits:
        # the caller resumes only once changes are being recorded
        task_status.started()
        async for batch in changes:
            paths = sorted({_shown(path) for _, path in batch})
            more = f" (and {len(paths) - 1} more)" if len(paths) > 1 else ""
            log.warning("reloading: %s changed%s", paths[0], more)
            self.reload()


def describe_exit(code: int) -> str:
    """``exit code 3`` or ``killed by SIGKILL``, from a return code."""
    if code >= 0:
        return f"exit code {code}"
    try:
        return f"killed by {signal.Signals(-code).name}"
    except ValueError:
        return f"killed by signal {-code}"


def _shown(path: str) -> str:
    with suppress(ValueError):
        return str(Path(path).relative_to(Path.cwd()))
    return path


# -- reload ---------------------------------------------------------------------------------------


class SourceFilter:
    """Accepts changes to ``*.py`` files, except under hidden directories or ``__pycache__``."""

    def __init__(self, roots: Sequence[Path]) -> None:
        self.roots = [Path(root) for root in roots]

    def __call__(self, change: Change, path: str) -> bool:
        file = Path(path)
        if file.suffix != ".py":
            return False
        for root in self.roots:
            if file.is_relative_to(root):
                parts = file.relative_to(root).parts[:-1]
                return not any(p.startswith(".") or p in IGNORED_PARTS for p in parts)
        return False


def source_roots(app: str) -> list[Path]:
    """The directories to watch: the app's module's and the current one, none inside another."""
    roots = {Path.cwd().resolve()}
    module = app.partition(":")[0]
    if module.endswith(".py"):
        roots.add(Path(module).resolve().parent)
    else:
        if "" not in sys.path and os.getcwd() not in sys.path:
            sys.path.insert(0, os.getcwd())  # as load_app does
        try:  # imports its parent packages, not the module itself
            spec = importlib.util.find_spec(module)
        except Exception as exc:
            log.debug("reload: cannot locate %s (%s); watching the current directory", module, exc)
            spec = None
        if spec is not None and spec.origin:
            roots.add(Path(spec.origin).resolve().parent)
    return sorted(r for r in roots if not any(r != o and r.is_relative_to(o) for o in roots))


# -- command line ---------------------------------------------------------------------------------


def worker_argv(argv: Sequence[str]) -> list[str]:
    """``argv`` without the options only the supervisor acts on."""
    kept: list[str] = []
    tokens = iter(argv)
    for token in tokens:
        name, equals, _ = token.partition("=")
        # argparse accepted this command line, so an abbreviation (--work) is unambiguous
        owned = [o for o in SUPERVISOR_OPTIONS if len(name) > 2 and o.startswith(name)]
        if len(owned) != 1:
            kept.append(token)
        elif SUPERVISOR_OPTIONS[owned[0]] and not equals:
            next(tokens, None)  # its value
    return kept


def add_run_arguments(run: argparse.ArgumentParser) -> None:
    """Add ``--workers``, ``--reload``, ``--health`` and ``--log-format`` to ``eventfn run``."""
    run.add_argument(
        "--workers",
        type=_positive_int,
        metavar="N",
        help="run N runner processes under a supervisor that restarts any that dies",
    )
    run.add_argument(
        "--reload",
        action="store_true",
        help="development: restart the runner(s) when a *.py file of the app changes",
    )
    run.add_argument(
        "--health",
        type=parse_address,
        metavar="HOST:PORT",
        help="serve GET /healthz, /readyz and /metrics on this address (default: none)",
    )
    run.add_argument(
        "--log-format",
        choices=FORMATS,
        default="text",
        help="text (the default) or json: one object per line",
    )


async def supervise_if_asked(args: argparse.Namespace, argv: Sequence[str]) -> int | None:
    """Supervise worker processes if ``--workers`` or ``--reload`` asks for it; return its exit
    status. ``None`` means: run in this process (as a worker does, whatever its arguments)."""
    if os.environ.get(WORKER_ENV) is not None or not (args.workers or args.reload):
        return None
    supervisor = Supervisor(
        [sys.executable, "-m", "eventfn", *worker_argv(argv)],
        workers=args.workers or 1,
        burst=args.burst,
        grace=args.grace,
        watch=source_roots(args.app) if args.reload else (),
        health=args.health,
    )
    return await supervisor.run()


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


__all__ = [
    "WORKER_ENV",
    "Backoff",
    "SourceFilter",
    "Supervisor",
    "add_run_arguments",
    "describe_exit",
    "source_roots",
    "supervise_if_asked",
    "worker_argv",
]
