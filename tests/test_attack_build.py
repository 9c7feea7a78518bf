"""Attacks on image builds, each refused: a hostile Dockerfile, build context or guest
layer must not write or read host files outside the build's own directory, poison the
build cache, or exhaust the daemon (docs/SECURITY.md, "Image builds")."""

from __future__ import annotations

import asyncio
import gzip
import io
import os
import tarfile
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from husk.build import context as ctx
from husk.build.executor import Builder
from husk.errors import InvalidArgument
from husk.oci.store import ImageRecord
from test_build_api import api_env  # noqa: F401 (a fixture)


def _tar(entries: list[tuple[tarfile.TarInfo, bytes]]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for member, data in entries:
            member.size = len(data) if member.isreg() else 0
            tar.addfile(member, io.BytesIO(data) if member.isreg() else None)
    return buffer.getvalue()


def _file(name: str, data: bytes = b"", mode: int = 0o644) -> tuple[tarfile.TarInfo, bytes]:
    member = tarfile.TarInfo(name)
    member.mode = mode
    return member, data


def _symlink(name: str, target: str) -> tuple[tarfile.TarInfo, bytes]:
    member = tarfile.TarInfo(name)
    member.type = tarfile.SYMTYPE
    member.linkname = target
    return member, b""


# -- COPY --from=STAGE ../../..: the stage's files land under the build's directory ------


@dataclass
class _Record:
    id: str = "c0ffee"


class _FakeRuntime:
    """What ``Builder._image_files`` uses of the runtime: the guest's archive of a path
    is a tar of one file named as the path's last component (as the agent's is)."""

    def __init__(self, store: Any) -> None:
        self.images = store
        self.asked: list[str] = []

    async def create(self, spec: Any, pull_policy: str = "") -> _Record:
        return _Record()

    async def get_archive(
        self, container: str, path: str
    ) -> tuple[AsyncIterator[bytes], dict[str, Any]]:
        self.asked.append(path)
        data = _tar([_file(os.path.basename(path) or "x", b"planted by the image\n")])

        async def chunks() -> AsyncIterator[bytes]:
            yield data

        return chunks(), {}

    async def remove(self, *args: Any, **kwargs: Any) -> None:
        return None


def test_copy_from_a_stage_never_writes_above_the_build_directory(tmp_path: Path) -> None:
    """``COPY --from=stage ../../../../x /`` once made the host unpack the stage's file
    at ``work/from/../../../../x``, i.e. anywhere on the host (as the daemon's user)."""
    work = tmp_path / "a" / "b" / "c" / "work"
    root = work / "from"
    root.mkdir(parents=True)
    store = type("Store", (), {"ingest_dir": tmp_path})()
    runtime = _FakeRuntime(store)
    builder = Builder(runtime, lambda text: asyncio.sleep(0))  # type: ignore[arg-type]
    image = ImageRecord.__new__(ImageRecord)
    object.__setattr__(image, "config", {"config": {}})
    object.__setattr__(image, "id", "sha256:" + "0" * 64)
    escape = "../" * 5 + "escaped/evil.sh"
    asyncio.run(builder._image_files(image, [escape], root, work, what="COPY --from=x"))
    assert not (tmp_path / "escaped").exists()
    assert not (tmp_path / "a" / "escaped").exists()
    assert runtime.asked == ["/escaped/evil.sh"]
    assert (root / "escaped" / "evil.sh").read_bytes() == b"planted by the image\n"


# -- .dockerignore -------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_ignore_patterns_match_in_linear_time() -> None:
    """``**a**a…**b`` against a long name: a backtracking regex took hours (every COPY
    checks every context file against every rule, once on the daemon's event loop)."""
    rules = ctx.parse_dockerignore("**a" * 20 + "b\n")
    assert not ctx.ignored("a" * 4000, rules)
    assert ctx.ignored("a" * 4000 + "b", rules)
    assert ctx.ignored("x/y/b.tmp", ctx.parse_dockerignore("**/*.tmp\n"))
    assert not ctx.ignored("x/y/b.tmpx", ctx.parse_dockerignore("**/*.tmp\n"))
    assert ctx.ignored("build/keep.txt", ctx.parse_dockerignore("build\n"))
    with pytest.raises(InvalidArgument, match="syntax error in pattern"):
        ctx.parse_dockerignore("[z-a]\n")


def test_dockerignore_that_is_a_symlink_to_a_host_file_is_refused(tmp_path: Path) -> None:
    from husk.build.executor import _ignore_rules

    host = tmp_path / "host-secret"
    host.write_text("app\n")
    root = tmp_path / "context"
    root.mkdir()
    (root / "app").write_text("x")
    (root / ".dockerignore").symlink_to(host)
    with pytest.raises(ctx.ContextError, match="outside the build context"):
        _ignore_rules(root)
    # Inside the context, a symlink is followed; a huge file is refused, not read whole.
    (root / ".dockerignore").unlink()
    (root / "rules").write_text("app\n")
    (root / ".dockerignore").symlink_to("rules")
    assert ctx.ignored("app", _ignore_rules(root))
    (root / "rules").write_bytes(b"#" * (2 * 1024 * 1024))
    with pytest.raises(InvalidArgument, match="larger than"):
        _ignore_rules(root)


# -- the context tar ---------------------------------------------------------------------


def _gzip_tar_of_zeros(name: str, size: int) -> bytes:
    """A gzip'd tar holding ``size`` zero bytes: a few KiB on the wire."""
    buffer = io.BytesIO()
    with (
        gzip.GzipFile(fileobj=buffer, mode="wb") as zipped,
        tarfile.open(fileobj=zipped, mode="w|") as tar,
    ):
        member = tarfile.TarInfo(name)
        member.size = size
        tar.addfile(member, io.BytesIO(bytes(size)))
    return buffer.getvalue()


def test_a_compressed_context_cannot_unpack_beyond_the_bound(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The upload is bounded, but a gzip'd context (or an ADDed .tar.gz, or a stage's
    files) decompresses ~1000-fold: what it unpacks is bounded as well."""
    monkeypatch.setattr(ctx, "MAX_CONTEXT_BYTES", 4 * 1024 * 1024)
    bomb = _gzip_tar_of_zeros("zeros", 64 * 1024 * 1024)
    assert len(bomb) < 256 * 1024
    dest = tmp_path / "bomb"
    dest.mkdir()
    with pytest.raises(InvalidArgument, match="bytes of files"):
        ctx.extract_context(io.BytesIO(bomb), dest)
    assert not (dest / "zeros").exists()
    fine = tmp_path / "fine"
    fine.mkdir()
    ctx.extract_context(io.BytesIO(_gzip_tar_of_zeros("zeros", 1024 * 1024)), fine)
    assert (fine / "zeros").stat().st_size == 1024 * 1024


@pytest.mark.parametrize(
    ("entries", "error"),
    [
        ([_file("../outside", b"x")], "'..'"),
        ([_symlink("link", "/etc"), _file("link/passwd", b"x")], "symbolic link"),
        ([_file("a", b"x"), (tarfile.TarInfo("b"), b"")], None),
    ],
)
def test_a_context_never_writes_outside_its_directory(
    tmp_path: Path, entries: list[tuple[tarfile.TarInfo, bytes]], error: str | None
) -> None:
    """Already refused: ``..``, a file written through a symlink the context made."""
    dest = tmp_path / "context"
    dest.mkdir()
    data = _tar(entries)
    if error is None:
        ctx.extract_context(io.BytesIO(data), dest)
        return
    with pytest.raises(InvalidArgument, match=error):
        ctx.extract_context(io.BytesIO(data), dest)
    assert sorted(os.listdir(tmp_path)) == ["context"]


def test_a_context_device_node_is_refused(tmp_path: Path) -> None:
    member = tarfile.TarInfo("null")
    member.type = tarfile.CHRTYPE
    member.devmajor, member.devminor = 1, 3
    with pytest.raises(InvalidArgument, match="device node"):
        ctx.extract_context(io.BytesIO(_tar([(member, b"")])), tmp_path)


# -- the build cache ------------------------------------------------------------------


def _copy_digest(root: Path, files: dict[str, bytes]) -> str:
    root.mkdir()
    entries = []
    for name, data in files.items():
        (root / name).write_bytes(data)
        entries.append((root / name, name))
    return ctx.write_copy_tar(iter(entries), io.BytesIO(), ctx.CopyOptions(mode=0o644))


def test_one_context_cannot_pose_as_another_in_the_cache(tmp_path: Path) -> None:
    """The COPY step's cache key hashed each file's data, then its name and mode: a
    context whose one file ``b`` holds ``X + <a's fields> + Y`` had the same key as one
    with files ``a`` (X) and ``b`` (Y), so either build got the other's layer."""
    fields_of_a = f"\0a\0{tarfile.REGTYPE!r}\0{0o644}\0{0}:{0}\0\0".encode()
    victim = _copy_digest(tmp_path / "victim", {"a": b"X", "b": b"Y"})
    attacker = _copy_digest(tmp_path / "attacker", {"b": b"X" + fields_of_a + b"Y"})
    assert victim != attacker
    # The same files give the same key (the cache still works).
    assert _copy_digest(tmp_path / "again", {"a": b"X", "b": b"Y"}) == victim


# -- hostile Dockerfiles -----------------------------------------------------------------


def test_variable_expansion_is_bounded() -> None:
    """``$A$A$A…`` of a large ``A``: each line may double what the last made."""
    from husk.build.parser import DockerfileError, substitute

    big = {"A": "x" * 64 * 1024}
    assert len(substitute("$A$A", big)) == 128 * 1024
    with pytest.raises(DockerfileError, match="adds more than"):
        substitute("$A" * 100, big)
    with pytest.raises(DockerfileError, match="adds more than"):
        substitute("${A:-x}" * 100, big)


def test_workdir_path_is_bounded() -> None:
    """Every prefix of WORKDIR's path is looked up: a path of a million components was a
    million names of up to 4 MB each (the daemon's memory)."""
    from husk.build import workdir

    with pytest.raises(workdir.WorkdirError, match="longer than"):
        workdir.missing_directories(lambda: [], "/a" * 3000)
    assert workdir.missing_directories(lambda: [], "/srv/app") == ["/srv", "/srv/app"]


def _context(files: dict[str, bytes | str]) -> bytes:
    """A context tar: bytes are files, a str is a symlink's target."""
    entries = []
    for name, value in files.items():
        entries.append(_symlink(name, value) if isinstance(value, str) else _file(name, value))
    return _tar(entries)


def _adding(entries: list[tuple[tarfile.TarInfo, bytes]]) -> bytes:
    """A context whose Dockerfile ADDs the local tar ``entries``."""
    dockerfile = b"FROM husk.local/base:1\nADD hostile.tar /unpacked/\n"
    return _tar([_file("Dockerfile", dockerfile), _file("hostile.tar", _tar(entries))])


def test_hostile_builds_through_the_api(api_env: Path) -> None:  # noqa: F811
    """What a client sends to POST /build: every refusal a one-line error in the stream
    (or a 4xx), nothing read or written outside the build's directory, nothing tagged."""
    from aiohttp.test_utils import TestClient, TestServer

    from husk.daemon.docker import build_app
    from husk.oci.store import ImageStore
    from husk.runtime.runtime import Runtime

    host = api_env / "host-file"
    host.write_text("FROM husk.local/base:1\nLABEL leaked=yes\n")
    setuid = _file("bin/su", b"x", mode=0o4755)
    setuid[0].uid = 1000
    cases: list[tuple[str, bytes, str]] = [
        # The Dockerfile, or the path naming it, leading out of the context.
        ("", _context({"Dockerfile": str(host)}), "outside the build context"),
        ("dockerfile=../../host-file", _context({"x": b""}), "outside the build context"),
        # A COPY source that is a symlink out of the context.
        (
            "",
            _context({"Dockerfile": b"FROM husk.local/base:1\nCOPY link /x\n", "link": "/etc"}),
            "leads outside the build context",
        ),
        # A .dockerignore that is a symlink to a host file.
        (
            "",
            _context({"Dockerfile": b"FROM husk.local/base:1\n", ".dockerignore": str(host)}),
            ".dockerignore leads outside",
        ),
        # ADD of a local tar: '..', a file through an absolute symlink, a device node.
        ("", _adding([_file("../../escaped", b"x")]), "'..'"),
        ("", _adding([_symlink("etc", "/etc"), _file("etc/cron.d/x", b"x")]), "symbolic link"),
        # Variables that double line after line, or pile up.
        (
            "",
            _context(
                {
                    "Dockerfile": (
                        "FROM husk.local/base:1\nENV A=" + "x" * 60000 + "\nENV B=" + "$A" * 20
                    ).encode()
                }
            ),
            "adds more than",
        ),
        (
            "",
            _context(
                {
                    "Dockerfile": (
                        "FROM husk.local/base:1\nARG A="
                        + "x" * 60000
                        + "\n"
                        + "".join(f"ENV B{i}=$A$A$A$A\n" for i in range(10))
                    ).encode()
                }
            ),
            "would exceed",
        ),
        (
            "",
            _context({"Dockerfile": b"FROM husk.local/base:1\nWORKDIR " + b"/a" * 3000}),
            "longer",
        ),
    ]

    async def body() -> None:
        async with TestClient(TestServer(build_app(Runtime()))) as client:
            for query, context, expected in cases:
                answer = await client.post(f"/build?t=husk.local/bad:1&{query}", data=context)
                text = (await answer.read()).decode()
                assert expected in text, (expected, text[-400:])
                assert "aux" not in text and "Traceback" not in text
            # ADD of a tar whose file is setuid: kept (Docker's ADD keeps the archive's
            # modes) but owned by root as every ADD is, whatever the archive said.
            added = await client.post("/build?t=husk.local/setuid:1", data=_adding([setuid]))
            text = (await added.read()).decode()
            assert '"aux"' in text, text
            store = ImageStore()
            image = store.resolve("husk.local/setuid:1")
            with tarfile.open(store.blob_path(image.layers[-1].digest)) as tar:
                member = tar.getmember("unpacked/bin/su")
            assert (member.mode, member.uid, member.gid) == (0o4755, 0, 0)
            assert (await client.get("/images/husk.local/bad:1/json")).status == 404
        leftovers = list((api_env / "data" / "images" / "ingest").iterdir())
        assert not [p for p in leftovers if p.name.startswith("build")], leftovers
        assert {p.name for p in api_env.iterdir()} <= {"data", "host-file", "run"}

    asyncio.run(body())


# -- a guest's layer (a RUN step, commit) ---------------------------------------------


def _dir(name: str) -> tuple[tarfile.TarInfo, bytes]:
    member = tarfile.TarInfo(name)
    member.type = tarfile.DIRTYPE
    member.mode = 0o755
    return member, b""


@pytest.mark.parametrize(
    "entries",
    [
        # Below a symlink, two levels down (only the direct parent was checked).
        [_symlink("a", "/etc"), _file("a/cron.d/evil", b"x")],
        [_file("f", b"x"), _file("f/g/h", b"x")],
        # A symlink replacing a directory the layer's earlier entries are in.
        [_file("a/b/c", b"x"), _symlink("a", "/etc")],
        [_file("a/b/c", b"x"), _symlink("a/b", "/etc")],
    ],
)
def test_a_guest_layer_never_nests_entries_below_a_non_directory(
    tmp_path: Path, entries: list[tuple[tarfile.TarInfo, bytes]]
) -> None:
    """Such a layer, pushed, is one that a less careful unpacker writes through."""
    from husk.runtime.layertar import BadLayer, rewrite

    with pytest.raises(BadLayer, match=r"not a directory|replaces a directory"):
        rewrite(io.BytesIO(_tar(entries)), tmp_path / "l.tgz", max_bytes=1 << 20)


def test_a_guest_layer_may_name_a_directory_after_its_contents(tmp_path: Path) -> None:
    from husk.runtime.layertar import rewrite

    entries = [_file("a/b/c", b"x"), _dir("a/b"), _dir("a"), _file("a/d", b"y")]
    layer = rewrite(io.BytesIO(_tar(entries)), tmp_path / "l.tgz", max_bytes=1 << 20)
    assert layer.entries == 4


def test_a_guest_layer_of_many_entries_does_not_hold_the_daemons_memory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """tarfile keeps every header it reads and writes: a guest's million entries (with
    attributes) held ~1.3 GiB of the daemon's memory until the layer was written
    (measured: 200000 entries, 267 MiB before, 21 MiB after)."""
    from husk.runtime import layertar

    opened: list[tarfile.TarFile] = []
    real_open = tarfile.open

    def spy(*args: Any, **kwargs: Any) -> tarfile.TarFile:
        tar = real_open(*args, **kwargs)
        opened.append(tar)
        return tar

    raw = _tar([_file(f"d/f{i}", b"x") for i in range(2000)])
    monkeypatch.setattr(layertar.tarfile, "open", spy)
    layer = layertar.rewrite(io.BytesIO(raw), tmp_path / "l.tgz", max_bytes=1 << 20)
    monkeypatch.undo()
    assert layer.entries == 2000 and len(opened) == 2
    assert max(len(tar.members) for tar in opened) <= 1  # (the reader's and the writer's)


def test_hard_links_cannot_multiply_a_copy_beyond_the_bound(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A context's hard links unpack to nothing, but COPY writes each as a whole file: one
    big file and a million links filled the host's disk before the layer was checked."""
    monkeypatch.setattr(ctx, "MAX_COPY_BYTES", 4 * 1024 * 1024)
    big = _file("big", bytes(1024 * 1024))
    links = []
    for number in range(16):
        link = tarfile.TarInfo(f"link{number}")
        link.type = tarfile.LNKTYPE
        link.linkname = "big"
        links.append((link, b""))
    root = tmp_path / "context"
    root.mkdir()
    ctx.extract_context(io.BytesIO(_tar([big, *links])), root)
    sources = ctx.resolve_sources(root, ["."], [], "COPY")
    out = tmp_path / "copy.tar"
    with open(out, "wb") as handle, pytest.raises(ctx.ContextError, match="larger than"):
        ctx.write_copy_tar(
            ctx.copy_entries(sources, "/", [], honour_ignore=True), handle, ctx.CopyOptions()
        )
    assert out.stat().st_size < 6 * 1024 * 1024


@pytest.mark.parametrize(
    "value", ["", ":", "1:", ":1", "-1", "4294967295", "99999999999", "../../x", "a:b:c", "root:"]
)
def test_odd_chown_values_are_refused(value: str) -> None:
    """Already refused: no id out of chown's range, no name the image does not have."""
    with pytest.raises(InvalidArgument):
        ctx.parse_chown(value, "root:x:0:0::/:\n", "root:x:0:\n")


@pytest.mark.timeout(60)
def test_many_stages_cost_linear_time(api_env: Path) -> None:  # noqa: F811
    """Each FROM recounted the stages before it: ``FROM scratch`` 300000 times (a 4 MiB
    Dockerfile) took hours of the daemon's event loop. 60000 now take seconds."""
    from aiohttp.test_utils import TestClient, TestServer

    from husk.daemon.docker import build_app
    from husk.runtime.runtime import Runtime

    dockerfile = "FROM scratch\n" * 60000 + "FROM husk.local/base:1\nLABEL done=yes\n"
    context = _context({"Dockerfile": dockerfile.encode()})

    async def body() -> None:
        async with TestClient(TestServer(build_app(Runtime()))) as client:
            answer = await client.post("/build?q=1&t=husk.local/stages:1", data=context)
            text = (await answer.read()).decode()
            assert '"aux"' in text, text[-400:]
            inspect = await (await client.get("/images/husk.local/stages:1/json")).json()
            assert inspect["Config"]["Labels"] == {"done": "yes"}

    asyncio.run(body())


@pytest.mark.parametrize("triggers", [[5], [None], [["RUN", "x"]]])
def test_a_base_images_odd_onbuild_triggers_are_an_error(triggers: list[Any]) -> None:
    """A base image's OnBuild list is the registry's: a number in it was a traceback."""
    from husk.build.executor import BuildOptions, Stage
    from husk.build.parser import DockerfileError, parse

    store = type("Store", (), {"ingest_dir": Path("/nonexistent")})()
    builder = Builder(_FakeRuntime(store), lambda text: asyncio.sleep(0))  # type: ignore[arg-type]
    stage = Stage("0", 0, None, {"OnBuild": triggers}, "scratch")
    options = BuildOptions(dockerfile="FROM x\n", context=Path("/nonexistent"))
    with pytest.raises(DockerfileError, match="ONBUILD triggers"):
        asyncio.run(builder._triggers(stage, parse("FROM x\n"), options, [], {}, set()))


@pytest.mark.parametrize(
    "config",
    [
        {"Env": "PATH=/bin"},
        {"Env": [1]},
        {"Labels": ["a"]},
        {"Labels": {"a": 1}},
        {"WorkingDir": 5},
        {"Cmd": [None]},
    ],
)
def test_a_base_images_odd_config_is_an_error(config: dict[str, Any]) -> None:
    """A registry's config section of the wrong JSON types: a clear 400, not a traceback
    halfway through the build (ENV parsed ``Env`` item by item)."""
    from husk.build.executor import _base_config

    image = ImageRecord.__new__(ImageRecord)
    object.__setattr__(image, "config", {"config": config})
    object.__setattr__(image, "id", "sha256:" + "1" * 64)
    with pytest.raises(InvalidArgument, match="the base image"):
        _base_config(image)
    object.__setattr__(image, "config", {"config": {"Env": ["A=1"], "Labels": {"a": "b"}}})
    assert _base_config(image)["Env"] == ["A=1"]


@pytest.mark.parametrize(
    "config",
    [
        {"Env": 5},
        {"Env": "A=1"},
        {"Cmd": [1]},
        {"Labels": ["a"]},
        {"Labels": {"a": 1}},
        {"WorkingDir": ["/"]},
        {"ExposedPorts": "80/tcp"},
        {"Volumes": ["/data"]},
    ],
)
def test_commit_refuses_config_fields_of_the_wrong_type(config: dict[str, Any]) -> None:
    """POST /commit's body became the image's config as sent: ``{"Env": 5}`` made an image
    whose readers expect Docker's types (a build FROM it failed with a traceback)."""
    from husk.daemon.docker.commit import config_changes

    with pytest.raises(InvalidArgument, match="invalid config field"):
        config_changes(config)
    assert config_changes({"Cmd": "sh", "Env": ["A=1"]}) == {"Cmd": ["sh"], "Env": ["A=1"]}
