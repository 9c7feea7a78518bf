"""Log lines of guest-caused events, at most one per interval.

A guest decides how often some events happen (each connection it makes through the
gateway or a socket bind, each refusal of a published port's connection): logged each
time, a loop of them rotated the daemon's log past everything else in it within
seconds. One :class:`LogLimiter` per VM or relay and kind of event logs the first, then
at most one per interval with the count of those left out.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

INTERVAL = 10.0
"""Seconds between two lines of one limiter."""


class LogLimiter:
    def __init__(
        self,
        logger: logging.Logger,
        *,
        interval: float = INTERVAL,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._logger = logger
        self._interval = interval
        self._clock = clock
        self._next = float("-inf")
        self._left_out = 0

    def info(self, message: str, *args: object) -> None:
        now = self._clock()
        if now < self._next:
            self._left_out += 1
            return
        self._next = now + self._interval
        if self._left_out:
            message += (
                f" ({self._left_out} more like it in the last {self._interval:.0f}s not logged)"
            )
            self._left_out = 0
        self._logger.info(message, *args)
