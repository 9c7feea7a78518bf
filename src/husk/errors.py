"""Error taxonomy shared by every layer.

Each error maps to one user-facing meaning: the CLI prints ``str(err)`` on one
line and exits 125; the Docker API maps ``http_status`` onto its JSON error.
"""

from __future__ import annotations


class HuskError(Exception):
    """Base of every error husk reports to a user."""

    http_status = 500
    kind = "internal"

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
    kind = "start_failed"


class GuestError(HuskError):
    """The guest agent reported an error, died, or did not answer in time."""

    kind = "guest_error"


class BundleError(HuskError):
    """The guest bundle is missing, corrupt or cannot be built."""

    kind = "bundle_error"


class Internal(HuskError):
    kind = "internal"


class NotModified(HuskError):
    """304: the container already is in the state asked for (start, stop)."""

    http_status = 304
    kind = "not_modified"
