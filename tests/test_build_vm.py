"""``husk build`` and ``docker build`` (the classic builder) against the real daemon:
RUN steps in VMs (each from the boot template), COPY --from a stage (also under a
VOLUME), the cache, a failing RUN, extended attributes written by RUN, WORKDIR's
directory; the result pushed and pulled by skopeo, saved and run by podman with runc."""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from daemon_fixtures import RunningDaemon

pytestmark = pytest.mark.vm

DOCKERFILE = """\
# syntax=docker/dockerfile:1
ARG BASE
FROM ${BASE} AS maker
ARG GREETING=hi
RUN echo "$GREETING from run" > /made && mkdir -p /out/sub \\
    && echo deep > /out/sub/deep && ln /made /out/made.link && rm /etc/group
FROM ${BASE}
COPY --from=maker --chown=1000:1000 /made /app/made
COPY --chown=husk:wheel local.txt /app/
COPY --chmod=0755 tool.sh /usr/local/bin/tool
WORKDIR /app
ENV MODE=prod
USER 1000
EXPOSE 8080
LABEL purpose=test
CMD ["sh", "-c", "cat made local.txt; tool; echo $MODE; id -u; test -e /etc/group && echo kept"]
"""


def _husk(
    daemon: RunningDaemon, *args: str, input: bytes | None = None
) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [sys.executable, "-m", "husk.cli.main", *args],
        env=daemon.env,
        capture_output=True,
        input=input,
        timeout=900,
    )


def test_build_two_stages_cached_and_failing(
    husk_daemon: RunningDaemon, daemon_busybox: str, tmp_path: Path
) -> None:
    (tmp_path / "Dockerfile").write_text(DOCKERFILE)
    (tmp_path / "local.txt").write_text("local\n")
    (tmp_path / "tool.sh").write_text("#!/bin/sh\necho tool-ran\n")
    (tmp_path / "secret.key").write_text("never sent\n")
    (tmp_path / ".dockerignore").write_text("*.key\n")
    base = ["--build-arg", f"BASE={daemon_busybox}"]
    built = _husk(husk_daemon, "build", "-t", "built:one", *base, str(tmp_path))
    out = built.stdout.decode()
    assert built.returncode == 0, out + built.stderr.decode()
    assert "Step 4/14 : RUN" in out and "Running in" in out.split("Step 4/14")[1]
    assert "Successfully tagged built:one" in out

    shown = husk_daemon.docker("run", "--rm", "built:one").stdout.decode().splitlines()
    assert shown == ["hi from run", "local", "tool-ran", "prod", "1000", "kept"], shown
    owner = husk_daemon.docker(
        "run", "--rm", "built:one", "stat", "-c", "%u:%g", "/app/made", "/app/local.txt"
    )
    assert owner.stdout.decode().split() == ["1000:1000", "1000:10"]  # names from the image
    config = json.loads(husk_daemon.docker("inspect", "built:one").stdout)[0]["Config"]
    assert config["WorkingDir"] == "/app" and config["User"] == "1000"
    assert "8080/tcp" in config["ExposedPorts"] and config["Labels"]["purpose"] == "test"

    # Again, unchanged: every RUN and COPY comes from the cache, the same image results.
    # With --pull the base is fetched again (the same image): still all cached.
    again = _husk(husk_daemon, "build", "--pull", "-t", "built:two", *base, str(tmp_path))
    text = again.stdout.decode()
    assert again.returncode == 0, text
    assert "Running in" not in text and text.count("Using cache") == 4, text
    assert f"Pulling {daemon_busybox}" in text
    first = json.loads(husk_daemon.docker("inspect", "built:one").stdout)[0]["Id"]
    second = json.loads(husk_daemon.docker("inspect", "built:two").stdout)[0]["Id"]
    assert first == second

    # A failing RUN: its code and output, nothing tagged.
    failing = tmp_path / "failing"
    failing.mkdir()
    (failing / "Dockerfile").write_text(
        f"FROM {daemon_busybox}\nRUN echo about-to-fail && exit 3\nCMD true\n"
    )
    failed = _husk(husk_daemon, "build", "-t", "broken:one", str(failing))
    assert failed.returncode == 3, failed.stdout + failed.stderr
    assert b"about-to-fail" in failed.stdout
    assert b"returned a non-zero code: 3" in failed.stderr
    missing = husk_daemon.docker("image", "inspect", "broken:one", check=False)
    assert missing.returncode != 0

    # The docker CLI's classic builder against husk's socket.
    env = {**husk_daemon.env, "DOCKER_BUILDKIT": "0"}
    docker_built = subprocess.run(
        ["/usr/local/bin/docker", "build", "-q", "-t", "built:docker", *base, str(tmp_path)],
        env=env,
        capture_output=True,
        timeout=900,
    )
    assert docker_built.returncode == 0, docker_built.stderr
    assert docker_built.stdout.decode().strip() == second
    # Without DOCKER_BUILDKIT, the CLI (no buildx installed) falls back to the classic
    # builder as well.
    plain = subprocess.run(
        ["/usr/local/bin/docker", "build", "-q", *base, str(tmp_path)],
        env=husk_daemon.env,
        capture_output=True,
        timeout=900,
    )
    assert plain.returncode == 0 and plain.stdout.decode().strip() == second, plain.stderr
    docker_failed = subprocess.run(
        ["/usr/local/bin/docker", "build", str(failing)], env=env, capture_output=True, timeout=900
    )
    assert docker_failed.returncode == 3 and b"about-to-fail" in docker_failed.stdout

    # docker history of the built image: one step per instruction, newest first.
    steps = husk_daemon.docker(
        "history", "--no-trunc", "--format", "{{.CreatedBy}}", "built:one"
    ).stdout.decode()
    assert steps.splitlines()[0].startswith("/bin/sh -c #(nop)  CMD")
    assert "COPY --chmod=0755 tool.sh /usr/local/bin/tool" in steps

    # docker-py's images.build: the same (cached) image, the id from the aux message.
    client = husk_daemon.client()
    try:
        image, logs = client.images.build(
            path=str(tmp_path), tag="built:py", buildargs={"BASE": daemon_busybox}, pull=True
        )
        assert image.id == second
        assert any("Using cache" in str(item.get("stream", "")) for item in logs)
    finally:
        client.close()


