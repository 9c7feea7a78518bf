"""OCI hooks as husk-runtime runs them: checked like the rest of config.json, run as runc
runs them (argv, environment, the state on stdin, a timeout), failures named."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from husk.ociruntime import hooks
from husk.ociruntime.errors import RuntimeFailure

STATE = hooks.state_document("c1", "creating", 4242, "/bundle", {"a": "b"})


def _script(tmp_path: Path, body: str) -> str:
    path = tmp_path / "hook.sh"
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(0o755)
    return str(path)


def test_a_hook_gets_its_argv_environment_and_the_state_on_stdin(tmp_path: Path) -> None:
    out = tmp_path / "out"
    path = _script(tmp_path, f'echo "$0 $1 $HOOKVAR" > {out}; cat >> {out}\n')
    parsed = hooks.parse(
        {"prestart": [{"path": path, "args": ["name0", "first"], "env": ["HOOKVAR=v"]}]}
    )
    hooks.run("prestart", parsed["prestart"], STATE)
    first, state = out.read_text().split("\n", 1)
    assert first == f"{path} first v"  # a script's $0 is its path, whatever argv[0] was
    assert json.loads(state) == STATE
    assert STATE["pid"] == 4242 and STATE["ociVersion"] == "1.0.2"


def test_a_failing_or_hung_hook_is_one_clear_error(tmp_path: Path) -> None:
    failing = hooks.parse({"prestart": [{"path": _script(tmp_path, "echo broken >&2; exit 3\n")}]})
    with pytest.raises(RuntimeFailure, match=r"prestart hook #0 .* exit status 3: broken"):
        hooks.run("prestart", failing["prestart"], STATE)
    hung = [hooks.Hook(_script(tmp_path, "sleep 30\n"), timeout=0.5)]
    with pytest.raises(RuntimeFailure, match="did not finish within"):
        hooks.run("poststart", hung, STATE)
    missing = hooks.parse({"poststop": [{"path": str(tmp_path / "absent")}]})
    with pytest.raises(RuntimeFailure, match="cannot run"):
        hooks.run("poststop", missing["poststop"], STATE)


@pytest.mark.parametrize(
    ("data", "words"),
    [
        ([], "hooks must be an object"),
        ({"prestart": [{"path": "relative"}]}, "path must be an absolute path"),
        ({"prestart": [{"path": "/x", "args": "sh -c x"}]}, "args must be a list of strings"),
        ({"prestart": [{"path": "/x", "env": ["NOEQUALS"]}]}, "NAME=value"),
        ({"prestart": [{"path": "/x", "timeout": 0}]}, "timeout must be 1 to"),
        ({"prestart": [{"path": "/x", "timeout": True}]}, "timeout must be 1 to"),
        ({"prestart": [{"path": "/x"}] * 65}, "at most 64"),
        ({"preStart": []}, "unknown hook kind"),
        ({"startContainer": [{"path": "/x"}]}, "not supported by husk-runtime"),
        ({"createContainer": [{"path": "/x"}]}, "not supported by husk-runtime"),
    ],
)
def test_bad_hooks_are_refused_naming_the_field(data: Any, words: str) -> None:
    with pytest.raises(RuntimeFailure, match=words):
        hooks.parse(data)


def test_empty_hook_lists_are_no_hooks() -> None:
    assert hooks.parse(None) == {}
    assert hooks.parse({"prestart": [], "poststop": None}) == {}
    assert os.path.isabs(hooks.parse({"poststop": [{"path": "/bin/true"}]})["poststop"][0].path)
