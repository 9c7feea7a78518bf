"""Docker's exit codes for commands that run something in a container."""

from __future__ import annotations

EXIT_HUSK_ERROR = 125  # husk itself failed: bad input, daemon error
EXIT_CANNOT_EXECUTE = 126  # the command exists but cannot be run
EXIT_COMMAND_NOT_FOUND = 127  # the command does not exist

_NOT_FOUND = ("not found", "no such file", "does not exist")
_CANNOT_EXECUTE = ("permission denied", "cannot execute", "not executable", "exec format error")


def start_failure_exit_code(message: str, recorded: int | None = None) -> int:
    """The code for a workload or exec session that could not start.

    A code the daemon recorded (126/127) wins; otherwise the message decides, as
    Docker's CLI does: a missing executable is 127, one that cannot run 126, and
    anything else is husk's own failure, 125.
    """
    if recorded in (EXIT_CANNOT_EXECUTE, EXIT_COMMAND_NOT_FOUND):
        return recorded
    text = message.lower()
    mentions_exec = any(word in text for word in ("exec", "command", "executable", "process"))
    if mentions_exec and any(phrase in text for phrase in _NOT_FOUND):
        return EXIT_COMMAND_NOT_FOUND
    if mentions_exec and any(phrase in text for phrase in _CANNOT_EXECUTE):
        return EXIT_CANNOT_EXECUTE
    return EXIT_HUSK_ERROR
