"""Files husk-runtime writes where another local user may have planted a link
(docs/SECURITY.md, "husk-runtime")."""

from __future__ import annotations

from pathlib import Path

import pytest

from husk.ociruntime import cli
from husk.ociruntime.errors import RuntimeFailure


def test_spec_never_writes_through_a_dangling_link(tmp_path: Path) -> None:
    """``husk-runtime spec`` (as root, in a bundle directory others can write to) checked
    that config.json did not exist by following links: a dangling link another user
    planted there made it create the file the link named, anywhere."""
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o1777)
    target = tmp_path / "cron.d-entry"
    (shared / "config.json").symlink_to(target)
    with pytest.raises(RuntimeFailure, match=r"config\.json exists"):
        cli.run(["spec", "--bundle", str(shared)])
    assert not target.exists()


def test_spec_writes_a_fresh_config(tmp_path: Path) -> None:
    assert cli.run(["spec", "--bundle", str(tmp_path)]) == 0
    assert '"ociVersion"' in (tmp_path / "config.json").read_text()
    with pytest.raises(RuntimeFailure, match=r"config\.json exists"):
        cli.run(["spec", "--bundle", str(tmp_path)])


def test_json_nested_too_deep_is_a_clear_refusal(tmp_path: Path) -> None:
    """A config.json, --process file or --resources nested 100,000 brackets deep raised
    RecursionError out of json.loads: a traceback instead of the one-line error."""
    from husk.ociruntime import bundle, resources

    deep = "[" * 100_000
    (tmp_path / "config.json").write_text(deep)
    with pytest.raises(RuntimeFailure, match="not valid JSON"):
        bundle.read_config(tmp_path)
    with pytest.raises(RuntimeFailure, match="not valid JSON"):
        resources.read("-", deep)
