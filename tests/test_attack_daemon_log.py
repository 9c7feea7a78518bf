"""A guest's text in the daemon's log: one record is one line, with no terminal controls.

Guest-chosen strings reach the daemon's log (an agent's refusal of a published port's
connection, its error messages, a container's fault): raw, a newline forged whole log
records (``... WARNING husk.runtime: container X ...``) and ESC sequences rewrote the
terminal of whoever read the log or ran the daemon in the foreground. No VM: the
daemon's own logging set-up with a message as the port relay logs it."""

from __future__ import annotations

import logging
import logging.handlers
from collections.abc import Iterator
from pathlib import Path

import pytest

from husk.daemon.server import setup_logging

FORGED = "x\n2026-11-30 00:00:00,000 WARNING husk.runtime.container: forged\r\x1b]0;owned\x07\x9b2J"


@pytest.fixture
def daemon_logging(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    monkeypatch.setenv("HUSK_RUN_DIR", str(tmp_path / "run"))
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    setup_logging(debug=False)
    try:
        yield tmp_path / "run" / "daemon.log"
    finally:
        for handler in list(root.handlers):
            root.removeHandler(handler)
            handler.close()
        for handler in saved[0]:
            root.addHandler(handler)
        root.setLevel(saved[1])


def test_a_guests_text_is_one_escaped_line_of_the_daemons_log(daemon_logging: Path) -> None:
    logger = logging.getLogger("husk.runtime.ports")
    logger.info("connection to container port %d refused: %s", 80, FORGED)
    record = logger.makeRecord(
        logger.name, logging.INFO, __file__, 0, "refused: %s", (FORGED,), None
    )
    # The file and stderr (pytest adds capture handlers of its own).
    kinds = (logging.StreamHandler, logging.handlers.RotatingFileHandler)
    handlers = [h for h in logging.getLogger().handlers if type(h) in kinds]
    assert len(handlers) == 2
    for handler in handlers:
        handler.flush()
    shown = [daemon_logging.read_text(), *(handler.format(record) for handler in handlers)]
    for written in shown:
        lines = written.splitlines()
        assert len(lines) == 1, lines
        assert "refused: x\\n2026-11-30" in lines[0]
        assert not any(ord(c) < 0x20 or 0x7F <= ord(c) < 0xA0 for c in lines[0]), lines[0]


def test_the_daemons_own_tracebacks_stay_readable(daemon_logging: Path) -> None:
    try:
        raise ValueError("boom")
    except ValueError:
        logging.getLogger("husk.daemon").exception("a failure")
    text = daemon_logging.read_text()
    assert "a failure\nTraceback (most recent call last):" in text
    assert "ValueError: boom" in text
