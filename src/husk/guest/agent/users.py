"""Resolving a container user spec against the container's own /etc/passwd and /etc/group.

The files are parsed here, never through NSS (which would load the image's own
libraries into the agent), and read through :mod:`beneath`: a symlink, FIFO or
device the container put there cannot point the agent at its own files or block it.
"""

from __future__ import annotations

from husk.guest.agent import beneath

_MAX_FILE = 4 * 1024 * 1024


class UserError(Exception):
    pass


def _entries(root: str, path: str) -> list[list[str]]:
    try:
        text = beneath.read_file(root, path, _MAX_FILE).decode("utf-8", errors="replace")
    except OSError:
        return []
    return [line.split(":") for line in text.splitlines() if line and not line.startswith("#")]


class Identity:
    __slots__ = ("gid", "groups", "home", "name", "uid")

    def __init__(self, uid: int, gid: int, groups: list[int], home: str, name: str) -> None:
        self.uid = uid
        self.gid = gid
        self.groups = groups
        self.home = home
        self.name = name


def resolve(user: str, root: str, add_groups: list[str] | None = None) -> Identity:
    """``user`` is ``""``, ``name``, ``uid``, ``name:group``, ``uid:gid`` (Docker's forms).

    ``add_groups`` (``--group-add``): more supplementary groups, by name or number.
    """
    user_part, _, group_part = (user or "0").partition(":")
    passwd = _entries(root, "/etc/passwd")
    groups = _entries(root, "/etc/group")
    record = None
    for entry in passwd:
        if len(entry) >= 6 and (
            entry[0] == user_part or (user_part.isdigit() and entry[2] == user_part)
        ):
            record = entry
            break
    if record is not None:
        name, uid, gid, home = record[0], int(record[2]), int(record[3]), record[5] or "/"
    elif user_part.isdigit():
        name, uid, gid, home = "", int(user_part), 0, "/"
    else:
        raise UserError(f"unable to find user {user_part}: no matching entries in passwd file")
    if group_part:
        if group_part.isdigit():
            gid = int(group_part)
        else:
            match = [g for g in groups if len(g) >= 3 and g[0] == group_part]
            if not match:
                raise UserError(
                    f"unable to find group {group_part}: no matching entries in group file"
                )
            gid = int(match[0][2])
    supplementary = [gid]
    if name and not group_part:
        for entry in groups:
            if len(entry) >= 4 and name in entry[3].split(",") and entry[2].isdigit():
                extra = int(entry[2])
                if extra not in supplementary:
                    supplementary.append(extra)
    for group in add_groups or []:
        if group.isdigit():
            extra = int(group)
        else:
            match = [g for g in groups if len(g) >= 3 and g[0] == group and g[2].isdigit()]
            if not match:
                raise UserError(f"Unable to find group {group}: no matching entries in group file")
            extra = int(match[0][2])
        if extra not in supplementary:
            supplementary.append(extra)
    return Identity(uid, gid, supplementary, home, name)
