"""The guest bundle as an OCI artifact in a real registry: push, pull, offline fallback."""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from husk.bundle.artifact import ARTIFACT_TYPE, pull, push
from husk.bundle.locate import Bundle
from husk.errors import NotFound, PullFailed
from registry_fixtures import RunningRegistry

pytestmark = pytest.mark.registry


def _unreachable_host() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{sock.getsockname()[1]}"  # closed again: nothing listens there


def test_push_pull_up_to_date_and_offline(
    guest_bundle: Bundle,
    registry: RunningRegistry,
    tmp_path: Path,
) -> None:
    reference = f"{registry.host}/husk/bundle:test"
    digest = asyncio.run(push(reference, guest_bundle.kernel.parent))
    manifest = json.loads(registry.inspect("husk/bundle:test", raw=True))  # read by skopeo
    assert manifest["artifactType"] == ARTIFACT_TYPE
    assert manifest["config"]["mediaType"].startswith("application/vnd.husk")

    target = tmp_path / "bundle"
    first = asyncio.run(pull(reference, target))
    assert first.action == "installed" and first.manifest_digest == digest
    assert first.bundle.digest == guest_bundle.digest
    assert (target / "vmlinux").read_bytes() == guest_bundle.kernel.read_bytes()
    stamp = (target / "initramfs.cpio").stat().st_mtime_ns

    again = asyncio.run(pull(reference, target))
    assert again.action == "up-to-date"
    assert (target / "initramfs.cpio").stat().st_mtime_ns == stamp  # not re-extracted

    offline = asyncio.run(pull(f"{_unreachable_host()}/husk/bundle:test", target))
    assert offline.action == "offline-cached"
    assert "registry unreachable" in offline.warning
    assert offline.bundle.digest == guest_bundle.digest

    with pytest.raises(PullFailed, match="no bundle is cached"):
        asyncio.run(pull(f"{_unreachable_host()}/husk/bundle:test", tmp_path / "empty"))

    with pytest.raises(NotFound, match="not found"):
        asyncio.run(pull(f"{registry.host}/husk/bundle:missing-tag", tmp_path / "other"))
    assert not (tmp_path / "other").exists()  # nothing half-installed


def test_cli_pull_warns_and_keeps_the_cache(guest_bundle: Bundle, tmp_path: Path) -> None:
    import os

    env = dict(os.environ, HUSK_DATA_DIR=str(tmp_path))
    (tmp_path / "bundle").symlink_to(guest_bundle.kernel.parent, target_is_directory=True)
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            "from husk.cli.main import main; main()",
            "bundle",
            "pull",
            f"{_unreachable_host()}/husk/bundle:test",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "warning: registry unreachable" in result.stderr
    assert result.stdout.startswith("offline-cached: sha256:")