# A static tool to set and read extended attributes (busybox has none): RUN sets them.
XATTR_TOOL = r"""
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/xattr.h>
int main(int argc, char **argv) {
    unsigned char value[256];
    if (argc == 5 && strcmp(argv[1], "set") == 0) {
        size_t n = strlen(argv[4]) / 2;
        for (size_t i = 0; i < n && i < sizeof value; i++)
            sscanf(argv[4] + 2 * i, "%2hhx", &value[i]);
        if (setxattr(argv[2], argv[3], value, n, 0) != 0) { perror("setxattr"); return 1; }
        return 0;
    }
    if (argc == 4 && strcmp(argv[1], "get") == 0) {
        ssize_t n = getxattr(argv[2], argv[3], value, sizeof value);
        if (n < 0) { perror("getxattr"); return 1; }
        for (ssize_t i = 0; i < n; i++) printf("%02x", value[i]);
        printf("\n");
        return 0;
    }
    return 2;
}
"""
CAP_NET_RAW_EP = "0100000200200000000000000000000000000000"  # VFS_CAP_REVISION_2, effective
INTEROP_DOCKERFILE = """\
ARG BASE
FROM ${BASE} AS vol
RUN mkdir -p /data && echo under-volume > /data/f
VOLUME /data
FROM ${BASE}
COPY --from=vol /data/f /from-volume
COPY xattr /usr/local/bin/xattr
RUN xattr set /usr/local/bin/xattr user.origin 6275696c74 \\
    && xattr set /usr/local/bin/xattr security.capability CAPABILITY \\
    && mkdir /tagged && xattr set /tagged user.dir 64
USER 1000
WORKDIR /made/here
CMD ["cat", "/from-volume"]
""".replace("CAPABILITY", CAP_NET_RAW_EP)
CHECK_BUILT = (
    "cat /from-volume; xattr get /usr/local/bin/xattr user.origin;"
    " xattr get /usr/local/bin/xattr security.capability; xattr get /tagged user.dir;"
    " stat -c '%u:%g %a' /made/here; pwd"
)
CONTAINERS_CONF = """\
[containers]
default_ulimits=["nofile=1024:1024","nproc=1024:1024"]
[engine]
runtime="runc"
"""


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return "sha256:" + digest.hexdigest()


