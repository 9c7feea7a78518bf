"""The import-linter contracts in pyproject.toml hold, and a breach of each kind is caught.

The breaches are made in a scratch copy of the source tree, so the real tree is never
touched: an upward import (a base module importing the CLI), the guest importing a host
module, a cycle between siblings, and a new top-level module that no layer names.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("importlinter", reason="import-linter is in the test extras")

ROOT = Path(__file__).resolve().parent.parent
LINT = (
    "import sys; from importlinter.cli import lint_imports; "
    "sys.exit(lint_imports(no_cache=True, no_logo=True))"
)


def lint(project: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(project / "src")}
    return subprocess.run(
        [sys.executable, "-c", LINT],
        cwd=project,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.fixture
def scratch(tmp_path: Path) -> Path:
    shutil.copytree(ROOT / "src" / "husk", tmp_path / "src" / "husk")
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    return tmp_path


def test_the_tree_keeps_every_contract() -> None:
    result = lint(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


def test_the_scratch_copy_is_what_gets_linted(scratch: Path) -> None:
    # Without a breach the copy passes: the failures below come from the breach alone.
    result = lint(scratch)
    assert result.returncode == 0, result.stdout + result.stderr


def _append(path: Path, line: str) -> None:
    path.write_text(path.read_text(encoding="utf-8") + f"\n{line}\n", encoding="utf-8")


@pytest.mark.parametrize(
    ("module", "line", "expected"),
    [
        # a base module reaching up to the CLI
        ("errors.py", "from husk.cli import main as _upward", "husk.errors -> husk.cli"),
        # the runtime reaching up to the daemon
        ("runtime/names.py", "import husk.daemon.location", "husk.runtime.names -> husk.daemon"),
        # the VM layer reaching up to the runtime
        ("vm/processes.py", "import husk.runtime.store", "husk.vm.processes -> husk.runtime"),
        # the client reaching across to the daemon (they are independent)
        ("client/http.py", "import husk.daemon.location", "husk.client.http -> husk.daemon"),
    ],
)
def test_an_upward_import_breaks_the_layers(
    scratch: Path, module: str, line: str, expected: str
) -> None:
    _append(scratch / "src" / "husk" / module, line)
    result = lint(scratch)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "husk imports only downward" in result.stdout
    assert expected in result.stdout


def test_the_guest_importing_a_host_module_is_caught(scratch: Path) -> None:
    _append(scratch / "src" / "husk" / "guest" / "protocol.py", "import husk.errors")
    result = lint(scratch)
    assert result.returncode == 1
    assert "imports only the standard" in result.stdout
    assert "husk.guest.protocol -> husk.errors" in result.stdout


def test_a_cycle_between_siblings_is_caught(scratch: Path) -> None:
    # husk.oci.store already imports husk.oci.locks; the reverse closes a cycle.
    _append(scratch / "src" / "husk" / "oci" / "locks.py", "import husk.oci.store")
    result = lint(scratch)
    assert result.returncode == 1
    assert "no import cycles between sibling modules BROKEN" in result.stdout


def test_a_module_without_a_layer_is_caught(scratch: Path) -> None:
    (scratch / "src" / "husk" / "unplaced.py").write_text('"""Nobody placed me."""\n')
    result = lint(scratch)
    assert result.returncode == 1
    assert "husk.unplaced" in result.stdout + result.stderr
