"""Every function-level import in src/husk says why it is not at the top of its module.

Imports belong at the top (issue 11): the layering contracts (tests/test_layers.py) keep
the graph acyclic, so an import inside a function is needed only where start-up time
asks for it (the CLI), where it would break a layer rule or a cycle, or for an optional
dependency. Such an import carries a comment on its own line or on the line before it;
a comment above a group of consecutive function-level imports covers the group.
"""

from __future__ import annotations

import ast
import functools
import io
import tokenize
from dataclasses import dataclass
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parent.parent / "src" / "husk"

# Files tolerated while they still fail (a restructuring in progress); none today.
PENDING: frozenset[str] = frozenset()


@dataclass(frozen=True)
class LazyImport:
    line: int
    text: str


def _function_imports(tree: ast.Module) -> list[ast.Import | ast.ImportFrom]:
    found: list[ast.Import | ast.ImportFrom] = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if in_function and isinstance(child, ast.Import | ast.ImportFrom):
                found.append(child)
            nested = in_function or isinstance(
                child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda
            )
            visit(child, nested)

    visit(tree, False)
    return found


def unexplained_imports(source: str) -> list[LazyImport]:
    """Function-level imports with no comment on their line, or above them (or their group)."""
    imports = _function_imports(ast.parse(source))
    if not imports:
        return []
    comments = {
        token.start[0]
        for token in tokenize.generate_tokens(io.StringIO(source).readline)
        if token.type == tokenize.COMMENT
    }
    lines = source.splitlines()
    import_lines = {n for node in imports for n in range(node.lineno, (node.end_lineno or 0) + 1)}
    bad = []
    for node in imports:
        if any(n in comments for n in range(node.lineno, (node.end_lineno or node.lineno) + 1)):
            continue
        above = node.lineno - 1
        # Skip blank lines and the group's other imports, up to what precedes the group.
        while above > 0 and (above in import_lines or not lines[above - 1].strip()):
            above -= 1
        if above in comments and lines[above - 1].lstrip().startswith("#"):
            continue
        bad.append(LazyImport(node.lineno, lines[node.lineno - 1].strip()))
    return bad


@functools.cache
def _failures() -> dict[str, list[LazyImport]]:
    failures = {}
    for path in sorted(SRC.rglob("*.py")):
        bad = unexplained_imports(path.read_text(encoding="utf-8"))
        if bad:
            failures[path.relative_to(SRC).as_posix()] = bad
    return failures


def test_every_function_level_import_says_why() -> None:
    failures = {name: bad for name, bad in _failures().items() if name not in PENDING}
    report = [f"src/husk/{name}:{i.line}: {i.text}" for name, bad in failures.items() for i in bad]
    assert not report, (
        "function-level imports without a comment saying why (move them to the top, or "
        "say why not: CLI start-up cost, a layer rule or cycle, an optional dependency):\n"
        + "\n".join(report)
    )


def test_the_pending_list_names_only_files_that_still_fail() -> None:
    failing = set(_failures())
    stale = sorted(name for name in PENDING if name not in failing)
    assert not stale, f"these files pass now: remove them from PENDING: {stale}"


# -- the checker itself ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "source",
    [
        "import os\n\ndef f():\n    return os.sep\n",
        "def f():\n    import json  # lazy: a reason\n    return json\n",
        "def f():\n    # lazy: a reason\n    import json\n    return json\n",
        # one comment heads a group (isort puts a blank line between its sections)
        "def f():\n    # lazy: a reason\n    import json\n\n    from os import path\n",
        "def f():\n    from os import (  # lazy: a reason\n        path,\n        sep,\n    )\n",
        "if True:\n    import json\n",
    ],
)
def test_explained_or_module_level_imports_pass(source: str) -> None:
    assert unexplained_imports(source) == []


@pytest.mark.parametrize(
    ("source", "line"),
    [
        ("def f():\n    import json\n    return json\n", 2),
        ("def f():\n    x = 1  # a comment about x\n    import json\n", 3),
        ("class C:\n    def m(self):\n        from os import path\n", 3),
        ("async def f():\n    def g():\n        import json\n", 3),
        # a comment above the code before the import does not count
        ("def f():\n    # about x\n    x = 1\n    import json\n", 4),
        ("def f():\n    s = '# not a comment'\n    import json\n", 3),
    ],
)
def test_an_unexplained_function_level_import_is_caught(source: str, line: int) -> None:
    assert [i.line for i in unexplained_imports(source)] == [line]
