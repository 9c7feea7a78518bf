"""A hostile client of the Docker API (docs/SECURITY.md, "The daemon and its API"): the
real application (real Runtime and image store in a temporary directory) through
aiohttp's test server; no VM boots."""

from __future__ import annotations

import asyncio
import base64
import os
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

from husk.daemon.docker import build_app

NESTED = "[" * 100_000


@pytest.fixture
def api_dirs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("HUSK_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("HUSK_RUN_DIR", str(tmp_path / "run"))
    return tmp_path


@pytest.mark.usefixtures("api_dirs")
def test_json_nested_too_deep_is_a_400_everywhere_a_client_sends_json() -> None:
    """100,000 ``[`` in a body, a ``filters`` query, ``X-Registry-Auth`` or a platform:
    ``json.loads`` raised RecursionError (neither ValueError nor a HuskError), so each was
    a 500 "internal error" with a traceback in the daemon's log."""
    from husk.runtime.runtime import Runtime

    auth = base64.urlsafe_b64encode(NESTED.encode()).decode()
    requests: list[tuple[str, str, dict[str, Any]]] = [
        ("POST", "/containers/create", {"data": NESTED}),
        ("GET", "/containers/json", {"params": {"filters": NESTED}}),
        ("GET", "/images/json", {"params": {"filters": NESTED}}),
        (
            "POST",
            "/images/create",
            {"params": {"fromImage": "x"}, "headers": {"X-Registry-Auth": auth}},
        ),
        ("POST", "/images/create", {"params": {"fromImage": "x", "platform": "{" + NESTED}}),
        ("POST", "/build", {"params": {"buildargs": NESTED}, "data": b""}),
        ("POST", "/build", {"params": {"labels": NESTED}, "data": b""}),
    ]

    async def main() -> None:
        async with TestClient(TestServer(build_app(Runtime()))) as client:
            for method, path, options in requests:
                headers = {"Content-Type": "application/json", **options.pop("headers", {})}
                response = await client.request(method, path, headers=headers, **options)
                text = await response.text()
                assert response.status == 400, (
                    f"{method} {path} {options}: {response.status} {text}"
                )
                assert "internal error" not in text and "Recursion" not in text

    asyncio.run(main())


def test_a_dockerfile_line_of_nested_brackets_is_the_shell_form() -> None:
    """``CMD [[[[...`` in a build's Dockerfile raised RecursionError out of the parser (a
    traceback instead of a build); Docker falls back to the shell form for text that is
    not a JSON array of strings, and so does husk now."""
    from husk.build.parser import parse

    dockerfile = parse("FROM scratch\nCMD " + NESTED + "\n")
    command = dockerfile.instructions[-1]
    assert command.exec_form is None


def _tar(members: list[tuple[str, str, bytes]]) -> bytes:
    import io
    import tarfile

    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for kind, name, data in members:
            info = tarfile.TarInfo(name)
            if kind == "dir":
                info.type = tarfile.DIRTYPE
            elif kind == "symlink":
                info.type, info.linkname = tarfile.SYMTYPE, data.decode()
            else:
                info.size = len(data)
            tar.addfile(info, io.BytesIO(data) if kind == "file" else None)
    return buffer.getvalue()


@pytest.mark.parametrize(
    "members",
    [
        [("file", "a", b"x"), ("file", "a/b", b"x")],
        [("dir", "a", b""), ("file", "a", b"x")],
        [("file", "t", b"x"), ("symlink", "x", b"t"), ("file", "x", b"x")],
    ],
    ids=["file-below-a-file", "file-over-a-directory", "link-over-a-file"],
)
def test_an_image_archive_with_clashing_entries_is_refused_cleanly(
    api_dirs: Path, members: list[tuple[str, str, bytes]]
) -> None:
    """``husk load`` / ``POST /images/load`` of an archive whose entries clash (a file and
    then a path below it, a directory and then a file of that name, a symlink and a file
    of one name) raised FileExistsError or IsADirectoryError: a 500 with a traceback
    instead of a 400 naming the entry. Nothing is stored."""
    from husk.errors import InvalidArgument
    from husk.oci.archive import load_path
    from husk.oci.store import ImageStore

    store = ImageStore(api_dirs / "data" / "images")
    archive = api_dirs / "hostile.tar"
    archive.write_bytes(_tar([*members, ("file", "manifest.json", b"[]")]))
    with pytest.raises(InvalidArgument, match=r"hostile\.tar: entry"):
        load_path(archive, store=store)
    assert store.list_images() == []


def test_archive_paths_are_read_as_docker_reads_them() -> None:
    """``GET/HEAD/PUT /containers/ID/archive?path=etc`` (relative) or with a NUL byte went
    to the guest as given: its refusal came back as a 500. Docker reads a relative path
    from the container's root; a NUL byte is a 400 before any VM is involved."""
    from husk.daemon.docker import container_io
    from husk.errors import InvalidArgument

    def request(path: str) -> Any:
        from aiohttp.test_utils import make_mocked_request

        return make_mocked_request("GET", "/x", match_info={}, app=None, headers={}).clone(
            rel_url=f"/containers/c/archive?path={path}"
        )

    assert container_io._archive_path(request("etc/hosts")) == "/etc/hosts"
    assert container_io._archive_path(request("etc/.")) == "/etc/."
    assert container_io._archive_path(request("/etc/")) == "/etc/"
    with pytest.raises(InvalidArgument, match="NUL"):
        container_io._archive_path(request("/etc%00x"))


@pytest.mark.usefixtures("as_root")
def test_a_named_binds_neighbour_disk_image_is_never_mounted(tmp_path: Path) -> None:
    """A named bind volume (``--opt type=none,o=bind,device=/tmp/shared``) was checked at
    every start as if it were a sized volume: ``disk.ext4`` beside its directory (here
    ``/tmp/disk.ext4``, which any local user, or a guest with a bind of the parent, can
    write) was loop-mounted by root over the directory, handing the host kernel an
    attacker's ext4 image and the container the attacker's files."""
    from husk.oci.rootfs import make_ext4_disk
    from husk.runtime.mounts import plan_mounts
    from husk.spec import BindMount, ContainerSpec
    from husk.volumes import sized
    from husk.volumes.manager import VolumeManager
    from husk.volumes.store import VolumeStore

    shared = tmp_path / "tmp"
    shared.mkdir(mode=0o1777)
    device = shared / "shared"
    device.mkdir()
    (device / "mine").write_text("the user's data\n")
    make_ext4_disk(shared / sized.DISK, 16 * 1024 * 1024)  # planted by someone else
    manager = VolumeManager(VolumeStore(tmp_path / "volumes"), lambda: [])
    options = {"type": "none", "o": "bind", "device": str(device)}
    volume = manager.create("named", options=options)
    bind = BindMount(source=volume.data_path, target="/data", volume="named")
    try:
        plan = plan_mounts(ContainerSpec(image="x", binds=[bind]), tmp_path / "container")
        assert not os.path.ismount(device)
        assert [share.path for share in plan.shares] == [device]
        assert (device / "mine").read_text() == "the user's data\n"
    finally:
        sized.unmount(device)


@pytest.mark.usefixtures("api_dirs")
@pytest.mark.parametrize("name", ["\x00", "a" * 3000, "a/" * 2100 + "Dockerfile"])
def test_a_dockerfile_name_that_no_file_can_have_is_a_400(name: str) -> None:
    """``POST /build?dockerfile=`` with a NUL byte (ValueError) or a name longer than the
    file system allows (ENAMETOOLONG) was a 500 "internal error"."""
    import io
    import tarfile

    from husk.runtime.runtime import Runtime

    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        info = tarfile.TarInfo("Dockerfile")
        info.size = len(b"FROM scratch\n")
        tar.addfile(info, io.BytesIO(b"FROM scratch\n"))

    async def main() -> None:
        async with TestClient(TestServer(build_app(Runtime()))) as client:
            response = await client.post(
                "/build",
                params={"dockerfile": name},
                data=buffer.getvalue(),
                headers={"Content-Type": "application/x-tar"},
            )
            text = await response.text()
            assert response.status == 400, text[:300]
            assert "internal error" not in text

    asyncio.run(main())


_LIMIT_PROBE = """
import resource, sys
import husk.daemon.server as server
server.DESCRIPTOR_LIMIT = int(sys.argv[1])
print(server.raise_descriptor_limit(), *resource.getrlimit(resource.RLIMIT_NOFILE))
"""


@pytest.mark.parametrize(("cap", "expected"), [(65536, "4096 4096 4096"), (2048, "2048 2048 4096")])
def test_the_daemon_raises_its_descriptor_limit_to_the_hard_one(cap: int, expected: str) -> None:
    """Started at systemd's soft limit of 1024, the daemon ran out of descriptors once a
    few guests held the relays they may hold (three descriptors each). Raised to the
    hard limit, at most to DESCRIPTOR_LIMIT (its children inherit it)."""
    import resource
    import subprocess
    import sys

    def lowered() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, 4096))

    done = subprocess.run(
        [sys.executable, "-c", _LIMIT_PROBE, str(cap)],
        preexec_fn=lowered,
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    assert done.stdout.split() == expected.split()


@pytest.mark.usefixtures("api_dirs")
@pytest.mark.parametrize("size", [["x", 1], [1e400, 1], [70000, 5], [-1, 5], [1], "24x80"])
def test_a_bad_exec_console_size_is_a_400_before_the_exec_starts(size: object) -> None:
    """``int()`` of a string or of 1e400 (infinity) raised after the connection was taken
    over and the process had started: a 500 "internal error", the exec left running."""
    from husk.runtime.runtime import Runtime

    runtime = Runtime()
    started: list[str] = []

    class Execution:
        id = "e1"

    async def exec_start(exec_id: str) -> None:
        started.append(exec_id)

    runtime.exec_inspect = lambda exec_id: Execution()  # type: ignore[method-assign,assignment,return-value]
    runtime.exec_check_startable = lambda exec_id: None  # type: ignore[method-assign]
    runtime.exec_start = exec_start  # type: ignore[method-assign,assignment]

    async def main() -> None:
        async with TestClient(TestServer(build_app(runtime))) as client:
            body = {"Detach": True, "Tty": True, "ConsoleSize": size}
            response = await client.post("/exec/e1/start", json=body)
            text = await response.text()
            assert response.status == 400, text
            assert "ConsoleSize" in text
        assert started == []

    asyncio.run(main())


@pytest.mark.usefixtures("api_dirs")
@pytest.mark.parametrize("memory", ['"abc"', '{"x": 1}', "[1]", "1e400", '"1g"'])
def test_a_memory_limit_that_is_no_number_is_a_400(memory: str) -> None:
    """``HostConfig.Memory`` went through ``int()``: a string or an object (or 1e400,
    infinity) was a 500 "internal error" with a traceback (found by fuzzing the create
    body); Docker refuses it with a 400."""
    from husk.runtime.runtime import Runtime

    body = '{"Image": "busybox", "HostConfig": {"Memory": ' + memory + "}}"

    async def main() -> None:
        async with TestClient(TestServer(build_app(Runtime()))) as client:
            response = await client.post(
                "/containers/create", data=body, headers={"Content-Type": "application/json"}
            )
            text = await response.text()
            assert response.status == 400, text
            assert "Memory" in text and "internal error" not in text

    asyncio.run(main())


def test_an_exec_command_with_an_unclosed_quote_is_refused() -> None:
    """A string ``Cmd`` is split as a shell would; an unclosed quote raised ValueError out
    of ``shlex`` (a 500)."""
    from husk.daemon.docker.create_config import exec_argv
    from husk.errors import InvalidArgument

    with pytest.raises(InvalidArgument, match="Cmd"):
        exec_argv("echo 'unclosed")
    assert exec_argv("echo 'a b'") == ["echo", "a b"]
