"""Error taxonomy shared by every layer.

Each error maps to one user-facing meaning: the CLI prints ``str(err)`` on one
line and exits 125; the Docker API maps ``http_status`` onto its JSON error.
"""

from __future__ import annotations


class HuskError(Exception):
    """Base of every error husk reports to a user."""

    http_status = 500
    kind = "internal"
    exit_code: int | None = None
    """The exit code a failed start or exec recorded (126, 127, 128), if any: it travels
    in the daemon's error body (``ExitCode``), so the CLI never guesses it from words."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class NotFound(HuskError):
    http_status = 404
    kind = "not_found"


class Conflict(HuskError):
    http_status = 409
    kind = "conflict"


class InvalidArgument(HuskError):
    http_status = 400
    kind = "invalid_argument"


class NotSupported(HuskError):
    """A feature husk deliberately does not implement (listed in the docs)."""

    http_status = 501
    kind = "not_supported"


class PullFailed(HuskError):
    kind = "pull_failed"


class CreateFailed(HuskError):
    kind = "create_failed"


class StartFailed(HuskError):
    """A container's process could not be started; ``exit_code`` is what Docker records.

    127: the command does not exist; 126: it cannot be run (both are the client's
    mistake, 400 as Docker answers); anything else (128) is a failure to set it up.
    """

    kind = "start_failed"

    def __init__(self, message: str, exit_code: int = 128) -> None:
        super().__init__(message)
        self.exit_code = exit_code
        if exit_code in (126, 127):
            self.http_status = 400


class GuestError(HuskError):
    """The guest agent reported an error, died, or did not answer in time.

    ``guest_kind`` is the kind of a guest's ERROR reply (see husk.guest.protocol's
    ``ERROR_*``), ``exit_code`` the code the guest gave a process it could not start;
    "" and None when the guest said nothing of the kind.
    """

    kind = "guest_error"

    def __init__(self, message: str, *, guest_kind: str = "", exit_code: int | None = None) -> None:
        super().__init__(message)
        self.guest_kind = guest_kind
        self.exit_code = exit_code


class BundleError(HuskError):
    """The guest bundle is missing, corrupt or cannot be built."""

    kind = "bundle_error"


class Internal(HuskError):
    kind = "internal"


class NotModified(HuskError):
    """304: the container already is in the state asked for (start, stop)."""

    http_status = 304
    kind = "not_modified"
