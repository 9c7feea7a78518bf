"""Images installed for every user: ``husk.local/…`` names an administrator provides.

``husk.local/…`` images are made on the host and never pulled, and each user has an
image store of their own, so an image root imported (``install.sh`` imports
``husk.local/busybox``) is not in another user's store. ``install.sh`` therefore also
saves it, root-owned and world-readable, under the system images directory::

    /usr/local/share/husk/images/<domain>/<repository path>/<tag>.tar   (docker or OCI archive)
    /usr/local/share/husk/images/<domain>/<repository path>/<tag>/      (or an OCI layout)

and a user's first use of the name loads it into that user's store, through the same
hardened loader as ``husk load``. The directory is used only when it and every directory
above it belong to root (or the user) and nobody else can write to them: otherwise
another user could hand this one an image under a trusted name.
"""

from __future__ import annotations

from pathlib import Path

from husk import paths, settings
from husk.oci.reference import Reference


def source_for(ref: Reference) -> Path | None:
    """The system archive or layout of ``ref`` (a husk.local/ name), if installed and trusted."""
    if ref.tag is None:
        return None
    base = settings.system_images_dir()
    folder = base.joinpath(ref.domain, *ref.path.split("/"))
    for candidate in (folder / f"{ref.tag}.tar", folder / ref.tag):
        if not candidate.exists():
            continue
        try:
            paths.check_ancestors(candidate)
            paths.check_private_dir(candidate if candidate.is_dir() else candidate.parent)
        except (paths.UnsafePath, OSError):
            return None
        if candidate.is_file() and candidate.stat().st_uid not in paths.trusted_uids():
            return None
        return candidate
    return None
