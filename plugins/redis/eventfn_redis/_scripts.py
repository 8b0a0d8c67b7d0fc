"""The broker's Lua scripts: each multi-key step is one atomic script, run with EVALSHA.

Each script is ``lua/common.lua`` followed by its own file. redis-py's ``AsyncScript`` sends
EVALSHA and loads the script again when the server answers NOSCRIPT (after a restart).
"""

from __future__ import annotations

from collections.abc import Sequence
from importlib.resources import files
from typing import Any

from redis.asyncio import Redis
from redis.commands.core import AsyncScript

NAMES = (
    "declare",
    "publish",
    "fetch",
    "settle",
    "extend",
    "stats",
    "dead_page",
    "replay",
    "purge",
    "retire",
)


def source(name: str) -> str:
    """The full text of one script, shared prelude first."""
    folder = files("eventfn_redis") / "lua"
    return (
        (folder / "common.lua").read_text("utf-8")
        + "\n"
        + (folder / f"{name}.lua").read_text("utf-8")
    )


_SOURCES = {name: source(name) for name in NAMES}


class Scripts:
    """The scripts registered on one client, each run with the namespace prefix as KEYS[1]."""

    def __init__(self, client: Redis, prefix: str) -> None:
        self._keys = [prefix]
        self._scripts: dict[str, AsyncScript] = {
            name: client.register_script(text) for name, text in _SOURCES.items()
        }

    async def run(self, name: str, args: Sequence[str | bytes | int]) -> Any:
        return await self._scripts[name](keys=self._keys, args=list(args))
