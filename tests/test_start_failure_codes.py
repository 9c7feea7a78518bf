"""Typed start failures (no VM): the guest's ERROR frame carries its kind and exit code,
and the daemon's error body carries it on to the CLI."""

from __future__ import annotations

import json
from typing import Any

import pytest

from husk.agent import messages
from husk.cli.exitcodes import start_failure_exit_code
from husk.client.http import error_for
from husk.daemon.docker.errors import error_response
from husk.errors import GuestError, HuskError, InvalidArgument, NotFound, StartFailed
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


# -- the exit code travels to the CLI in the daemon's error body ----------------------


def _error_body(err: HuskError) -> tuple[int, dict[str, Any]]:
    response = error_response(err.http_status, err.message, err.exit_code)
    assert isinstance(response.body, bytes)
    return response.status, json.loads(response.body)


def test_a_failed_start_carries_its_exit_code_beside_dockers_message() -> None:
    status, body = _error_body(StartFailed("failed to start container c: exec: x", 127))
    assert (status, body) == (
        400,
        {"message": "failed to start container c: exec: x", "ExitCode": 127},
    )
    status, body = _error_body(StartFailed("cannot mount", 128))
    assert (status, body["ExitCode"]) == (500, 128)
    # An exec that could not start: the guest's code rides on its GuestError.
    _, body = _error_body(GuestError("no such file", guest_kind="command_not_found", exit_code=127))
    assert body["ExitCode"] == 127


def test_other_errors_keep_dockers_bare_message() -> None:
    assert _error_body(NotFound("No such container: x")) == (
        404,
        {"message": "No such container: x"},
    )


@pytest.mark.parametrize("code", [126, 127, 128])
def test_the_client_reads_the_exit_code_back(code: int) -> None:
    status, body = _error_body(StartFailed("failed", code))
    err = error_for(status, json.dumps(body).encode())
    assert err.exit_code == code


def test_the_client_ignores_an_exit_code_of_another_type() -> None:
    for value in ("127", 127.0, None, True, [127]):
        body = json.dumps({"message": "exec: command not found", "ExitCode": value}).encode()
        assert error_for(400, body).exit_code is None


@pytest.mark.parametrize(
    ("code", "cli"), [(127, 127), (126, 126), (128, 125), (None, 125), (0, 125), (1, 125)]
)
def test_the_cli_exit_code_is_the_recorded_one_or_125(code: int | None, cli: int) -> None:
    err = InvalidArgument('exec: "nope": executable file not found in $PATH')
    err.exit_code = code
    assert start_failure_exit_code(err) == cli


def test_the_cli_never_reads_the_words_of_the_message() -> None:
    """The old CLI made 127 of any message naming a command that was "not found"."""
    for message in (
        'exec: "x": executable file not found in $PATH',
        "exec: permission denied",
        "the command cannot execute: exec format error",
    ):
        assert start_failure_exit_code(errors_from_body(message)) == 125


def errors_from_body(message: str) -> HuskError:
    return error_for(400, json.dumps({"message": message}).encode())
