"""Terminal control characters from a guest or an image never reach the user's terminal raw.

Unit tests of the one escaping helper (``husk.cli.format.escape_text``) and of every
output shape that prints guest- or image-controlled text through it: ``--format``
templates and tables (ps, stats, df), ``top``'s table, ``inspect``'s JSON and error
lines. No daemon, no VM.
"""

from __future__ import annotations

import json
import re
from typing import Any

import pytest

from husk.cli import format as fmt
from husk.cli.ps import DEFAULT_TABLE, HEADERS, ContainerRow
from husk.cli.system_ops import _verbose_df

# A window-title change, a screen clear, an 8-bit CSI, a bell, a backspace, DEL, NUL.
HOSTILE = "a\x1b]0;pwned\x07b\x1b[2Jc\x9b31md\x08e\x7ff\x00g"
RAW_CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def no_raw_controls(text: str) -> bool:
    """Nothing a terminal would act on (tab and newline are layout, not commands)."""
    return RAW_CONTROL.search(text) is None


def test_escape_text_makes_every_control_visible() -> None:
    escaped = fmt.escape_text(HOSTILE)
    assert escaped == "a\\x1b]0;pwned\\x07b\\x1b[2Jc\\x9b31md\\x08e\\x7ff\\x00g"
    assert fmt.escape_text("tab\there\nnew\rline") == "tab\\there\\nnew\\rline"
    assert fmt.escape_text("a\tb\nc", keep="\t\n") == "a\tb\nc"


def test_escape_text_leaves_printable_text_alone_and_is_idempotent() -> None:
    text = "café ünïcödé 日本 \\x1b already-escaped / path:80->80/tcp"
    assert fmt.escape_text(text) == text
    once = fmt.escape_text(HOSTILE)
    assert fmt.escape_text(once) == once


def test_safe_json_escapes_c1_and_del_and_stays_valid_json() -> None:
    text = fmt.safe_json({"cmd": HOSTILE})
    assert no_raw_controls(text)
    assert json.loads(text) == {"cmd": HOSTILE}  # the same data, nothing lost


def _summary(**extra: Any) -> dict[str, Any]:
    return {
        "Id": "3c15f0372217" * 5 + "abcd",
        "Names": ["/web"],
        "Image": "busybox",
        "Command": "sh -c 'sleep 1000' " + HOSTILE,
        "Created": 1_700_000_000,
        "Ports": [],
        "Labels": {"evil": HOSTILE},
        "State": "running",
        "Status": "Up 2 minutes",
        **extra,
    }


@pytest.mark.parametrize(
    "spec",
    [
        "",
        "table {{.Command}}\t{{.Labels}}",
        '{{.Command}} {{.Label "evil"}}',
        "{{.Command | upper}}",
        '{{printf "%s" .Command}}',
        '{{.Command | split " " | len}} {{.Labels | lower}}',
    ],
)
def test_ps_output_escapes_what_the_guest_or_image_chose(spec: str) -> None:
    row = ContainerRow(_summary(), truncate=False, now=1_700_000_100)
    output = fmt.Formatter(spec, DEFAULT_TABLE, HEADERS).render([row])
    assert no_raw_controls(output), repr(output)
    assert "\\x1b" in output or "\\X1B" in output


def test_ps_json_format_keeps_the_data_as_escaped_json() -> None:
    row = ContainerRow(_summary(), truncate=False, now=1_700_000_100)
    output = fmt.Formatter("json", DEFAULT_TABLE, HEADERS).render([row])
    assert no_raw_controls(output)
    assert HOSTILE in json.loads(output)["Command"]


def test_a_guest_value_cannot_add_rows_or_columns_to_a_table() -> None:
    row = ContainerRow(_summary(Command="x\n\tFAKE ROW"), truncate=False, now=1_700_000_100)
    output = fmt.Formatter("", DEFAULT_TABLE, HEADERS).render([row])
    assert len(output.splitlines()) == 2  # header and one row
    assert "\\n\\tFAKE ROW" in output


def test_the_formats_own_separators_survive() -> None:
    item = {"A": "one", "B": ["x", "y"]}
    assert fmt.Template('{{.A}}\t{{join .B "\\n"}}').render(item) == "one\tx\ny"
    assert fmt.Template("{{println .A}}").render(item) == "one\n"


def test_align_table_escapes_cells_from_any_caller() -> None:
    table = fmt.align_table(["NAME\tCMD", f"x\t{HOSTILE}"])
    assert no_raw_controls(table)
    assert "\\x1b]0;pwned" in table


def test_escaped_row_keeps_the_cells_apart() -> None:
    row = fmt.escaped_row(["1", "root", "sh\t-c " + HOSTILE])
    assert row.count("\t") == 2
    assert no_raw_controls(row)


def test_verbose_df_escapes_image_and_container_strings() -> None:
    usage = {
        "Images": [{"RepoTags": [f"evil{HOSTILE}:latest"], "Id": "sha256:" + "a" * 64}],
        "Containers": [{"Id": "b" * 64, "Image": HOSTILE, "Command": HOSTILE, "Names": ["/c"]}],
    }
    assert no_raw_controls(_verbose_df(usage))


def test_error_lines_are_escaped(capsys: pytest.CaptureFixture[str]) -> None:
    from husk.cli.main import main
    from husk.errors import GuestError

    class Boom:
        def __call__(self, *args: Any, **kwargs: Any) -> None:
            raise GuestError(f"guest process failed: {HOSTILE}")

    import husk.cli.main as cli_main

    original = cli_main.cli.main
    cli_main.cli.main = Boom()  # type: ignore[method-assign]
    try:
        with pytest.raises(SystemExit) as exited:
            main(["ps"])
    finally:
        cli_main.cli.main = original  # type: ignore[method-assign]
    assert exited.value.code == 125
    err = capsys.readouterr().err
    assert err.startswith("husk: guest process failed: a\\x1b]0;pwned")
    assert no_raw_controls(err)
