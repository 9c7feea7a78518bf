"""Typed start failures: the guest's ERROR frame carries its kind and exit code (no VM)."""

from __future__ import annotations

import pytest

from husk.agent import messages
from husk.errors import GuestError, StartFailed
from husk.guest import protocol
from husk.guest.protocol import Decoder, Frame
from husk.runtime.faults import exec_exit_code, start_exit_code


def _frame(wire: bytes) -> Frame:
    (frame,) = Decoder().feed(wire)
    assert isinstance(frame, Frame)
    return frame


def test_error_frames_carry_kind_and_exit_code() -> None:
    wire = protocol.encode_error(
        5, 'exec: "/x": executable file not found', protocol.ERROR_COMMAND_NOT_FOUND, 127
    )
    error = messages.error(_frame(wire), "cannot start the process")
    assert isinstance(error, messages.GuestRefused)
    assert (error.guest_kind, error.exit_code) == ("command_not_found", 127)
    assert start_exit_code(error) == 127
    assert exec_exit_code(error) == 127


def test_old_agents_error_frames_stay_readable() -> None:
    """An agent that sends no exit code: a start is Docker's 128, an exec 126."""
    wire = protocol.encode_json(protocol.MsgType.ERROR, 5, {"message": "no such file"})
    error = messages.error(_frame(wire))
    assert isinstance(error, messages.GuestRefused)
    assert (error.guest_kind, error.exit_code) == ("error", None)
    # The words of the message decide nothing any more.
    assert start_exit_code(error) == 128
    assert exec_exit_code(error) == 126


@pytest.mark.parametrize(
    ("kind", "code", "start", "exec_"),
    [
        (protocol.ERROR_COMMAND_NOT_FOUND, 127, 127, 127),
        (protocol.ERROR_NOT_EXECUTABLE, 126, 126, 126),
        # A missing user or a bad workdir: Docker records 128 for a run, 126 for an exec.
        (protocol.ERROR_SPAWN_FAILED, 126, 128, 126),
    ],
)
def test_exit_codes_of_each_kind(kind: str, code: int, start: int, exec_: int) -> None:
    error = GuestError("permission denied, not found", guest_kind=kind, exit_code=code)
    assert start_exit_code(error) == start
    assert exec_exit_code(error) == exec_


def test_a_failure_outside_the_guest_is_128() -> None:
    assert start_exit_code(OSError("executable file not found")) == 128
    assert start_exit_code(TimeoutError()) == 128


def test_an_exit_code_out_of_range_is_a_malformed_message() -> None:
    wire = protocol.encode_json(
        protocol.MsgType.ERROR, 5, {"message": "x", "code": "command_not_found", "exit_code": 999}
    )
    assert isinstance(messages.error(_frame(wire)), messages.MalformedMessage)


def test_start_failed_answers_400_for_the_clients_mistakes() -> None:
    assert StartFailed("x", 127).http_status == 400
    assert StartFailed("x", 126).http_status == 400
    assert StartFailed("x", 128).http_status == 500
    assert StartFailed("x").exit_code == 128
