"""The CLI's parsing and output shapes, without a daemon: option → API body, tables, templates."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from husk import errors
from husk.cli import format as fmt
from husk.cli.containers import format_port_lines
from husk.cli.cp import Placement, place_copy, split_cp_arg, stat_is_dir
from husk.cli.createopts import build_create_request
from husk.cli.ps import DEFAULT_TABLE, HEADERS, ContainerRow, format_ports, parse_filters
from husk.cli.stats import StatsRow, cpu_percent, io_totals, memory_used
from husk.cli.system_ops import summarize_df
from husk.cli.timeparse import api_timestamp, parse_duration, parse_timestamp

NOW = 1_700_000_000.0

SUMMARY = {
    "Id": "3c15f03722171234567890abcdef3c15f03722171234567890abcdef12345678",
    "Names": ["/web"],
    "Image": "husk.local/busybox",
    "Command": "sh -c 'mkdir -p /www; exec httpd -f'",
    "Created": int(NOW) - 125,
    "Ports": [
        {"IP": "127.0.0.1", "PrivatePort": 80, "PublicPort": 18080, "Type": "tcp"},
        {"PrivatePort": 443, "Type": "tcp"},
    ],
    "Labels": {"tier": "front", "app": "demo"},
    "State": "running",
    "Status": "Up 2 minutes",
}


def _options(**given: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "env": (),
        "env_file": (),
        "volume": (),
        "tmpfs": (),
        "publish": (),
        "expose": (),
        "label": (),
        "label_file": (),
        "restart": "no",
        "pull_policy": "missing",
    }
    base.update(given)
    return base


# ------------------------------------------------------------------ ps output


def test_ps_default_table_matches_docker_layout() -> None:
    row = ContainerRow(SUMMARY, truncate=True, now=NOW)
    output = fmt.Formatter("", DEFAULT_TABLE, HEADERS).render([row])
    header, line = output.splitlines()
    assert header == (
        "CONTAINER ID   IMAGE                COMMAND                  CREATED         "
        "STATUS         PORTS                              NAMES"
    )
    assert line.startswith('3c15f0372217   husk.local/busybox   "sh -c \'mkdir -p /ww…"   ')
    assert "2 minutes ago" in line
    assert line.endswith("127.0.0.1:18080->80/tcp, 443/tcp   web")


def test_ps_empty_table_is_only_the_header_padded_like_docker() -> None:
    output = fmt.Formatter("", DEFAULT_TABLE, HEADERS).render([])
    assert output == ("CONTAINER ID   IMAGE     COMMAND   CREATED   STATUS    PORTS     NAMES")


def test_ps_custom_formats() -> None:
    row = ContainerRow(SUMMARY, truncate=False, now=NOW)
    assert fmt.Formatter("{{.Names}}: {{.State}}", DEFAULT_TABLE, HEADERS).render([row]) == (
        "web: running"
    )
    assert fmt.Formatter('{{.Label "tier"}}|{{.Labels}}', "", HEADERS).render([row]) == (
        "front|app=demo,tier=front"
    )
    assert fmt.Formatter("{{.ID}}", "", HEADERS).render([row]) == SUMMARY["Id"]
    assert fmt.Formatter("{{.Names | upper}}", "", HEADERS).render([row]) == "WEB"
    table = fmt.Formatter("table {{.Names}}\\t{{.Status}}", "", HEADERS).render([row])
    assert table.splitlines() == ["NAMES     STATUS", "web       Up 2 minutes"]


def test_ps_json_format_has_docker_keys() -> None:
    import json

    row = ContainerRow(SUMMARY, truncate=True, now=NOW)
    doc = json.loads(fmt.Formatter("json", DEFAULT_TABLE, HEADERS).render([row]))
    assert doc["ID"] == "3c15f0372217"
    assert doc["Names"] == "web"
    assert doc["Ports"] == "127.0.0.1:18080->80/tcp, 443/tcp"
    assert doc["RunningFor"] == "2 minutes ago"
    assert set(doc) >= {"Command", "CreatedAt", "Image", "Labels", "State", "Status", "Size"}


def test_format_errors_are_clear() -> None:
    row = ContainerRow(SUMMARY, truncate=True, now=NOW)
    with pytest.raises(errors.InvalidArgument, match="no field 'Nmes'"):
        fmt.Formatter("{{.Nmes}}", "", HEADERS).render([row])
    with pytest.raises(errors.NotSupported, match=r"\{\{range\}\} is not supported"):
        fmt.Formatter("{{range .Names}}x{{end}}", "", HEADERS)
    with pytest.raises(errors.InvalidArgument, match="unknown function 'frobnicate'"):
        fmt.Formatter("{{frobnicate .ID}}", "", HEADERS).render([row])


def test_template_on_nested_documents() -> None:
    doc = {"State": {"Status": "exited", "ExitCode": 7}, "Config": {"Env": ["A=1", "B=2"]}}
    assert fmt.Template("{{.State.Status}} {{.State.ExitCode}}").render(doc) == "exited 7"
    assert fmt.Template('{{join .Config.Env ","}}').render(doc) == "A=1,B=2"
    assert fmt.Template("{{json .State}}").render(doc) == '{"Status": "exited", "ExitCode": 7}'
    assert fmt.Template("{{index .Config.Env 1}}").render(doc) == "B=2"
    assert fmt.Template("{{- .State.Status -}}  !").render(doc) == "exited!"


def test_filters_parse_into_the_api_shape() -> None:
    assert parse_filters(("status=exited", "label=a=b", "status=created")) == {
        "status": ["exited", "created"],
        "label": ["a=b"],
    }
    with pytest.raises(errors.InvalidArgument, match="expected name=value"):
        parse_filters(("exited",))


def test_ports_summary() -> None:
    assert format_ports([]) == ""
    assert (
        format_ports(
            [
                {"IP": "::", "PrivatePort": 53, "PublicPort": 5353, "Type": "udp"},
                {"IP": "0.0.0.0", "PrivatePort": 53, "PublicPort": 5353, "Type": "udp"},
            ]
        )
        == "0.0.0.0:5353->53/udp, [::]:5353->53/udp"
    )


# ---------------------------------------------------------- sizes and durations


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0.2, "Less than a second"),
        (1, "1 second"),
        (45, "45 seconds"),
        (90, "About a minute"),
        (600, "10 minutes"),
        (3600, "About an hour"),
        (5 * 3600, "5 hours"),
        (3 * 86400, "3 days"),
        (20 * 86400, "2 weeks"),
        (90 * 86400, "3 months"),
        (800 * 86400, "2 years"),
    ],
)
def test_human_duration(seconds: float, text: str) -> None:
    assert fmt.human_duration(seconds) == text


def test_sizes() -> None:
    assert fmt.human_size(0) == "0B"
    assert fmt.human_size(999) == "999B"
    assert fmt.human_size(1234) == "1.23kB"
    assert fmt.human_size(25_300_000) == "25.3MB"
    assert fmt.binary_size(1536 * 1024) == "1.5MiB"
    assert fmt.binary_size(457.6 * 1024 * 1024) == "457.6MiB"


def test_align_table_pads_like_go_tabwriter() -> None:
    assert fmt.align_table(["A\tBBBBBBBBBBBB\tC", "xx\ty\tz"]).splitlines() == [
        "A         BBBBBBBBBBBB   C",
        "xx        y              z",
    ]


# ------------------------------------------------------------ times and durations


def test_go_durations() -> None:
    assert parse_duration("30s") == 30
    assert parse_duration("1m30s") == 90
    assert parse_duration("500ms") == 0.5
    assert parse_duration("1h") == 3600
    assert parse_duration("0") == 0
    for bad in ("", "10", "5 s", "1x", "s"):
        with pytest.raises(errors.InvalidArgument):
            parse_duration(bad)


def test_since_and_until_times() -> None:
    assert parse_timestamp("1700000000") == 1_700_000_000
    assert parse_timestamp("10m", now=NOW) == NOW - 600
    assert parse_timestamp("2023-11-14T22:13:20Z") == 1_700_000_000
    assert parse_timestamp("2023-11-14T22:13:20.123456789Z") == pytest.approx(1_700_000_000.123456)
    assert api_timestamp(1_700_000_000.5) == "1700000000.500000000"
    with pytest.raises(errors.InvalidArgument, match="invalid --since"):
        parse_timestamp("yesterday", "--since")


# ------------------------------------------------------------- create options


def test_create_body_from_docker_flags(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    env_file = tmp_path / "env"
    env_file.write_text("# comment\nFROM_FILE=1\n\nPASSED\n")
    monkeypatch.setenv("PASSED", "from-host")
    monkeypatch.delenv("UNSET_VAR", raising=False)
    request = build_create_request(
        "husk.local/busybox",
        ("sh", "-c", "echo hi"),
        _options(
            interactive=True,
            tty=True,
            auto_remove=True,
            name="web",
            env=("A=1", "UNSET_VAR", "EMPTY="),
            env_file=(str(env_file),),
            volume=("/srv/data:/data:ro", "/tmp:/scratch"),
            tmpfs=("/run:size=64m,mode=1777",),
            publish=("127.0.0.1:8080:80", "53/udp"),
            publish_all=True,
            workdir="/data",
            user="1000:1000",
            entrypoint="",
            cpus=1.5,
            memory="512m",
            hostname="box",
            label=("tier=front", "flag"),
            health_cmd="wget -q -O- localhost",
            health_interval="5s",
            health_retries=2,
            stop_signal="SIGINT",
            stop_timeout=3,
        ),
        attach=True,
    )
    body = request.body
    assert body["Image"] == "husk.local/busybox"
    assert body["Cmd"] == ["sh", "-c", "echo hi"]
    assert body["Entrypoint"] == [""]
    assert body["Env"] == ["FROM_FILE=1", "PASSED=from-host", "A=1", "EMPTY="]
    assert body["Tty"] is True and body["OpenStdin"] is True and body["AttachStdin"] is True
    assert body["Labels"] == {"tier": "front", "flag": ""}
    assert body["ExposedPorts"] == {"80/tcp": {}, "53/udp": {}}
    assert body["Healthcheck"] == {
        "Test": ["CMD-SHELL", "wget -q -O- localhost"],
        "Interval": 5_000_000_000,
        "Retries": 2,
    }
    assert body["StopSignal"] == "SIGINT" and body["StopTimeout"] == 3
    host = body["HostConfig"]
    assert host["Binds"] == ["/srv/data:/data:ro", "/tmp:/scratch"]
    assert host["Tmpfs"] == {"/run": "size=64m,mode=1777"}
    assert host["PortBindings"] == {
        "80/tcp": [{"HostIp": "127.0.0.1", "HostPort": "8080"}],
        "53/udp": [{"HostIp": "", "HostPort": ""}],
    }
    assert host["PublishAllPorts"] is True
    assert host["Memory"] == 512 * 1024 * 1024
    assert host["NanoCpus"] == 1_500_000_000
    assert host["AutoRemove"] is True
    assert host["RestartPolicy"] == {"Name": "no", "MaximumRetryCount": 0}
    assert request.query() == {"name": "web", "platform": None}


def test_create_without_command_keeps_the_image_default() -> None:
    body = build_create_request("img", (), _options(), attach=False).body
    assert "Cmd" not in body and "Entrypoint" not in body
    assert body["AttachStdout"] is False


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"memory": "12zz"}, "invalid memory '12zz'"),
        ({"memory": "1k"}, "below the minimum"),
        ({"publish": ("99999:80",)}, "invalid port"),
        ({"publish": ("80/sctp",)}, "invalid protocol"),
        ({"volume": ("rel/x:/x",)}, "invalid characters for a local volume name"),
        ({"volume": ("db:x",)}, "must be an absolute path"),
        ({"volume": ("/a:/b:rx",)}, "invalid mode 'rx'"),
        ({"volume": ("/a:/b", "v1:/b")}, "Duplicate mount point: /b"),
        ({"mounts": ("type=tmpfs,dst=/t,tmpfs-size=huge",)}, "tmpfs-size"),
        ({"volumes_from": ("web:rx",)}, "--volumes-from"),
        ({"tmpfs": ("/t:uid=5",)}, "unsupported tmpfs option"),
        ({"restart": "sometimes"}, "invalid restart policy"),
        ({"restart": "always", "auto_remove": True}, "--restart and --rm"),
        ({"stop_signal": "SIGNOPE"}, "invalid signal"),
        ({"name": "bad name"}, "invalid container name"),
        ({"hostname": "-x-"}, "invalid hostname"),
        ({"workdir": "relative"}, "not an absolute path"),
        ({"cpus": 0.0}, "--cpus must be positive"),
        ({"env": ("=x",)}, "the name is empty"),
        ({"env_file": ("/nonexistent/env",)}, "does not exist"),
        ({"health_interval": "soon"}, "invalid --health-interval"),
        ({"no_healthcheck": True, "health_cmd": "true"}, "conflicts"),
    ],
)
def test_bad_create_options_are_one_clear_error(options: dict[str, Any], message: str) -> None:
    with pytest.raises(errors.InvalidArgument, match=message):
        build_create_request("img", (), _options(**options), attach=True)


def test_no_healthcheck_disables_the_image_one() -> None:
    body = build_create_request("img", (), _options(no_healthcheck=True), attach=True).body
    assert body["Healthcheck"] == {"Test": ["NONE"]}


# ------------------------------------------------------------------------ stats

STATS = {
    "id": "a" * 64,
    "name": "/web",
    "cpu_stats": {
        "cpu_usage": {"total_usage": 3_000_000_000},
        "system_cpu_usage": 20_000_000_000,
        "online_cpus": 2,
    },
    "precpu_stats": {
        "cpu_usage": {"total_usage": 2_000_000_000},
        "system_cpu_usage": 10_000_000_000,
    },
    "memory_stats": {
        "usage": 100 * 1024 * 1024,
        "limit": 400 * 1024 * 1024,
        "stats": {"inactive_file": 20 * 1024 * 1024},
    },
    "networks": {"eth0": {"rx_bytes": 1500, "tx_bytes": 700}, "eth1": {"rx_bytes": 500}},
    "blkio_stats": {
        "io_service_bytes_recursive": [
            {"op": "Read", "value": 4_000_000},
            {"op": "write", "value": 1_000},
            {"op": "Total", "value": 4_001_000},
        ]
    },
    "pids_stats": {"current": 3},
}


def test_stats_arithmetic_follows_docker() -> None:
    assert cpu_percent(STATS) == pytest.approx(20.0)
    assert memory_used(STATS) == 80 * 1024 * 1024
    assert io_totals(STATS) == (2000, 700, 4_000_000, 1000)
    row = StatsRow("web", STATS)
    assert row.as_dict() == {
        "Container": "web",
        "ID": "a" * 12,
        "Name": "web",
        "CPUPerc": "20.00%",
        "MemUsage": "80MiB / 400MiB",
        "MemPerc": "20.00%",
        "NetIO": "2kB / 700B",
        "BlockIO": "4MB / 1kB",
        "PIDs": "3",
    }
    assert StatsRow("gone", None).CPUPerc == "--"


# -------------------------------------------------------------------- port, df


def test_port_lines() -> None:
    ports = {
        "80/tcp": [{"HostIp": "0.0.0.0", "HostPort": "8080"}, {"HostIp": "::", "HostPort": "8080"}],
        "53/udp": [{"HostIp": "127.0.0.1", "HostPort": "5353"}],
        "443/tcp": None,
    }
    assert format_port_lines(ports, None) == [
        "53/udp -> 127.0.0.1:5353",
        "80/tcp -> 0.0.0.0:8080",
        "80/tcp -> [::]:8080",
    ]
    assert format_port_lines(ports, "80") == ["0.0.0.0:8080", "[::]:8080"]
    assert format_port_lines(ports, "443/tcp") == []


def test_system_df_summary() -> None:
    rows = summarize_df(
        {
            "LayersSize": 10_000_000,
            "Images": [
                {"Size": 6_000_000, "SharedSize": 0, "Containers": 1},
                {"Size": 4_000_000, "SharedSize": 0, "Containers": 0},
            ],
            "Containers": [
                {"SizeRw": 1000, "State": "running"},
                {"SizeRw": 3000, "State": "exited"},
            ],
            "Volumes": [],
            "BuildCache": [],
        }
    )
    assert [
        (r["Type"], r["TotalCount"], r["Active"], r["Size"], r["Reclaimable"]) for r in rows
    ] == [
        ("Images", "2", "1", "10MB", "4MB (40%)"),
        ("Containers", "2", "1", "4kB", "3kB (75%)"),
        ("Local Volumes", "0", "0", "0B", "0B"),
        ("Build Cache", "0", "0", "0B", "0B"),
    ]


# ---------------------------------------------------------------------------- cp


def test_cp_argument_split() -> None:
    assert split_cp_arg("web:/etc/passwd") == ("web", "/etc/passwd")
    assert split_cp_arg("/host/a:b") == (None, "/host/a:b")
    assert split_cp_arg("./a:b") == (None, "./a:b")
    assert split_cp_arg("-") == (None, "-")
    assert split_cp_arg("plain") == (None, "plain")


def test_cp_places_the_copy_by_dockers_rules(tmp_path: Path) -> None:
    (tmp_path / "dir").mkdir()
    (tmp_path / "file").write_text("x")
    assert place_copy("/etc", True, str(tmp_path / "dir")) == Placement(tmp_path / "dir", ("etc",))
    assert place_copy("/etc/.", True, str(tmp_path / "dir")) == Placement(tmp_path / "dir", ())
    assert place_copy("/etc", True, str(tmp_path / "new")) == Placement(tmp_path, ("new",))
    assert place_copy("/etc/hosts", False, str(tmp_path / "file")) == Placement(tmp_path, ("file",))
    assert place_copy("/etc/.", True, str(tmp_path / "made")) == Placement(tmp_path / "made", ())
    assert (tmp_path / "made").is_dir()
    assert stat_is_dir({"mode": (1 << 31) | 0o755})
    assert stat_is_dir({"mode": 0o040755})
    assert not stat_is_dir({"mode": 0o100644})


# ------------------------------------------------------ CLI errors before the daemon


def _husk(*args: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    import os

    data_file = tmp_path / "data-file"
    data_file.write_text("")
    env = {
        **os.environ,
        # Nothing may be started: these must fail before any request.
        "HUSK_SOCKET": str(tmp_path / "nobody-listens.sock"),
        "HUSK_RUN_DIR": str(tmp_path / "run"),
        # Should a command connect after all, its daemon fails at once (data dir is a file).
        "HUSK_DATA_DIR": str(data_file),
    }
    return subprocess.run(
        [sys.executable, "-m", "husk.cli.main", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["run", "-m", "12zz", "img"], "husk: invalid memory '12zz'"),
        (["run", "-p", "70000:80", "img"], "husk: invalid port"),
        (["create", "--restart", "always", "--rm", "img"], "husk: conflicting options"),
        (["kill", "-s", "SIGNOPE", "web"], "husk: invalid signal: SIGNOPE"),
        (["exec", "web"], "husk: exec needs a command"),
        (["ps", "--format", "{{if .ID}}x{{end}}"], "husk: format"),
        (["logs", "--since", "someday", "web"], "husk: invalid --since"),
        (["cp", "a", "b"], "husk: one of the paths must be CONTAINER:PATH"),
    ],
)
def test_bad_input_fails_in_one_line_with_125(
    args: list[str], message: str, tmp_path: Path
) -> None:
    result = _husk(*args, tmp_path=tmp_path)
    assert result.returncode == 125, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(message)
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").iterdir())


def test_help_of_run_keeps_h_for_hostname(tmp_path: Path) -> None:
    result = _husk("run", "--help", tmp_path=tmp_path)
    assert result.returncode == 0
    assert "-h, --hostname" in result.stdout


def test_no_template_travels_as_a_label_the_runtime_reads() -> None:
    from husk.spec import NO_TEMPLATE_LABEL, ContainerSpec

    body = build_create_request("img", (), _options(no_template=True), attach=False).body
    assert body["Labels"] == {NO_TEMPLATE_LABEL: "true"}
    assert not ContainerSpec(image="img", labels=body["Labels"]).use_template
    assert ContainerSpec(image="img").use_template
