"""The common forms of ``husk exec`` parsed without click.

Importing click and building its command objects is about a third of what a short
command costs to start (70 M of the 125 M instructions husk adds to Python's own start
for ``husk exec ID true``, valgrind). ``exec`` is the command run in loops (health
checks, scripts), so its plain forms are parsed here, with the same meaning as its click
command (:mod:`husk.cli.execute`); anything else (help, ``--``, an unknown option, a
value glued to a short option, no container) returns None and goes through click, which
also gives the usage errors.
"""

from __future__ import annotations

from typing import Any

_FLAGS = {
    "-d": "detach",
    "--detach": "detach",
    "-i": "interactive",
    "--interactive": "interactive",
    "-t": "tty",
    "--tty": "tty",
    "--privileged": "privileged",
}
_VALUES = {
    "-e": "env",
    "--env": "env",
    "--env-file": "env_file",
    "-u": "user",
    "--user": "user",
    "-w": "workdir",
    "--workdir": "workdir",
}
_REPEATED = frozenset({"env", "env_file"})
_SHORT_FLAGS = {"d": "detach", "i": "interactive", "t": "tty"}


def parse_exec(args: list[str]) -> dict[str, Any] | None:
    """``execflow.execute``'s arguments for ``husk exec ARGS``, or None for click to parse."""
    options: dict[str, Any] = {
        "detach": False,
        "interactive": False,
        "tty": False,
        "env": [],
        "env_file": [],
        "user": None,
        "workdir": None,
        "privileged": False,
    }
    index = 0
    while index < len(args):
        arg = args[index]
        if not arg.startswith("-"):
            break  # the container: what follows is the command, options included
        name, glued, value = arg.partition("=")
        if arg in _FLAGS:
            options[_FLAGS[arg]] = True
        elif name in _VALUES:
            if glued and not name.startswith("--"):
                return None  # "-e=X": click keeps the "=" in the value, leave it to click
            if not glued:
                if index + 1 >= len(args):
                    return None  # a missing value: click's usage error
                index += 1
                value = args[index]
            key = _VALUES[name]
            if key in _REPEATED:
                options[key].append(value)
            else:
                options[key] = value
        elif len(arg) > 2 and arg[1] != "-" and all(c in _SHORT_FLAGS for c in arg[1:]):
            for letter in arg[1:]:  # "-it"
                options[_SHORT_FLAGS[letter]] = True
        else:
            return None  # --help, --, "-eX", an unknown option: click's to judge
        index += 1
    if index + 1 >= len(args):
        return None  # no container or no command: click's usage error
    options["env"] = tuple(options["env"])
    options["env_file"] = tuple(options["env_file"])
    options["container"] = args[index]
    options["command"] = tuple(args[index + 1 :])
    return options


def run(args: list[str]) -> bool:
    """Runs ``husk ARGS`` if it is one of the quick forms (then exits); False if not."""
    if args[:1] != ["exec"]:
        return False
    options = parse_exec(args[1:])
    if options is None:
        return False
    from husk.cli import execflow  # lazy: CLI start-up (the client, for exec only)

    execflow.execute(**options)
    return True