def test_build_results_interoperate(
    husk_daemon: RunningDaemon, daemon_busybox: str, tmp_path: Path
) -> None:
    """RUN steps start from the boot template; xattrs written by RUN, a file under a
    VOLUME copied from a stage and WORKDIR's directory reach containers of the image;
    the image pushed to a registry is what skopeo pulls (digests checked), and the one
    saved is what podman loads and runs with runc."""
    context = tmp_path / "context"
    context.mkdir()
    source = tmp_path / "xattr.c"
    source.write_text(XATTR_TOOL)
    subprocess.run(
        ["gcc", "-static", "-O1", "-o", str(context / "xattr"), str(source)],
        check=True,
        capture_output=True,
        timeout=120,
    )
    (context / "Dockerfile").write_text(INTEROP_DOCKERFILE)
    built = _husk(
        husk_daemon,
        "build",
        "--no-cache",
        "-t",
        "husk.local/interop:1",
        "--build-arg",
        f"BASE={daemon_busybox}",
        str(context),
    )
    out = built.stdout.decode()
    assert built.returncode == 0, out + built.stderr.decode()

    # Every RUN container comes from the boot template, save the daemon's very first
    # VM (it boots cold and makes the template) when this test runs first.
    runs = re.findall(r"Running in (\w{12})", out)
    assert len(runs) == 2, out
    log = husk_daemon.log()
    found = [re.search(rf"\({run}\): VM from (\w+)", log) for run in runs]
    assert all(found), log[-3000:]
    paths = [m.group(1) for m in found if m]
    first_vm = log.index("): VM from ") == log.index(f"({runs[0]}): VM from ")
    assert paths == ["cold" if first_vm and paths[0] == "cold" else "template", "template"], (
        paths,
        log[-3000:],
    )

    shown = husk_daemon.docker(
        "run", "--rm", "--user", "0", "husk.local/interop:1", "sh", "-c", CHECK_BUILT
    )
    assert shown.stdout.decode().splitlines() == [
        "under-volume",
        "6275696c74",
        CAP_NET_RAW_EP,
        "64",
        "0:0 755",
        "/made/here",
    ], shown.stdout

    image = json.loads(husk_daemon.docker("image", "inspect", "husk.local/interop:1").stdout)[0]
    diff_ids = image["RootFS"]["Layers"]

    # Pushed with husk push, copied out of the registry by skopeo (which checks every
    # blob's digest), then checked again here: blobs, diff ids, the config digest.
    registry = daemon_busybox.rsplit("/husk/", 1)[0]
    remote = f"{registry}/husk/interop:1"
    assert _husk(husk_daemon, "tag", "husk.local/interop:1", remote).returncode == 0
    pushed = _husk(husk_daemon, "push", remote)
    assert pushed.returncode == 0, pushed.stderr
    layout = tmp_path / "layout"
    subprocess.run(
        ["skopeo", "copy", "--src-tls-verify=false", f"docker://{remote}", f"oci:{layout}:pulled"],
        check=True,
        capture_output=True,
        timeout=300,
    )
    index = json.loads((layout / "index.json").read_text())
    manifest_digest = index["manifests"][0]["digest"]
    blobs = layout / "blobs" / "sha256"
    manifest = json.loads((blobs / manifest_digest.split(":")[1]).read_text())
    assert manifest["config"]["digest"] == image["Id"]
    pulled_diff_ids = []
    for layer in manifest["layers"]:
        blob = blobs / layer["digest"].split(":")[1]
        assert _sha256(blob) == layer["digest"] and blob.stat().st_size == layer["size"]
        with gzip.open(blob) as plain:
            pulled_diff_ids.append("sha256:" + hashlib.file_digest(plain, "sha256").hexdigest())
    assert pulled_diff_ids == diff_ids
    config = json.loads((blobs / image["Id"].split(":")[1]).read_text())
    assert config["rootfs"]["diff_ids"] == diff_ids

    # husk save | podman load: the same image, run by podman with runc.
    archive = tmp_path / "interop.tar"
    saved = _husk(husk_daemon, "save", "-o", str(archive), "husk.local/interop:1")
    assert saved.returncode == 0, saved.stderr
    work = Path(tempfile.mkdtemp(prefix="husk-build-podman-"))
    conf = work / "containers.conf"
    conf.write_text(CONTAINERS_CONF)
    podman = ["podman", "--root", str(work / "root"), "--runroot", str(work / "runroot")]
    env = {**os.environ, "CONTAINERS_CONF": str(conf)}

    def run_podman(*args: str) -> str:
        done = subprocess.run(
            [*podman, *args], env=env, capture_output=True, text=True, timeout=300
        )
        assert done.returncode == 0, f"podman {args}: {done.stderr}"
        return done.stdout

    try:
        run_podman("load", "-i", str(archive))
        loaded = json.loads(run_podman("image", "inspect", "husk.local/interop:1"))[0]
        assert "sha256:" + loaded["Id"] == image["Id"]
        assert loaded["RootFS"]["Layers"] == diff_ids
        ran = run_podman(
            "run",
            "--rm",
            "--network",
            "none",
            "--user",
            "0",
            "husk.local/interop:1",
            "sh",
            "-c",
            CHECK_BUILT,
        )
        assert ran.splitlines() == [
            "under-volume",
            "6275696c74",
            CAP_NET_RAW_EP,
            "64",
            "0:0 755",
            "/made/here",
        ], ran
    finally:
        subprocess.run(
            [*podman, "system", "reset", "-f"], env=env, capture_output=True, check=False
        )
        shutil.rmtree(work, ignore_errors=True)
