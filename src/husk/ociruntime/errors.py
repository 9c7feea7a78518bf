"""The one error husk-runtime's commands report: a runc-style message and an exit status."""

from __future__ import annotations


class RuntimeFailure(Exception):
    """A command failed: ``str(self)`` is the one-line message engines show."""

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code
