"""``commit`` through the real daemon: the docker CLI and husk's own CLI, exited and
running containers, then runs of the committed images."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from daemon_fixtures import RunningDaemon

pytestmark = pytest.mark.vm

CHANGES = (
    "echo new > /new && echo more >> /etc/passwd && rm /etc/group"
    " && ln /new /new.link && ln -s /new /new.sym"
    " && mkdir -p /opq && echo old > /opq/old && mkdir /keep && chown 1000:1000 /keep"
    " && echo x > /suid && chmod 4755 /suid"
)
CHECK = (
    "cat /new /new.link; readlink /new.sym; tail -1 /etc/passwd;"
    " test -e /etc/group || echo group-gone; stat -c '%u:%g %i' /keep /new /new.link;"
    " echo $GREETING; stat -c %a /suid"
)


def test_commit_exited_and_running(husk_daemon: RunningDaemon, daemon_busybox: str) -> None:
    docker = husk_daemon.docker
    docker("run", "--name", "commit1", daemon_busybox, "sh", "-c", CHANGES)
    docker(
        "commit",
        "-c",
        "ENV GREETING=hello",
        "-c",
        'CMD ["sh", "-c", "echo from-cmd"]',
        "-m",
        "my message",
        "commit1",
        "committed:one",
    )
    shown = docker("run", "--rm", "committed:one", "sh", "-c", CHECK).stdout.decode().splitlines()
    assert shown[:5] == ["new", "new", "/new", "more", "group-gone"], shown
    keep, new, link = shown[5], shown[6], shown[7]
    assert keep.split()[0] == "1000:1000"
    assert new.split()[1] == link.split()[1], "the hard link is one inode"
    assert shown[8] == "hello"
    assert shown[9] == "4755", "the setuid bit is kept"
    assert docker("run", "--rm", "committed:one").stdout == b"from-cmd\n"

    history = json.loads(
        docker("history", "--no-trunc", "--format", "{{json .}}", "committed:one")
        .stdout.decode()
        .splitlines()[0]
    )
    assert history["Comment"] == "my message"

    # A running container, through husk's own CLI: a deletion of the first commit's
    # directory contents (an opaque directory or whiteouts) is seen by the next image.
    docker(
        "run",
        "-d",
        "--name",
        "commit2",
        "committed:one",
        "sh",
        "-c",
        "rm -rf /opq && mkdir /opq && echo fresh > /opq/fresh && rm /new.sym && sleep 600",
    )
    husk = [sys.executable, "-m", "husk.cli.main"]
    env = husk_daemon.env
    made = subprocess.run(
        [*husk, "commit", "commit2", "committed:two"], env=env, capture_output=True, timeout=600
    )
    assert made.returncode == 0, made.stderr
    assert made.stdout.decode().strip().startswith("sha256:")
    listing = (
        docker(
            "run", "--rm", "committed:two", "sh", "-c", "ls /opq; test -e /new.sym || echo sym-gone"
        )
        .stdout.decode()
        .split()
    )
    assert listing == ["fresh", "sym-gone"]
    shown_history = subprocess.run(
        [*husk, "history", "committed:two"], env=env, capture_output=True, timeout=60
    )
    lines = shown_history.stdout.decode().splitlines()
    assert lines[0].split()[:2] == ["IMAGE", "CREATED"]
    assert "my message" in shown_history.stdout.decode()
    assert len(lines) >= 4  # busybox's step(s) and the two commits
    bad = subprocess.run([*husk, "commit", "nope", "x:y"], env=env, capture_output=True, timeout=60)
    assert bad.returncode == 125 and b"No such container" in bad.stderr
    # The committed image is a registry's like any other: pushed, then pulled by digest.
    registry = daemon_busybox.rsplit("/husk/", 1)[0]
    pushed = f"{registry}/husk/committed:two"
    docker("tag", "committed:two", pushed)
    docker("push", pushed)
    digests = json.loads(docker("inspect", pushed).stdout)[0]["RepoDigests"]
    assert digests and digests[0].startswith(f"{registry}/husk/committed@sha256:")
    docker("rmi", pushed)
    docker("pull", digests[0])
    docker("rm", "-f", "commit1", "commit2")
