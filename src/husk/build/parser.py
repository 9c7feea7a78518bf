"""Dockerfiles: parser directives, line continuations, comments, instructions with their
flags and JSON (exec) or shell forms, and ``$VAR`` substitution.

Pure functions, no I/O: the executor (:mod:`husk.build.executor`) gives meaning to the
instructions. Heredocs (``<<EOF``) are not supported and said so.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

from husk.errors import InvalidArgument, NotSupported

MAX_DOCKERFILE = 4 * 1024 * 1024
MAX_EXPANSION = 1024 * 1024
"""Bytes a substitution may add to an instruction's text (``$A$A$A…`` of a large ``A``,
doubled line after line, would otherwise grow without end)."""
INSTRUCTIONS = frozenset(
    {
        "FROM",
        "RUN",
        "CMD",
        "LABEL",
        "MAINTAINER",
        "EXPOSE",
        "ENV",
        "ADD",
        "COPY",
        "ENTRYPOINT",
        "VOLUME",
        "USER",
        "WORKDIR",
        "ARG",
        "ONBUILD",
        "STOPSIGNAL",
        "HEALTHCHECK",
        "SHELL",
    }
)
_DIRECTIVE = re.compile(r"^#\s*([a-zA-Z][a-zA-Z0-9]*)\s*=\s*(.+?)\s*$")
_FLAG = re.compile(r"^--([a-z][a-z-]*)(?:=(.*))?$")


class DockerfileError(InvalidArgument):
    """The Dockerfile cannot be parsed."""


@dataclass
class Instruction:
    keyword: str
    text: str  # the arguments as written (continuations joined), flags removed
    line: int
    flags: dict[str, str] = field(default_factory=dict)
    exec_form: list[str] | None = None  # the JSON array form, when used
    original: str = ""  # the whole instruction as written (for history and errors)

    def __str__(self) -> str:
        return self.original or f"{self.keyword} {self.text}"


@dataclass
class Dockerfile:
    instructions: list[Instruction]
    escape: str = "\\"
    warnings: list[str] = field(default_factory=list)


def parse(text: str) -> Dockerfile:
    """The Dockerfile ``text``; DockerfileError on a malformed one."""
    if len(text) > MAX_DOCKERFILE:
        raise DockerfileError(f"the Dockerfile is larger than {MAX_DOCKERFILE} bytes")
    lines = text.splitlines()
    escape, warnings, start = _directives(lines)
    instructions: list[Instruction] = []
    pending: list[str] = []
    first_line = 0
    for number, raw in enumerate(lines[start:], start=start + 1):
        stripped = raw.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if pending and stripped.startswith("#"):
            continue  # comments inside a continued instruction are dropped, as Docker does
        if not pending:
            first_line = number
        body = raw.rstrip()
        if body.endswith(escape):
            pending.append(body[: -len(escape)])
            continue
        if pending and not stripped:
            continue  # an empty line in a continuation
        pending.append(body)
        instructions.append(_instruction("".join(pending), first_line))
        pending = []
    if pending:
        instructions.append(_instruction("".join(pending), first_line))
    if not instructions:
        raise DockerfileError("the Dockerfile has no instructions")
    return Dockerfile(instructions, escape, warnings)


def _directives(lines: list[str]) -> tuple[str, list[str], int]:
    escape = "\\"
    warnings: list[str] = []
    seen: set[str] = set()
    index = 0
    for index, line in enumerate(lines):  # noqa: B007 - the index is the result
        match = _DIRECTIVE.match(line.strip()) if line.strip().startswith("#") else None
        if match is None:
            break
        name, value = match.group(1).lower(), match.group(2)
        if name in seen:
            raise DockerfileError(f"only one {name} parser directive can be used")
        seen.add(name)
        if name == "escape":
            if value not in ("\\", "`"):
                raise DockerfileError(f"invalid escape token {value!r}: must be ` or \\")
            escape = value
        elif name == "syntax":
            warnings.append(
                f"the syntax parser directive ({value}) is ignored: husk has one parser"
            )
        elif name == "check":
            warnings.append("the check parser directive is ignored")
        else:
            break
    else:
        index = len(lines)
    return escape, warnings, index


def _instruction(line: str, number: int) -> Instruction:
    keyword, _, rest = line.strip().partition(" ")
    if "\t" in keyword:
        keyword, _, more = keyword.partition("\t")
        rest = more + " " + rest
    keyword = keyword.upper()
    if keyword not in INSTRUCTIONS:
        raise DockerfileError(f"line {number}: unknown instruction: {keyword}")
    rest = rest.strip()
    flags: dict[str, str] = {}
    if keyword in ("FROM", "COPY", "ADD", "RUN", "HEALTHCHECK"):
        while rest.startswith("--"):
            token, _, remainder = rest.partition(" ")
            match = _FLAG.match(token)
            if match is None:
                raise DockerfileError(f"line {number}: malformed flag {token!r}")
            name = match.group(1)
            flags[name] = match.group(2) if match.group(2) is not None else "true"
            rest = remainder.strip()
    if (
        "<<" in rest
        and keyword in ("RUN", "COPY", "ADD")
        and re.search(r"<<-?[\"']?[A-Za-z_]", rest)
    ):
        raise NotSupported(f"line {number}: heredocs in {keyword} are not supported by husk build")
    exec_form = None
    if rest.startswith("[") and keyword in (
        "RUN",
        "CMD",
        "ENTRYPOINT",
        "SHELL",
        "COPY",
        "ADD",
        "VOLUME",
        "HEALTHCHECK",
    ):
        exec_form = _json_array(rest)
    return Instruction(keyword, rest, number, flags, exec_form, line.strip())


def _json_array(text: str) -> list[str] | None:
    try:
        value = json.loads(text)
    except (ValueError, RecursionError):  # a deep nest of brackets: RecursionError
        return None  # not JSON: the shell form, as Docker falls back
    if isinstance(value, list) and all(isinstance(item, str) for item in value):
        return value
    return None


# -- substitution ---------------------------------------------------------------

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def substitute(text: str, env: dict[str, str], escape: str = "\\") -> str:
    """``$VAR``, ``${VAR}``, ``${VAR:-default}`` and ``${VAR:+alternative}`` of ``env``;
    ``escape`` before ``$`` keeps it literal. Quotes are kept (the shell or the
    instruction's own word splitting deals with them)."""
    out: list[str] = []
    size = 0  # characters the variables added
    i = 0
    in_single = False
    while i < len(text):
        if size > MAX_EXPANSION:
            raise DockerfileError(
                f"substituting variables in {text!r:.80} adds more than {MAX_EXPANSION} characters"
            )
        c = text[i]
        if c == escape and i + 1 < len(text) and text[i + 1] == "$":
            out.append("$")
            i += 2
            continue
        if c == "'":
            in_single = not in_single
        if c != "$" or in_single or i + 1 >= len(text):
            out.append(c)
            i += 1
            continue
        if text[i + 1] == "{":
            end = text.find("}", i + 2)
            if end < 0:
                raise DockerfileError(f"missing '}}' in {text!r:.200}")
            out.append(_braced(text[i + 2 : end], env, escape))
            size += len(out[-1])
            i = end + 1
            continue
        match = _NAME.match(text, i + 1)
        if match is None:
            out.append(c)
            i += 1
            continue
        out.append(env.get(match.group(0), ""))
        size += len(out[-1])
        i = match.end()
    if size > MAX_EXPANSION:
        raise DockerfileError(
            f"substituting variables in {text!r:.80} adds more than {MAX_EXPANSION} characters"
        )
    return "".join(out)


def _braced(body: str, env: dict[str, str], escape: str) -> str:
    match = _NAME.match(body)
    if match is None:
        raise DockerfileError(f"bad substitution: ${{{body}}}")
    name, rest = match.group(0), body[match.end() :]
    value = env.get(name)
    if not rest:
        return value or ""
    if rest.startswith(":-"):
        return value if value else substitute(rest[2:], env, escape)
    if rest.startswith(":+"):
        return substitute(rest[2:], env, escape) if value else ""
    if rest.startswith("-"):
        return value if value is not None else substitute(rest[1:], env, escape)
    if rest.startswith("+"):
        return substitute(rest[1:], env, escape) if value is not None else ""
    raise DockerfileError(f"unsupported modifier in ${{{body}}}")


def words(text: str) -> list[str]:
    """Whitespace-separated words with double and single quotes removed (ENV, LABEL,
    ARG, EXPOSE, VOLUME, COPY's shell form); a backslash keeps the next character."""
    result: list[str] = []
    current: list[str] = []
    quote = ""
    have = False
    i = 0
    while i < len(text):
        c = text[i]
        if quote:
            if c == quote:
                quote = ""
            elif c == "\\" and quote == '"' and i + 1 < len(text):
                i += 1
                current.append(text[i])
            else:
                current.append(c)
        elif c in "\"'":
            quote = c
            have = True
        elif c == "\\" and i + 1 < len(text):
            i += 1
            current.append(text[i])
            have = True
        elif c.isspace():
            if current or have:
                result.append("".join(current))
            current, have = [], False
        else:
            current.append(c)
            have = True
        i += 1
    if quote:
        raise DockerfileError(f"unmatched quote in {text!r:.200}")
    if current or have:
        result.append("".join(current))
    return result


def key_values(text: str, keyword: str) -> list[tuple[str, str]]:
    """ENV / LABEL / ARG pairs: ``k=v k2="v 2"`` or the old ``ENV k v w`` form."""
    items = words(text)
    if not items:
        raise DockerfileError(f"{keyword} requires at least one argument")
    if "=" not in items[0]:
        if keyword == "ARG":
            return [(items[0], "\0")] if len(items) == 1 else _bad(keyword, text)
        if len(items) < 2:
            raise DockerfileError(f"{keyword} {text}: expected NAME VALUE or NAME=VALUE")
        # The old form: the rest of the line, as written, is the value.
        name = items[0]
        value = text.strip()[len(text.strip().split(None, 1)[0]) :].strip()
        return [(name, " ".join(words(value)) if value[:1] in "\"'" else value)]
    pairs = []
    for item in items:
        name, sep, value = item.partition("=")
        if not name:
            raise DockerfileError(f"{keyword} {text}: a name is empty")
        if not sep:
            if keyword == "ARG":
                pairs.append((name, "\0"))
                continue
            raise DockerfileError(f"{keyword} {text}: {item!r} is not NAME=VALUE")
        pairs.append((name, value))
    return pairs


def _bad(keyword: str, text: str) -> list[tuple[str, str]]:
    raise DockerfileError(f"{keyword} {text}: expected one NAME[=DEFAULT]")
