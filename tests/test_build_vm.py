"""``husk build`` and ``docker build`` (the classic builder) against the real daemon:
RUN steps in VMs, COPY --from a stage, the cache, a failing RUN."""

from __future__ import annotations

import json
import subprocess
import sys
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
