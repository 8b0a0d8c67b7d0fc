"""The public API is what we mean it to be: ``eventfn.__all__`` pinned and documented, the
package typed (``py.typed`` shipped), and what a type checker sees pinned by
``tests/typing/check_types.py`` under ``mypy --strict``.

Changing a list below is a decision about the public API: make it with a CHANGELOG entry.
"""

from __future__ import annotations

import importlib.resources
import inspect
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

import eventfn

ROOT = Path(__file__).resolve().parents[1]
CHECK_TYPES = ROOT / "tests" / "typing" / "check_types.py"

PUBLIC = [
    "App",
    "BatchResult",
    "Broker",
    "BrokerError",
    "BrokerUnavailable",
    "CircuitBreaker",
    "ConfigurationError",
    "Context",
    "DeadLetter",
    "DeadLetterQueue",
    "DeadLetterRecord",
    "DecodeError",
    "Delivery",
    "Drop",
    "Envelope",
    "EventfnError",
    "HandlerOptions",
    "InvalidDestination",
    "ObjectNotLocal",
    "PayloadTooLarge",
    "PublishError",
    "RegistrationError",
    "Retry",
    "Router",
    "Runner",
    "SubscriptionRef",
    "Summary",
    "Tick",
    "UnknownBrokerError",
    "UnknownDestination",
    "Upload",
    "event_type",
]
"""``eventfn.__all__``, as released."""

TESTING_PUBLIC = [
    "CHECKS",
    "Emitted",
    "HandlerCall",
    "NotIdle",
    "TestRuntime",
    "VirtualClock",
    "check_broker",
    "s3_notification",
]
"""``eventfn.testing.__all__``, as released."""


# -- eventfn.__all__ ------------------------------------------------------------------------------


def test_all_is_the_pinned_public_api() -> None:
    assert eventfn.__all__ == PUBLIC


def test_all_is_sorted_without_duplicates() -> None:
    assert eventfn.__all__ == sorted(set(eventfn.__all__))


@pytest.mark.parametrize("name", PUBLIC)
def test_every_public_name_resolves_and_is_documented(name: str) -> None:
    value = getattr(eventfn, name)
    assert not inspect.ismodule(value), f"eventfn.{name} is a module, not an API object"
    assert inspect.getdoc(value), f"eventfn.{name} has no docstring"
    if inspect.isclass(value):
        assert value.__doc__ and value.__doc__.strip(), f"eventfn.{name} inherits its docstring"


def test_star_import_gives_exactly_all() -> None:
    namespace: dict[str, object] = {}
    exec("from eventfn import *", namespace)
    assert sorted(k for k in namespace if k != "__builtins__") == sorted(PUBLIC)


def test_no_public_name_outside_all() -> None:
    stray = [
        name
        for name, value in vars(eventfn).items()
        if not name.startswith("_") and not inspect.ismodule(value) and name not in PUBLIC
    ]
    assert stray == [], "public names missing from __all__ (or to be made private)"


# -- eventfn.testing ------------------------------------------------------------------------------


def test_testing_names_are_pinned_sorted_and_documented() -> None:
    testing = pytest.importorskip("eventfn.testing")
    assert testing.__all__ == TESTING_PUBLIC
    assert testing.__all__ == sorted(set(testing.__all__))
    for name in testing.__all__:
        value = getattr(testing, name)
        if callable(value):
            assert inspect.getdoc(value), f"eventfn.testing.{name} has no docstring"


# -- py.typed -------------------------------------------------------------------------------------


def test_py_typed_is_in_the_package_and_in_its_package_data() -> None:
    assert importlib.resources.files("eventfn").joinpath("py.typed").is_file()
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    setuptools = config["tool"]["setuptools"]
    assert "py.typed" in setuptools["package-data"]["eventfn"], "py.typed would not be shipped"


# -- typing tests: mypy --strict ------------------------------------------------------------------


def mypy(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--no-error-summary", str(path)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=110,
    )


def without_modules(type_text: str) -> str:
    """``def (job: check_types.Job) -> typing.Coroutine[...]`` as ``def (job: Job) -> ...``."""
    return re.sub(r"\b(?:[A-Za-z_]\w*\.)+(?=[A-Za-z_])", "", type_text)


def test_check_types_passes_mypy_strict_and_reveals_the_pinned_types() -> None:
    pytest.importorskip("mypy")
    done = mypy(CHECK_TYPES)
    assert done.returncode == 0, done.stdout + done.stderr
    revealed = {
        int(m["line"]): without_modules(m["type"])
        for m in re.finditer(
            r":(?P<line>\d+): note: Revealed type is \"(?P<type>.*)\"", done.stdout
        )
    }
    expected = {
        number: line.split("# revealed: ", 1)[1].strip()
        for number, line in enumerate(CHECK_TYPES.read_text().splitlines(), start=1)
        if "# revealed: " in line and line.startswith("reveal_type(")
    }
    assert len(expected) >= 15, "the reveal_type checks were not found"
    assert revealed == expected


NEGATIVE = """
from collections.abc import Callable, Coroutine
from typing import Any, assert_type

import msgspec

import eventfn


class Job(msgspec.Struct):
    n: int


app = eventfn.App("wrong")


@app.on_queue("a", retires=3)
async def misspelt(job: Job) -> None: ...


@app.on_queue("b", retry=3)
async def wrong_type(job: Job) -> None: ...


@app.on_queue("c")
async def handler(job: Job, /) -> None: ...


assert_type(handler, Callable[[int], Coroutine[Any, Any, None]])


async def publisher() -> None:
    assert_type(await app.publish("a", Job(n=1)), int)
"""


@pytest.fixture(scope="module")
def negative(tmp_path_factory: pytest.TempPathFactory) -> subprocess.CompletedProcess[str]:
    """mypy's report on ``NEGATIVE``: proof that the checks above can fail."""
    pytest.importorskip("mypy")
    wrong = tmp_path_factory.mktemp("typing") / "wrong.py"
    wrong.write_text(NEGATIVE)
    return mypy(wrong)


@pytest.mark.parametrize(
    ("code", "complaint"),
    [
        ('"a", retires=3', 'Unexpected keyword argument "retires" for "on_queue"'),
        ('"b", retry=3', 'Argument "retry" to "on_queue" of "App" has incompatible type "int"'),
        ("assert_type(handler", 'of type "Callable[[Job], Coroutine[Any, Any, None]]", not'),
        ("assert_type(await app.publish", 'Expression is of type "str", not "int"'),
    ],
    ids=["unknown-option", "wrong-option-type", "handler-type", "publish-type"],
)
def test_mypy_catches_mistakes_in_a_file_like_check_types(
    negative: subprocess.CompletedProcess[str], code: str, complaint: str
) -> None:
    assert negative.returncode == 1, negative.stdout + negative.stderr
    [line] = [n for n, text in enumerate(NEGATIVE.splitlines(), start=1) if code in text]
    errors = [e for e in negative.stdout.splitlines() if f"wrong.py:{line}: error:" in e]
    assert any(complaint in e for e in errors), negative.stdout
