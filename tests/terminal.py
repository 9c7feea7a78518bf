"""A command on a pseudo-terminal, as a user's shell runs it (``-it`` sessions, detach keys)."""

from __future__ import annotations

import os
import pty
import select
import subprocess
import time


class Terminal:
    def __init__(self, argv: list[str], env: dict[str, str]) -> None:
        self.master, slave = pty.openpty()
        self.process = subprocess.Popen(
            argv, stdin=slave, stdout=slave, stderr=slave, env=env, start_new_session=True
        )
        os.close(slave)
        self.seen = b""

    def expect(self, token: bytes, deadline: float = 90.0) -> bytes:
        """Everything the terminal showed, once it has shown ``token`` (within ``deadline``)."""
        end = time.monotonic() + deadline
        while token not in self.seen:
            remaining = end - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"{token!r} not seen within {deadline}s; got {self.seen!r}")
            ready, _, _ = select.select([self.master], [], [], min(remaining, 0.5))
            if ready:
                try:
                    chunk = os.read(self.master, 4096)
                except OSError:
                    chunk = b""
                if not chunk:
                    raise AssertionError(f"terminal closed before {token!r}; got {self.seen!r}")
                self.seen += chunk
        return self.seen

    def send(self, data: bytes) -> None:
        os.write(self.master, data)

    def type_keys(self, keys: bytes) -> None:
        """One key at a time, as a user types (each a read of its own for the CLI)."""
        for key in keys:
            os.write(self.master, bytes([key]))
            time.sleep(0.3)

    def wait(self, timeout: float = 60.0) -> int:
        """The command's exit code; a command still running after ``timeout`` is killed."""
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(10)
            raise AssertionError(f"the command did not exit: {self.seen!r}") from None
        finally:
            os.close(self.master)
