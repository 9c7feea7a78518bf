"""Finding the host programs husk runs (mkfs.ext4, qemu-system-x86_64, slirp4netns, …).

Debian installs some of them in ``/sbin`` or ``/usr/sbin``, which are not on an ordinary
user's ``PATH`` although any user may run them. So a program is looked up on ``PATH``
first and then in the system directories, whatever ``PATH`` says.
"""

from __future__ import annotations

import os
import shutil

SYSTEM_DIRS = ("/usr/local/sbin", "/usr/local/bin", "/usr/sbin", "/usr/bin", "/sbin", "/bin")
"""Searched after ``PATH``, in this order (Debian's root ``PATH``)."""


def find_tool(name: str, path: str | None = None) -> str | None:
    """The absolute path of program ``name``, or None; ``path`` replaces ``$PATH``.

    A name with a slash is taken as given (if it is an executable file).
    """
    if os.sep in name:
        return name if os.access(name, os.X_OK) and os.path.isfile(name) else None
    # shutil.which reads PATH itself when ``path`` is None (PATH is no husk setting).
    return shutil.which(name, path=path) or shutil.which(name, path=os.pathsep.join(SYSTEM_DIRS))


def tool_argv(argv: list[str]) -> list[str]:
    """``argv`` with its program resolved by :func:`find_tool` (unchanged if not found,
    so that running it fails with the usual FileNotFoundError)."""
    found = find_tool(argv[0])
    return [found, *argv[1:]] if found else argv
