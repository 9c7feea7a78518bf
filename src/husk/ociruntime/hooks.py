"""OCI hooks: host programs an engine asks the runtime to run at points of a container's life.

The engine's own network plumbing depends on them: the docker engine's libnetwork puts a
container on its networks from a ``prestart`` hook, given the container's state (its pid,
whose network namespace it configures) on stdin. husk-runtime runs them as runc does, on
the host, with the state on stdin and the hook's own arguments, environment and timeout:

* ``prestart`` and ``createRuntime`` at ``create``, once the container's network
  namespace exists and before the VM takes its interfaces (a failure fails ``create``);
* ``poststart`` once the workload started, ``poststop`` once the container is gone
  (failures are logged: the container's fate is decided by then).

``createContainer`` and ``startContainer`` run inside the container's namespaces in runc
(after its root is pivoted); a husk container's namespaces are in its VM, so bundles with
them are refused rather than half-served.
"""

from __future__ import annotations

import json
import subprocess
from dataclasses import dataclass, field
from typing import Any

from husk.ociruntime.errors import RuntimeFailure

KINDS = ("prestart", "createRuntime", "createContainer", "startContainer", "poststart", "poststop")
NOT_RUN = ("createContainer", "startContainer")
"""Hooks runc runs inside the container's namespaces: they would run in the VM's."""
MAX_HOOKS = 64
MAX_ARGS = 1024
MAX_TIMEOUT = 3600
DEFAULT_TIMEOUT = 120.0
"""A hook without a timeout still gets one: a hung hook must not hang the engine."""
_OUTPUT_TAIL = 500


@dataclass(frozen=True)
class Hook:
    path: str
    args: list[str] = field(default_factory=list)
    env: list[str] = field(default_factory=list)
    timeout: float = DEFAULT_TIMEOUT


def parse(data: Any) -> dict[str, list[Hook]]:
    """config.json's ``hooks``; RuntimeFailure naming the first field that is wrong."""
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise RuntimeFailure("config.json: hooks must be an object")
    hooks: dict[str, list[Hook]] = {}
    for kind, entries in data.items():
        if kind not in KINDS:
            raise RuntimeFailure(f"config.json: unknown hook kind {str(kind)[:40]!r}")
        if entries is None:
            continue
        if not isinstance(entries, list) or len(entries) > MAX_HOOKS:
            raise RuntimeFailure(f"config.json: hooks.{kind} must be a list of at most {MAX_HOOKS}")
        parsed = [_hook(entry, f"hooks.{kind}[{index}]") for index, entry in enumerate(entries)]
        if parsed:
            hooks[kind] = parsed
    refused = [kind for kind in NOT_RUN if kind in hooks]
    if refused:
        raise RuntimeFailure(
            f"{', '.join(refused)} hooks are not supported by husk-runtime: they run in the "
            "container's namespaces, which are in its VM"
        )
    return hooks


def _hook(entry: Any, where: str) -> Hook:
    if not isinstance(entry, dict):
        raise RuntimeFailure(f"config.json: {where} must be an object")
    path = entry.get("path")
    if not isinstance(path, str) or not path.startswith("/") or "\0" in path:
        raise RuntimeFailure(f"config.json: {where}.path must be an absolute path")
    args, env = entry.get("args", []), entry.get("env", [])
    for name, value in (("args", args), ("env", env)):
        if not isinstance(value, list) or len(value) > MAX_ARGS:
            raise RuntimeFailure(f"config.json: {where}.{name} must be a list of strings")
        if not all(isinstance(item, str) and "\0" not in item for item in value):
            raise RuntimeFailure(f"config.json: {where}.{name} must be a list of strings")
    if not all("=" in item for item in env):
        raise RuntimeFailure(f"config.json: {where}.env entries must be NAME=value")
    timeout = entry.get("timeout")
    if timeout is None:
        seconds = DEFAULT_TIMEOUT
    elif isinstance(timeout, int) and not isinstance(timeout, bool) and 0 < timeout <= MAX_TIMEOUT:
        seconds = float(timeout)
    else:
        raise RuntimeFailure(f"config.json: {where}.timeout must be 1 to {MAX_TIMEOUT} seconds")
    return Hook(path, list(args), list(env), seconds)


def state_document(
    container_id: str, status: str, pid: int, bundle: str, annotations: dict[str, str]
) -> dict[str, Any]:
    """The container's state as a hook reads it on stdin (the runtime spec's state)."""
    return {
        "ociVersion": "1.0.2",
        "id": container_id,
        "status": status,
        "pid": pid,
        "bundle": bundle,
        "annotations": annotations,
    }


def run(kind: str, hooks: list[Hook], state: dict[str, Any]) -> None:
    """Runs ``hooks`` in order; RuntimeFailure for the first that fails or times out."""
    stdin = json.dumps(state).encode()
    for index, hook in enumerate(hooks):
        argv = hook.args or [hook.path]
        env = dict(item.split("=", 1) for item in hook.env)
        what = f"{kind} hook #{index} ({hook.path})"
        try:
            done = subprocess.run(
                argv,
                executable=hook.path,
                input=stdin,
                env=env,
                capture_output=True,
                timeout=hook.timeout,
                check=False,
                cwd="/",
            )
        except subprocess.TimeoutExpired:
            raise RuntimeFailure(f"{what} did not finish within {hook.timeout:.0f}s") from None
        except OSError as exc:
            raise RuntimeFailure(f"{what} cannot run: {exc.strerror or exc}") from None
        if done.returncode != 0:
            output = (done.stderr or done.stdout).decode(errors="replace").strip()
            detail = output[-_OUTPUT_TAIL:].replace("\n", " ") or "no output"
            raise RuntimeFailure(f"{what} failed with exit status {done.returncode}: {detail}")
