"""A small single-threaded event loop for the agent.

asyncio costs ~0.45 s to import under TCG and its child watchers fight a PID 1
reaper, so the agent runs on ``selectors`` with timers and a signal wakeup fd.
"""

from __future__ import annotations

import heapq
import os
import selectors
import signal
import sys
import time
from collections.abc import Callable

Callback = Callable[[], None]


def log(message: str) -> None:
    """A line on the guest console (console.log on the host)."""
    try:
        sys.stderr.write(f"husk-agent: {message}\n")
        sys.stderr.flush()
    except Exception:
        pass


class Timer:
    __slots__ = ("callback", "cancelled", "when")

    def __init__(self, when: float, callback: Callback) -> None:
        self.when = when
        self.callback = callback
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True

    def __lt__(self, other: Timer) -> bool:
        return self.when < other.when


class Loop:
    def __init__(self) -> None:
        self._selector = selectors.DefaultSelector()
        self._readers: dict[int, Callback] = {}
        self._writers: dict[int, Callback] = {}
        self._timers: list[Timer] = []
        self._signal_handlers: dict[int, Callback] = {}
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.set_wakeup_fd(self._wake_w, warn_on_full_buffer=False)
        self.add_reader(self._wake_r, self._drain_signals)

    # -- file descriptors -------------------------------------------------
    def _update(self, fd: int) -> None:
        events = (selectors.EVENT_READ if fd in self._readers else 0) | (
            selectors.EVENT_WRITE if fd in self._writers else 0
        )
        try:
            self._selector.get_key(fd)
            registered = True
        except KeyError:
            registered = False
        if not events:
            if registered:
                self._selector.unregister(fd)
        elif registered:
            self._selector.modify(fd, events)
        else:
            self._selector.register(fd, events)

    def add_reader(self, fd: int, callback: Callback) -> None:
        self._readers[fd] = callback
        self._update(fd)

    def remove_reader(self, fd: int) -> None:
        if self._readers.pop(fd, None) is not None:
            self._update(fd)

    def add_writer(self, fd: int, callback: Callback) -> None:
        self._writers[fd] = callback
        self._update(fd)

    def remove_writer(self, fd: int) -> None:
        if self._writers.pop(fd, None) is not None:
            self._update(fd)

    def forget(self, fd: int) -> None:
        """Drops every callback for ``fd`` (call before closing it)."""
        self._readers.pop(fd, None)
        self._writers.pop(fd, None)
        self._update(fd)

    # -- timers and signals -----------------------------------------------
    def call_later(self, delay: float, callback: Callback) -> Timer:
        timer = Timer(time.monotonic() + delay, callback)
        heapq.heappush(self._timers, timer)
        return timer

    def on_signal(self, signum: int, callback: Callback) -> None:
        self._signal_handlers[signum] = callback
        # A Python-level handler must exist for the wakeup fd to be written to.
        signal.signal(signum, lambda _signum, _frame: None)

    def _drain_signals(self) -> None:
        try:
            data = os.read(self._wake_r, 4096)
        except BlockingIOError:
            return
        for signum in set(data):
            handler = self._signal_handlers.get(signum)
            if handler is not None:
                self._guard(handler)

    # -- running ----------------------------------------------------------
    @staticmethod
    def _guard(callback: Callback) -> None:
        try:
            callback()
        except Exception as exc:  # the agent must survive any one handler failing
            log(f"internal error in {getattr(callback, '__qualname__', callback)}: {exc!r}")

    def run_once(self) -> None:
        timeout: float | None = None
        if self._timers:
            timeout = max(0.0, self._timers[0].when - time.monotonic())
        for key, events in self._selector.select(timeout):
            fd = int(key.fd)  # type: ignore[arg-type]
            if events & selectors.EVENT_READ and fd in self._readers:
                self._guard(self._readers[fd])
            if events & selectors.EVENT_WRITE and fd in self._writers:
                self._guard(self._writers[fd])
        now = time.monotonic()
        while self._timers and self._timers[0].when <= now:
            timer = heapq.heappop(self._timers)
            if not timer.cancelled:
                self._guard(timer.callback)

    def run_forever(self) -> None:
        while True:
            self.run_once()
