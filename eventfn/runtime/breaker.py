"""The retry-storm guard: a circuit breaker per subscription, in the runner.

When a handler fails for every message in a row (its dependency is down), retrying the whole
backlog only burns attempts and hammers the dependency. After ``threshold`` first attempts in
a row have failed, the breaker opens. (Only first attempts count: retries of messages that
already failed come back together, and their failing again is no news about the dependency;
any success resets the count.) Then the runner stops fetching for that subscription and gives
back the messages it holds unstarted (no attempt counted). After a cooldown it lets one
message through (half-open); success closes it, failure opens it again for twice as long.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Literal

import msgspec

log = logging.getLogger("eventfn.runner")

State = Literal["closed", "open", "half-open"]


class CircuitBreaker(msgspec.Struct, frozen=True, kw_only=True):
    """Settings of the retry-storm guard (``breaker=`` on a decorator; ``False`` turns it off).

    Args:
        threshold: consecutive failed first attempts (of different messages) that open it.
        cooldown: the first pause, in seconds; doubled after each failed probe.
        max_cooldown: the longest pause.
    """

    threshold: int = 5
    cooldown: float = 1.0
    max_cooldown: float = 30.0


class Breaker:
    """The state of one subscription's circuit."""

    def __init__(self, settings: CircuitBreaker, name: str, clock: Callable[[], float]) -> None:
        self.settings = settings
        self.name = name
        self.clock = clock
        self.state: State = "closed"
        self.failures = 0
        self.cooldown = settings.cooldown
        self.open_until = 0.0
        self.probing = False
        self.opened = 0  # times opened, for metrics and tests

    def success(self) -> None:
        if self.state != "closed":
            log.warning("circuit closed for %s: the probe succeeded", self.name)
        self.state = "closed"
        self.failures = 0
        self.cooldown = self.settings.cooldown
        self.probing = False

    def failure(self, attempt: int = 1) -> None:
        if self.state == "half-open":
            self.cooldown = min(self.cooldown * 2, self.settings.max_cooldown)
            self._open("the probe failed")
        elif self.state == "closed" and attempt == 1:
            self.failures += 1
            if self.failures >= self.settings.threshold:
                self._open(f"{self.failures} first attempts failed in a row")

    def _open(self, why: str) -> None:
        self.state = "open"
        self.probing = False
        self.opened += 1
        self.open_until = self.clock() + self.cooldown
        log.warning("circuit open for %s: %s; pausing it for %.1fs", self.name, why, self.cooldown)

    def wait_time(self) -> float:
        """Seconds until fetching may resume (0 when it may fetch now)."""
        if self.state != "open":
            return 0.0
        return max(0.0, self.open_until - self.clock())

    def room(self, room: int) -> int:
        """How many messages may be fetched now, given ``room`` free slots."""
        if self.state == "closed":
            return room
        if self.state == "open":
            if self.clock() < self.open_until:
                return 0
            self.state = "half-open"
            log.warning("circuit half-open for %s: probing with one message", self.name)
        if self.probing:
            return 0
        self.probing = room > 0
        return min(room, 1)

    @property
    def blocks(self) -> bool:
        """Whether held, unstarted messages should be given back instead of run."""
        return self.state == "open"
