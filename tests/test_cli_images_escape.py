"""``husk images`` and ``husk image …`` print no terminal control an image chose.

An image's name and tag are checked references (no control character can be in
one), but its config is its author's text: labels, history, author, the created
time. The image here is a real one in a real store, built with a label holding a
window-title change, a screen clear, an 8-bit CSI, a backspace, DEL and NUL.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner

from daemon_fixtures import RunningDaemon, short_root, start_daemon
from husk.cli.images import format_table
from husk.cli.main import cli
from testimages import ImageSpec, Layer, LayoutWriter, file

HOSTILE = "a\x1b]0;pwned\x07b\x1b[2Jc\x9b31md\x08e\x7ff\x00g"
RAW_CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f]")


@pytest.fixture(scope="module")
def daemon() -> Iterator[RunningDaemon]:
    """The image commands go through a daemon: one of this module's own (no VM needed)."""
    root = short_root("husk-esc-")
    running = start_daemon(root)
    try:
        yield running
    finally:
        running.stop()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def hostile_image(daemon: RunningDaemon, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv("HUSK_DATA_DIR", str(daemon.data_dir))
    monkeypatch.setenv("HUSK_RUN_DIR", str(daemon.run_dir))
    from husk.oci.archive import load_path
    from husk.oci.store import ImageStore

    writer = LayoutWriter(tmp_path / "layout")
    spec = ImageSpec(layers=[Layer([file("x.txt", "x")], "gzip")], labels={"evil": HOSTILE})
    writer.tag(writer.image(spec), "latest")
    load_path(tmp_path / "layout", store=ImageStore(), name="hostile:v1")
    return "hostile:v1"


def test_image_inspect_prints_labels_escaped_and_as_valid_json(hostile_image: str) -> None:
    result = CliRunner().invoke(cli, ["image", "inspect", hostile_image])
    assert result.exit_code == 0, result.output
    assert RAW_CONTROL.search(result.output) is None, repr(result.output)
    [document] = json.loads(result.output)
    assert document["Config"]["Labels"]["evil"] == HOSTILE  # nothing lost


def test_images_table_and_json_print_no_raw_controls(hostile_image: str) -> None:
    for args in (["images"], ["images", "--format", "json"], ["image", "ls", "--digests"]):
        result = CliRunner().invoke(cli, args)
        assert result.exit_code == 0, result.output
        assert "hostile" in result.output
        assert RAW_CONTROL.search(result.output) is None, repr(result.output)


def test_table_cells_are_escaped_and_cannot_add_rows() -> None:
    table = format_table([["REPOSITORY", "TAG"], ["evil\nfake-row", HOSTILE]])
    assert RAW_CONTROL.search(table) is None
    assert len(table.splitlines()) == 2
    assert "evil\\nfake-row" in table
