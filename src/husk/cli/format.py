"""Docker's output shapes: aligned tables, human sizes and durations, ``--format`` templates.

``--format`` takes the subset of Go's text/template that Docker users write:
``{{.Field}}``, nested fields, method calls such as ``{{.Label "key"}}``,
pipelines (``{{.Names | upper}}``) and Docker's template functions (json,
join, split, lower, upper, title, truncate, pad, println, len, index,
printf). ``table`` prefixes a header row and aligns columns; ``json`` prints
each item as one JSON line. Control actions (if, range, with …) are refused
with a clear error instead of being half-understood.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable
from typing import Any

from husk.errors import InvalidArgument, NotSupported

# Sizes and durations live in husk.humanize (the Docker API uses them too).
from husk.humanize import binary_size as binary_size
from husk.humanize import escape_controls
from husk.humanize import human_duration as human_duration
from husk.humanize import human_size as human_size

# Go's tabwriter as Docker configures it: minimum cell width 10, padding 3.
TABLE_MIN_WIDTH = 10
TABLE_PADDING = 3

# -- terminal safety ---------------------------------------------------------
#
# Process lists, names, labels, image config strings and messages that come from a
# guest or an image are attacker-controlled text. Printed raw, ESC/CSI sequences can
# rewrite the screen, set the window title, or (on some terminals) answer back into
# the user's shell. Every string of that kind passes through escape_text() before the
# CLI prints it: C0 controls, DEL and C1 controls become visible escapes (tab and
# newline too, unless the caller keeps them). ``logs`` and attached output stay raw:
# that is the workload's own stdout, as in Docker.

# The same set as JSON escapes: json.dumps already escapes C0, not DEL or C1.
_JSON_UNESCAPED_CONTROLS = re.compile("[\x7f-\x9f]")


def escape_text(text: str, *, keep: str = "") -> str:
    r"""``text`` with every control character but those in ``keep`` shown as an escape.

    ESC ``[31m`` becomes the seven characters ``\x1b[31m``; tab, newline and carriage
    return become ``\t``, ``\n``, ``\r`` (:func:`husk.humanize.escape_controls`).
    """
    return escape_controls(text, keep=keep)


def escape_json_text(text: str) -> str:
    r"""JSON text (from ``json.dumps``) with DEL and C1 controls as ``\u00XX`` too."""
    return _JSON_UNESCAPED_CONTROLS.sub(lambda m: f"\\u{ord(m.group(0)):04x}", text)


def safe_json(value: Any, **options: Any) -> str:
    """``json.dumps`` whose output has no raw control character (C0, DEL or C1)."""
    return escape_json_text(json.dumps(value, ensure_ascii=False, **options))


def escaped_row(cells: Iterable[Any]) -> str:
    """One table row (tab-separated) from untrusted cells, each escaped."""
    return "\t".join(escape_text(str(cell)) for cell in cells)


def align_table(lines: Iterable[str]) -> str:
    """Align tab-separated cells into columns; the text after the last tab is not padded.

    Cells are escaped again (escaping is idempotent) so that no table prints a raw
    terminal control, whoever built its lines.
    """
    rows = [[escape_text(cell, keep="\n") for cell in line.split("\t")] for line in lines]
    widths: list[int] = []
    for cells in rows:
        for index, cell in enumerate(cells[:-1]):
            if index == len(widths):
                widths.append(0)
            widths[index] = max(widths[index], len(cell))
    out = []
    for cells in rows:
        padded = [
            cell.ljust(max(TABLE_MIN_WIDTH, widths[index] + TABLE_PADDING))
            for index, cell in enumerate(cells[:-1])
        ]
        out.append(("".join(padded) + cells[-1]).rstrip() if len(cells) > 1 else cells[0])
    return "\n".join(out)


def truncate_text(text: str, width: int) -> str:
    """Cut to ``width`` characters, marking the cut with an ellipsis."""
    if len(text) <= width:
        return text
    return text[: max(width - 1, 0)] + "…"


# -- templates ---------------------------------------------------------------

_ACTION = re.compile(r"\{\{(-\s)?(.*?)(\s-)?\}\}", re.S)
_TOKEN = re.compile(r'\s*("(?:[^"\\]|\\.)*"|`[^`]*`|\||[^\s|"`]+)')
_CONTROL_WORDS = {"if", "else", "end", "range", "with", "define", "template", "block", "break"}


class Template:
    """A parsed ``--format`` string, rendered once per item."""

    def __init__(self, text: str) -> None:
        self.source = text
        self._parts: list[str | list[list[str]]] = []
        position = 0
        for match in _ACTION.finditer(text):
            literal = text[position : match.start()]
            if match.group(1):
                literal = literal.rstrip()
            if literal:
                self._parts.append(literal)
            self._parts.append(_parse_pipeline(match.group(2), text))
            position = match.end()
            if match.group(3):
                rest = text[position:]
                position += len(rest) - len(rest.lstrip())
        if text[position:]:
            self._parts.append(text[position:])

    def render(self, item: Any) -> str:
        """The template applied to ``item``; what the item's fields hold is escaped."""
        out = []
        for part in self._parts:
            if isinstance(part, str):
                out.append(part)
            else:
                text = to_text(_run_pipeline(part, item, self.source))
                out.append(_escape_action(part, text))
        return "".join(out)


def _escape_action(commands: list[list[str]], text: str) -> str:
    """An action's output with the controls of untrusted fields escaped.

    ``json`` output is already escaped (as JSON). Otherwise only the control characters
    the format itself produces survive: those in its own string literals (a ``join``
    separator of ``"\\n"``) and the newline of ``println``.
    """
    if commands[-1][0] == "json":
        return escape_json_text(text)
    keep = "".join(_literal_text(token) for command in commands for token in command)
    if any(command[0] == "println" for command in commands):
        keep += "\n"
    return escape_text(text, keep=keep)


def _literal_text(token: str) -> str:
    """The characters a string literal of the format stands for ("" for other tokens)."""
    if token.startswith("`"):
        return token
    if token.startswith('"'):
        try:
            return str(json.loads(token, strict=False))
        except ValueError:
            return token
    return ""


def _parse_pipeline(body: str, source: str) -> list[list[str]]:
    tokens = [m.group(1) for m in _TOKEN.finditer(body)]
    if not tokens:
        raise InvalidArgument(f"empty action {{{{}}}} in format {source!r}")
    if tokens[0] in _CONTROL_WORDS:
        raise NotSupported(
            f"format {source!r}: {{{{{tokens[0]}}}}} is not supported; "
            "use fields ({{.Name}}), pipes and functions such as json, join, upper, truncate"
        )
    commands: list[list[str]] = [[]]
    for token in tokens:
        if token == "|":
            commands.append([])
        else:
            commands[-1].append(token)
    if any(not command for command in commands):
        raise InvalidArgument(f"empty command in pipeline {body.strip()!r} of format {source!r}")
    return commands


def _run_pipeline(commands: list[list[str]], item: Any, source: str) -> Any:
    value: Any = _NO_VALUE
    for command in commands:
        args = [_operand(token, item, source) for token in command[1:]]
        if value is not _NO_VALUE:
            args.append(value)
        head = command[0]
        if head.startswith(".") or head.startswith('"') or head[0].isdigit():
            target = _operand(head, item, source)
            value = target(*args) if callable(target) else target
            if not callable(target) and args:
                raise InvalidArgument(f"format {source!r}: {head} takes no arguments")
        elif head in FUNCTIONS:
            try:
                value = FUNCTIONS[head](*args)
            except TypeError:
                raise InvalidArgument(
                    f"format {source!r}: wrong number of arguments for {head}"
                ) from None
        else:
            raise InvalidArgument(
                f"format {source!r}: unknown function {head!r} "
                f"(known: {', '.join(sorted(FUNCTIONS))})"
            )
    return value


class _NoValue:
    pass


_NO_VALUE = _NoValue()


def _operand(token: str, item: Any, source: str) -> Any:
    if token.startswith('"'):
        try:
            # strict=False: --format's \t and \n are already real characters here.
            return json.loads(token, strict=False)
        except ValueError:
            raise InvalidArgument(f"format {source!r}: bad string {token}") from None
    if token.startswith("`"):
        return token[1:-1]
    if token == ".":
        return item
    if token.startswith("."):
        value = item
        for name in token[1:].split("."):
            value = _field(value, name, source)
        return value
    try:
        return int(token)
    except ValueError:
        raise InvalidArgument(f"format {source!r}: cannot understand {token!r}") from None


def _field(value: Any, name: str, source: str) -> Any:
    if isinstance(value, dict):
        if name in value:
            return value[name]
        raise InvalidArgument(
            f"format {source!r}: no field {name!r}"
            + (f" (fields: {', '.join(sorted(value))})" if value else "")
        )
    fields = getattr(value, "template_fields", None)
    if fields is not None and name in fields:
        return getattr(value, name)
    raise InvalidArgument(
        f"format {source!r}: no field {name!r}"
        + (f" (fields: {', '.join(fields)})" if fields else "")
    )


def to_text(value: Any) -> str:
    """Go's default printing of a value in a template."""
    if value is None or value is _NO_VALUE:
        return "<no value>"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return value
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if isinstance(value, list | tuple):
        return "[" + " ".join(to_text(v) for v in value) + "]"
    if isinstance(value, dict):
        return "map[" + " ".join(f"{k}:{to_text(v)}" for k, v in sorted(value.items())) + "]"
    as_dict = getattr(value, "as_dict", None)
    if as_dict is not None:
        return to_text(as_dict())
    return str(value)


def _json(value: Any) -> str:
    as_dict = getattr(value, "as_dict", None)
    return safe_json(as_dict() if as_dict is not None else value)


def _join(items: Any, separator: str) -> str:
    return separator.join(to_text(item) for item in items)


def _split(text: str, separator: str) -> list[str]:
    return text.split(separator)


def _pad(text: Any, left: int, right: int) -> str:
    return " " * left + to_text(text) + " " * right


def _truncate(text: Any, width: int) -> str:
    return to_text(text)[:width]


def _index(collection: Any, *keys: Any) -> Any:
    value = collection
    for key in keys:
        try:
            value = value[key]
        except (KeyError, IndexError, TypeError):
            return None
    return value


def _printf(pattern: str, *args: Any) -> str:
    converted = re.sub(
        r"%[-+ #0]*\d*(?:\.\d+)?[vsdqf]", lambda m: _printf_spec(m.group(0)), pattern
    )
    try:
        return converted % tuple(to_text(a) if not isinstance(a, int | float) else a for a in args)
    except (TypeError, ValueError):
        raise InvalidArgument(f"printf {pattern!r}: arguments do not match") from None


def _printf_spec(spec: str) -> str:
    kind = spec[-1]
    if kind in "vq":
        return spec[:-1] + ("r" if kind == "q" else "s")
    return spec


FUNCTIONS: dict[str, Callable[..., Any]] = {
    "json": _json,
    "join": _join,
    "split": _split,
    "lower": lambda text: to_text(text).lower(),
    "upper": lambda text: to_text(text).upper(),
    "title": lambda text: to_text(text).title(),
    "pad": _pad,
    "truncate": _truncate,
    "println": lambda *args: " ".join(to_text(a) for a in args) + "\n",
    "print": lambda *args: "".join(to_text(a) for a in args),
    "printf": _printf,
    "len": lambda value: len(value),
    "index": _index,
}


def expand_escapes(text: str) -> str:
    """Docker replaces a literal ``\\t`` and ``\\n`` in --format with the characters."""
    return text.replace("\\t", "\t").replace("\\n", "\n")


class Formatter:
    """Renders items for a command's ``--format`` (or its default table)."""

    def __init__(self, spec: str, default_table: str, headers: dict[str, str]) -> None:
        spec = expand_escapes(spec or "table")
        self.json_lines = spec.strip() == "json"
        self.table = spec == "table" or spec.startswith("table ")
        if self.json_lines:
            body = "{{json .}}"
        elif spec == "table":
            body = default_table
        elif self.table:
            body = spec[len("table ") :]
        else:
            body = spec
        self.template = Template(body)
        self.headers = headers

    def render(self, items: Iterable[Any]) -> str:
        """All lines, aligned when a table; empty string when nothing to print."""
        lines = [self.template.render(item) for item in items]
        if not self.table:
            return "\n".join(lines)
        header = self.template.render(_HeaderRow(self.headers))
        return align_table([header, *lines])


class _HeaderRow:
    """Answers every field with its column title (``CONTAINER ID`` for ``.ID``)."""

    def __init__(self, headers: dict[str, str]) -> None:
        self.headers = headers
        self.template_fields = list(headers)

    def __getattr__(self, name: str) -> Any:
        headers = self.__dict__.get("headers", {})
        if name in headers:
            title = headers[name]
            # Methods such as .Label "k" are called with arguments: answer with the title.
            return _Title(title)
        raise AttributeError(name)


class _Title(str):
    def __call__(self, *args: Any) -> str:
        return str(self)
