"""Run one benchmark case in fresh processes: one publishes the backlog, one drains it (timed).

A benchmark script that uses it answers ``script _publish URL N CASE`` and
``script _drain URL N CASE``, the latter printing a JSON object with ``missing`` last.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from typing import Any


def run_case(script: str, count: int, case: str) -> dict[str, Any]:
    """Publish ``count`` events and drain them with ``case``, each in a new process, on a fresh
    SQLite file; the drain's result, or SystemExit if it missed any event."""
    with tempfile.TemporaryDirectory(prefix="eventfn-bench-") as tmp:
        url = f"sqlite:///{tmp}/burst.db"
        me = [sys.executable, script]
        subprocess.run([*me, "_publish", url, str(count), case], check=True, cwd=tmp)
        out = subprocess.run(
            [*me, "_drain", url, str(count), case],
            check=True,
            capture_output=True,
            text=True,
            cwd=tmp,
        ).stdout
    result: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    if result["missing"]:
        raise SystemExit(f"{case}: {result['missing']} events were not handled")
    return result
