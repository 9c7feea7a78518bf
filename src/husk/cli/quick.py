"""The common forms of ``husk exec`` and ``husk run`` parsed without click.

Importing click and building its command objects is about a third of what a short
command costs to start (70 M of the 125 M instructions husk adds to Python's own start
for ``husk exec ID true``, valgrind). ``exec`` is the command run in loops (health
checks, scripts) and ``run --rm`` the one a start is measured by, so their plain forms
are parsed here, with the same meaning as their click commands (:mod:`husk.cli.execute`,
:mod:`husk.cli.run`); anything else (help, ``--``, an option not listed here, a value
glued to a short option, no image or container) returns None and goes through click,
which also gives the usage errors.
"""

from __future__ import annotations

from typing import Any

_EXEC_FLAGS = {
    "-d": "detach",
    "--detach": "detach",
    "-i": "interactive",
    "--interactive": "interactive",
    "-t": "tty",
    "--tty": "tty",
    "--privileged": "privileged",
}
_EXEC_VALUES = {
    "-e": "env",
    "--env": "env",
    "--env-file": "env_file",
    "-u": "user",
    "--user": "user",
    "-w": "workdir",
    "--workdir": "workdir",
}
_RUN_FLAGS = {
    **_EXEC_FLAGS,
    "--rm": "auto_remove",
    "--init": "init",
    "--read-only": "read_only",
}
_RUN_VALUES = {
    **_EXEC_VALUES,
    "--name": "name",
    "-m": "memory",
    "--memory": "memory",
    "--entrypoint": "entrypoint",
    "--network": "networks",
    "-l": "label",
    "--label": "label",
    "-h": "hostname",
    "--hostname": "hostname",
}
_REPEATED = frozenset({"env", "env_file", "networks", "label"})
_SHORT_FLAGS = {"d": "detach", "i": "interactive", "t": "tty"}


def _parse(
    args: list[str], flags: dict[str, str], values: dict[str, str]
) -> tuple[dict[str, Any], list[str]] | None:
    """The options before the first argument, and that argument with what follows
    (at least two: the container or image and a command, or the image alone for run);
    None for anything click must judge."""
    options: dict[str, Any] = {}
    index = 0
    while index < len(args):
        arg = args[index]
        if not arg.startswith("-"):
            break  # the container or image: what follows is the command, options included
        name, glued, value = arg.partition("=")
        if arg in flags:
            options[flags[arg]] = True
        elif name in values:
            if glued and not name.startswith("--"):
                return None  # "-e=X": click keeps the "=" in the value, leave it to click
            if not glued:
                if index + 1 >= len(args):
                    return None  # a missing value: click's usage error
                index += 1
                value = args[index]
            key = values[name]
            if key in _REPEATED:
                options.setdefault(key, []).append(value)
            else:
                options[key] = value
        elif len(arg) > 2 and arg[1] != "-" and all(c in _SHORT_FLAGS for c in arg[1:]):
            for letter in arg[1:]:  # "-it"
                options[_SHORT_FLAGS[letter]] = True
        else:
            return None  # --help, --, "-eX", an unknown option: click's to judge
        index += 1
    for key in _REPEATED.intersection(options):
        options[key] = tuple(options[key])
    return options, args[index:]


def parse_exec(args: list[str]) -> dict[str, Any] | None:
    """``execflow.execute``'s arguments for ``husk exec ARGS``, or None for click to parse."""
    parsed = _parse(args, _EXEC_FLAGS, _EXEC_VALUES)
    if parsed is None or len(parsed[1]) < 2:
        return None  # no container or no command: click's usage error
    given, rest = parsed
    return {
        "detach": False,
        "interactive": False,
        "tty": False,
        "env": (),
        "env_file": (),
        "user": None,
        "workdir": None,
        "privileged": False,
        **given,
        "container": rest[0],
        "command": tuple(rest[1:]),
    }


def parse_run(args: list[str]) -> dict[str, Any] | None:
    """``runflow.run_parsed``'s arguments for ``husk run ARGS``, or None for click.

    ``options`` holds only what was given: the request built from it
    (:func:`husk.cli.createopts.build_create_request`) reads every other option as unset,
    which is what click's defaults mean there."""
    parsed = _parse(args, _RUN_FLAGS, _RUN_VALUES)
    if parsed is None or not parsed[1]:
        return None  # no image: click's usage error
    options, rest = parsed
    detach = bool(options.pop("detach", False))
    return {
        "image": rest[0],
        "command": tuple(rest[1:]),
        "detach": detach,
        "sig_proxy": True,
        "detach_keys": "",
        "options": options,
    }


def run(args: list[str]) -> bool:
    """Runs ``husk ARGS`` if it is one of the quick forms (then exits); False if not."""
    command = args[:1]
    if command == ["exec"]:
        options = parse_exec(args[1:])
        if options is None:
            return False
        from husk.cli import execflow  # lazy: CLI start-up (the client, for exec only)

        execflow.execute(**options)
        return True
    if command == ["run"]:
        parsed = parse_run(args[1:])
        if parsed is None:
            return False
        from husk.cli import runflow  # lazy: CLI start-up (the client, for run only)

        runflow.run_parsed(**parsed)
        return True
    return False
