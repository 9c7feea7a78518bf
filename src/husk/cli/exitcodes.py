"""Docker's exit codes for commands that run something in a container."""

from __future__ import annotations

from husk.errors import HuskError

EXIT_HUSK_ERROR = 125  # husk itself failed: bad input, daemon error
EXIT_CANNOT_EXECUTE = 126  # the command exists but cannot be run
EXIT_COMMAND_NOT_FOUND = 127  # the command does not exist


def start_failure_exit_code(err: HuskError) -> int:
    """The code for a workload or exec session that could not start.

    The code the daemon recorded and sent with the error wins when it says the
    command could not be found (127) or run (126); anything else is husk's own
    failure, 125. The message's words are never read.
    """
    if err.exit_code in (EXIT_CANNOT_EXECUTE, EXIT_COMMAND_NOT_FOUND):
        return err.exit_code
    return EXIT_HUSK_ERROR
