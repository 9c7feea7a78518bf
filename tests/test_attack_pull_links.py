"""A dead pull's staging tree against links: what its layers made and what stands in the
cache under a staging tree's name (docs/SECURITY.md, "Reviewed and held")."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from husk.oci import rootfs
from husk.oci.rootfs import RootfsBuild


@pytest.fixture(autouse=True)
def isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HUSK_DATA_DIR", str(tmp_path / "data"))


def test_removing_a_dead_pulls_tree_never_follows_a_link(tmp_path: Path) -> None:
    """A dead pull's staging tree holds whatever its layers made, links to host
    directories included, and a name in the cache may itself be a link: their removal
    deletes the links, never what they point at."""
    outside = tmp_path / "outside"
    (outside / "etc").mkdir(parents=True)
    (outside / "etc" / "keep").write_text("host file\n")
    cache = rootfs.rootfs_dir()
    cache.mkdir(parents=True, exist_ok=True)
    dead = cache / ".pull-dead-1"
    (dead / "rootfs").mkdir(parents=True)
    os.symlink(outside / "etc", dead / "rootfs" / "etc")
    os.symlink(outside, cache / ".pull-link-1")
    hour_ago = time.time() - 3600
    for tree in (dead, cache / ".pull-link-1"):
        os.utime(tree, (hour_ago, hour_ago), follow_symlinks=False)
    diff_ids = ["sha256:" + "ab" * 32]
    build = RootfsBuild.begin_speculative(diff_ids, names=["x"])
    assert build is not None
    build.close()
    for _ in range(100):  # the trash is emptied by a thread
        if not any(cache.glob(".trash*")):
            break
        time.sleep(0.05)
    assert not dead.exists()
    assert (outside / "etc" / "keep").read_text() == "host file\n"
    assert (cache / ".pull-link-1").is_symlink()  # not a tree of ours: left alone
