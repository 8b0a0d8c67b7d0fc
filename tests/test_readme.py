"""The README's first handler module and commands work as written."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]


def readme_block(marker: str) -> str:
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    return next(block for block in blocks if block.startswith(marker))


def test_first_handler_module_runs_as_the_readme_says(tmp_path: Path) -> None:
    (tmp_path / "shop.py").write_text(readme_block("# shop.py"))
    broker = f"sqlite:///{tmp_path / 'shop.db'}"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}

    def eventfn(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "eventfn", *args],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )

    inspect = eventfn("inspect", "shop:app")
    assert inspect.returncode == 0, inspect.stderr
    assert inspect.stdout.count("group=") == 3 and "types=inventory.reserved" in inspect.stdout
    declare = eventfn("run", "shop:app", "--burst", "--broker", broker)
    assert declare.returncode == 0, declare.stderr
    for document in (
        '{"orderId": "o1", "customerId": "c1"}',
        '{"orderId": "o2", "customerId": "unknown"}',
    ):
        published = eventfn(
            "publish", "order-events", document, "--type", "order.accepted", "--broker", broker
        )
        assert published.returncode == 0, published.stderr
    run = eventfn("run", "shop:app", "--burst", "--broker", broker)
    assert run.returncode == 0, run.stderr
    assert "handled 5, retried 0, dead-lettered 1" in run.stdout
    assert "reserving stock for o1" in run.stderr
    assert "handled events/notify-warehouse" in run.stderr


def test_the_readmes_testing_example_passes_under_pytest(tmp_path: Path) -> None:
    (tmp_path / "test_shop.py").write_text(readme_block("# test_shop.py"))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    options = ["-o", "asyncio_mode=auto", "-o", "asyncio_default_fixture_loop_scope=function"]
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_shop.py", *options],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "3 passed" in done.stdout
