"""husk.settings: every environment variable and config.json key, read through one API."""

from __future__ import annotations

import ast
import json
import os
import stat
from pathlib import Path

import pytest

from husk import paths, settings
from husk.errors import BundleError, InvalidArgument

SRC = Path(__file__).resolve().parent.parent / "src" / "husk"


def _environment_reads(tree: ast.AST) -> list[int]:
    """Lines that read os.environ / os.getenv / os.environb."""
    names = ("environ", "getenv", "environb")
    lines = []
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Attribute)
            and node.attr in names
            and isinstance(node.value, ast.Name)
            and node.value.id == "os"
        ) or (
            isinstance(node, ast.ImportFrom)
            and node.module == "os"
            and any(alias.name in names for alias in node.names)
        ):
            lines.append(node.lineno)
    return lines


# `husk run -e NAME` copies the caller's NAME into the container, `husk build --build-arg
# NAME` into the build: user data, not a setting.
PASSTHROUGH = {"cli/createopts.py", "cli/build.py"}


def test_no_host_module_reads_the_environment_but_settings() -> None:
    offenders = []
    for path in sorted(SRC.rglob("*.py")):
        relative = path.relative_to(SRC).as_posix()
        if relative.startswith("guest/") or relative == "settings.py" or relative in PASSTHROUGH:
            continue  # the guest runs in the VM with its own environment
        for line in _environment_reads(ast.parse(path.read_text(encoding="utf-8"))):
            offenders.append(f"{relative}:{line}")
    assert offenders == []


def test_every_variable_is_documented_in_the_table() -> None:
    doc = settings.__doc__ or ""
    for name in settings.VARIABLES:
        assert name in doc, name


def test_an_undeclared_variable_cannot_be_read(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HUSK_SOMETHING_NEW", "1")
    with pytest.raises(KeyError, match="not a husk setting"):
        settings.raw("HUSK_SOMETHING_NEW")


def test_empty_means_unset(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HUSK_QEMU", "")
    assert settings.qemu_command() is None
    monkeypatch.setenv("HUSK_QEMU", "qemu-custom")
    assert settings.qemu_command() == "qemu-custom"


@pytest.mark.parametrize(
    ("value", "on"),
    [("1", True), ("TRUE", True), (" yes ", True), ("on", True), ("0", False), ("no", False)],
)
def test_flags(monkeypatch: pytest.MonkeyPatch, value: str, on: bool) -> None:
    monkeypatch.setenv("HUSK_NO_JAIL", value)
    monkeypatch.setenv("HUSK_NO_TEMPLATE", value)
    assert settings.jail_disabled() is on
    assert settings.templates_disabled_by_env() is on


def test_accelerator(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HUSK_ACCEL", raising=False)
    assert settings.accel_requested() == "auto"
    assert settings.forced_accel() is None
    monkeypatch.setenv("HUSK_ACCEL", " TCG ")
    assert settings.forced_accel() == "tcg"
    monkeypatch.setenv("HUSK_ACCEL", "xen")
    assert settings.accel_requested() == "xen"
    with pytest.raises(InvalidArgument, match="HUSK_ACCEL=xen is not one of kvm, tcg, auto"):
        settings.forced_accel()


def test_daemon_start_timeout(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HUSK_DAEMON_START_TIMEOUT", raising=False)
    assert settings.daemon_start_timeout() == settings.DEFAULT_START_TIMEOUT
    monkeypatch.setenv("HUSK_DAEMON_START_TIMEOUT", "2.5")
    assert settings.daemon_start_timeout() == 2.5
    monkeypatch.setenv("HUSK_DAEMON_START_TIMEOUT", "soon")
    with pytest.raises(InvalidArgument, match="number of seconds"):
        settings.daemon_start_timeout()
    monkeypatch.setenv("HUSK_DAEMON_START_TIMEOUT", "0")
    with pytest.raises(InvalidArgument, match="must be positive"):
        settings.daemon_start_timeout()


def test_source_date_epoch(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SOURCE_DATE_EPOCH", raising=False)
    assert settings.source_date_epoch() == 0
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")
    assert settings.source_date_epoch() == 1700000000
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "yesterday")
    with pytest.raises(BundleError, match="not an integer"):
        settings.source_date_epoch()


def test_insecure_registries(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HUSK_INSECURE_REGISTRIES", " Reg.example:5000, ,other ")
    assert settings.insecure_registries() == {"reg.example:5000", "other"}


def test_directories_and_socket(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HUSK_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("HUSK_RUN_DIR", str(tmp_path / "run"))
    monkeypatch.delenv("HUSK_SOCKET", raising=False)
    assert paths.data_dir() == tmp_path / "data"
    assert paths.socket_path() == tmp_path / "run" / "husk.sock"
    monkeypatch.setenv("HUSK_SOCKET", str(tmp_path / "elsewhere.sock"))
    assert paths.socket_path() == tmp_path / "elsewhere.sock"
    if os.geteuid() != 0:
        monkeypatch.delenv("HUSK_DATA_DIR")
        monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
        assert paths.data_dir() == tmp_path / "xdg" / "husk"
    else:
        monkeypatch.delenv("HUSK_DATA_DIR")
        monkeypatch.delenv("HUSK_RUN_DIR")
        assert paths.data_dir() == Path("/var/lib/husk")
        assert paths.run_dir() == Path("/run/husk")


def test_the_daemon_and_the_client_agree_on_the_socket() -> None:
    from husk.client import daemon as client_daemon
    from husk.daemon import location

    assert client_daemon.socket_path() == location.socket_path() == paths.socket_path()


def test_config_json(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HUSK_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.delenv("HUSK_NO_TEMPLATE", raising=False)
    assert settings.read_config() == {}
    assert settings.templates_enabled()
    assert settings.warm_pool() == settings.WarmPoolSetting()
    settings.set_config("templates", False)
    settings.set_warm_pool(settings.WarmPoolSetting(2, 256 << 20, 1.5))
    path = tmp_path / "data" / "config.json"
    assert json.loads(path.read_text()) == {
        "templates": False,
        "warm_pool": {"size": 2, "memory": 256 << 20, "cpus": 1.5},
    }
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert not settings.templates_enabled()
    assert settings.warm_pool() == settings.WarmPoolSetting(2, 256 << 20, 1.5)
    settings.set_warm_pool(settings.WarmPoolSetting(0))
    assert settings.read_config() == {"templates": False}
    assert [p.name for p in path.parent.iterdir()] == ["config.json"]  # no temporaries left


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{not json", "cannot read husk settings"),
        ("[1, 2]", "must hold a JSON object"),
        ('{"templates": "no"}', "must be true or false"),
    ],
)
def test_a_bad_config_is_named(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, content: str, message: str
) -> None:
    monkeypatch.setenv("HUSK_DATA_DIR", str(tmp_path))
    monkeypatch.delenv("HUSK_NO_TEMPLATE", raising=False)
    (tmp_path / "config.json").write_text(content)
    with pytest.raises(InvalidArgument, match=message):
        settings.templates_enabled()
    before = (tmp_path / "config.json").read_text()
    if message == "must be true or false":
        return
    with pytest.raises(InvalidArgument, match="cannot read husk settings"):
        settings.set_config("templates", True)
    assert (tmp_path / "config.json").read_text() == before  # never overwritten
