"""``docker top``'s ``ps_args``: which columns of a container's process list to show.

dockerd runs the host's ``ps`` with the client's arguments and keeps the container's
rows; husk's processes live in a VM, so the guest lists them and this module lays them
out as ``ps`` would for the options that only choose columns: ``-ef`` (the default)
and ``-o``/``-eo``/``o`` lists of the keywords below, with ``keyword=HEADER`` renames.
Anything else is refused by name rather than answered with different columns.
"""

from __future__ import annotations

from collections.abc import Sequence

from husk.errors import NotSupported

DEFAULT_TITLES = ("UID", "PID", "PPID", "TIME", "CMD")
_DEFAULT_KEYS = ("uid", "pid", "ppid", "time", "cmd")

# ps's keyword → (the process-list field, ps's header).
KEYWORDS: dict[str, tuple[str, str]] = {
    "pid": ("pid", "PID"),
    "ppid": ("ppid", "PPID"),
    "uid": ("uid", "UID"),
    "euid": ("uid", "EUID"),
    "user": ("uid", "USER"),
    "euser": ("uid", "EUSER"),
    "time": ("time", "TIME"),
    "cputime": ("time", "TIME"),
    "args": ("cmd", "COMMAND"),
    "command": ("cmd", "COMMAND"),
    "cmd": ("cmd", "CMD"),
    "comm": ("comm", "COMMAND"),
    "ucmd": ("comm", "CMD"),
    "ucomm": ("comm", "COMMAND"),
}
_DEFAULT_FORMS = ("", "-ef", "-e -f", "-fe", "-f -e", "-e", "-A", "-Af", "-fA")
_LIST_FLAGS = ("-o", "-eo", "-Ao", "o", "-e -o", "-A -o")


def columns(ps_args: str) -> tuple[list[str], list[str]]:
    """(titles, process-list fields) that ``ps ps_args`` would show."""
    text = " ".join(ps_args.split())
    if text in _DEFAULT_FORMS:
        return list(DEFAULT_TITLES), list(_DEFAULT_KEYS)
    for flag in _LIST_FLAGS:
        if text.startswith(flag + " ") or text.startswith(flag + "="):
            return _format_list(text[len(flag) + 1 :], ps_args)
    raise NotSupported(
        f"ps options {ps_args!r} are not supported by husk's top: use -ef or "
        f"-o with {', '.join(sorted(KEYWORDS))}"
    )


def _format_list(spec: str, ps_args: str) -> tuple[list[str], list[str]]:
    titles: list[str] = []
    keys: list[str] = []
    items = spec.replace(" ", ",").split(",")
    for item in filter(None, items):
        keyword, _, header = item.partition("=")
        known = KEYWORDS.get(keyword)
        if known is None:
            raise NotSupported(
                f"ps keyword {keyword!r} in {ps_args!r} is not supported by husk's top "
                f"(known: {', '.join(sorted(KEYWORDS))})"
            )
        keys.append(known[0])
        titles.append(header or known[1])
    if not keys:
        raise NotSupported(f"ps options {ps_args!r} name no column")
    return titles, keys


def rows(processes: Sequence[dict[str, int | str]], keys: Sequence[str]) -> list[list[str]]:
    """Each process's values for ``keys``, as text."""
    return [[str(process.get(key, "")) for key in keys] for process in processes]
