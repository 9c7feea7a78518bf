"""Image builds (issue 15): a 5-step Dockerfile built cold (--no-cache) and fully cached by
`husk build`, by `podman build` (buildah, in podman 4.3) and by the docker engine's classic
builder, paired.

Run as root. The Dockerfile: FROM husk.local/busybox, RUN, COPY, RUN, ENV, CMD. Every
builder runs its RUN steps without a network (`--network none`), from the same base
image: husk's busybox test image (Debian's busybox-static), given to the other two with
`husk save | podman load` and `docker load` (nothing is pulled; Docker Hub is never
asked). podman keeps its storage in a temporary directory (--root/--runroot, its own
containers.conf naming runc, isolation `oci`); dockerd 20.10 (Debian's docker.io) is
started by the bench with `--iptables=false --bridge=none` and its --data-root,
--exec-root, --pidfile and socket under a temporary directory; the docker CLI builds with
`DOCKER_BUILDKIT=0` (the classic builder). husk runs with a scratch data directory whose
daemon the CLI starts on demand; each of its RUN steps is a VM (from the boot template).

Each builder builds once first (warm-up: husk makes its boot template there). Then
every run builds with each builder in turn (the order rotating run by run), cold then
cached, so load on the host falls on all alike. Everything runs under TCG.

    python3 bench/bench_build.py [--runs 5] [--quick] [--json]
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import benchlib
from benchlib import Figure, PartOptions, progress

SECTION = "Image builds (issue 15)"
TIMEOUT = 900.0
IMAGE = benchlib.BUSYBOX_IMAGE
DOCKERFILE = f"""\
FROM {IMAGE}
RUN echo built > /built.txt && mkdir -p /app
COPY app.txt /app/app.txt
RUN cat /app/app.txt /built.txt > /app/both.txt
ENV MODE=bench
CMD ["cat", "/app/both.txt"]
"""
DOCKER_CLI = shutil.which("docker") or "/usr/local/bin/docker"

Build = Callable[[bool], subprocess.CompletedProcess[str]]
"""One build of the context: ``True`` cold (no cache), ``False`` with the cache."""


def _run(argv: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        argv, env=env, capture_output=True, text=True, timeout=TIMEOUT, check=False
    )


def _checked(argv: list[str], env: dict[str, str]) -> str:
    done = _run(argv, env)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)}: {(done.stderr or done.stdout).strip()[-800:]}")
    return done.stdout


def _timed(build: Build, cold: bool) -> float:
    started = time.monotonic()
    done = build(cold)
    seconds = time.monotonic() - started
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, done.args))}: {done.stderr.strip()[-800:]}")
    return seconds


@contextlib.contextmanager
def _builders(husk_env: dict[str, str], root: Path, context: Path) -> Iterator[dict[str, Build]]:
    """``husk`` (with ``husk_env``), ``podman`` and ``docker`` builds of ``context``, the
    engines' state under ``root`` (removed on the way out)."""
    from ociruntime_fixtures import EngineDaemon

    husk = [sys.executable, "-m", "husk.cli.main"]
    base = root / "base.tar"
    _checked([*husk, "save", "-o", str(base), IMAGE], husk_env)

    podman, podman_env = benchlib.private_podman(root / "podman")

    docker_work = root / "docker"
    docker_work.mkdir()
    docker_socket = docker_work / "dockerd.sock"
    docker_env = {
        **os.environ,
        "DOCKER_HOST": f"unix://{docker_socket}",
        "DOCKER_CONFIG": str(docker_work),
        "DOCKER_BUILDKIT": "0",
    }
    dockerd: EngineDaemon | None = None
    try:
        progress("build: podman load")
        _checked([*podman, "load", "-i", str(base)], podman_env)
        progress("build: dockerd, docker load")
        dockerd = EngineDaemon(
            [
                "dockerd",
                "--iptables=false",
                "--bridge=none",
                "--data-root",
                str(docker_work / "data"),
                "--exec-root",
                str(docker_work / "exec"),
                "--pidfile",
                str(docker_work / "dockerd.pid"),
                "-H",
                f"unix://{docker_socket}",
            ],
            docker_work / "dockerd.log",
        )
        dockerd.wait_ready(lambda: _run([DOCKER_CLI, "version"], docker_env).returncode == 0, 60.0)
        _checked([DOCKER_CLI, "load", "-i", str(base)], docker_env)

        def husk_build(cold: bool) -> subprocess.CompletedProcess[str]:
            flags = ["--no-cache"] if cold else []
            argv = [*husk, "build", "-q", "--network", "none", *flags, "-t", "bench:husk"]
            return _run([*argv, str(context)], husk_env)

        def podman_build(cold: bool) -> subprocess.CompletedProcess[str]:
            flags = ["--no-cache"] if cold else []
            argv = [*podman, "build", "-q", "--network", "none", "--isolation", "oci", *flags]
            return _run([*argv, "-t", "bench:podman", str(context)], podman_env)

        def docker_build(cold: bool) -> subprocess.CompletedProcess[str]:
            flags = ["--no-cache"] if cold else []
            argv = [DOCKER_CLI, "build", "-q", "--network", "none", *flags, "-t", "bench:docker"]
            return _run([*argv, str(context)], docker_env)

        yield {"husk": husk_build, "podman": podman_build, "docker": docker_build}
    finally:
        _run([*podman, "system", "reset", "-f"], podman_env)
        if dockerd is not None:
            with contextlib.suppress(Exception):
                _run([DOCKER_CLI, "system", "prune", "-af"], docker_env)
            dockerd.stop()
        subprocess.run(["umount", "-R", str(docker_work)], capture_output=True, check=False)


def measure(options: PartOptions) -> list[Figure]:
    if os.geteuid() != 0:
        return [Figure(SECTION, "5-step build", "s", status="not available: run as root")]
    benchlib.use_tcg()
    benchlib.import_tests_helpers()
    runs = 2 if options.quick else options.runs
    samples: dict[str, list[float]] = {}
    with benchlib.scratch_root("hbb") as root:
        benchlib.link_bundle(root)
        benchlib.import_busybox(root)
        context = root / "context"
        context.mkdir()
        (context / "Dockerfile").write_text(DOCKERFILE)
        (context / "app.txt").write_text("app\n")
        work = Path(tempfile.mkdtemp(prefix="hbb-engines-", dir="/tmp"))
        try:
            with _builders(benchlib.husk_env(root), work, context) as builders:
                names = list(builders)
                for name in names:
                    progress(f"build: warm-up, {name}")
                    _timed(builders[name], True)
                for index in range(runs):
                    order = names[index % len(names) :] + names[: index % len(names)]
                    for name in order:
                        for cold in (True, False):
                            label = f"{name}, {'cold (--no-cache)' if cold else 'fully cached'}"
                            progress(f"build: {label}, run {index + 1}/{runs}")
                            samples.setdefault(label, []).append(_timed(builders[name], cold))
        finally:
            shutil.rmtree(work, ignore_errors=True)
    figures = [
        Figure(SECTION, f"5-step build, {label}", "s", values, _command(label))
        for label, values in sorted(samples.items())
    ]
    medians = {f.name.split(", ", 1)[1]: f.median or 0.0 for f in figures}
    for peer in ("podman", "docker"):
        for kind in ("cold (--no-cache)", "fully cached"):
            peer_median = medians.get(f"{peer}, {kind}") or 0.0
            if peer_median:
                figures.append(
                    Figure(
                        SECTION,
                        f"husk / {peer}, {kind} (medians, same run)",
                        "x",
                        summary=(medians[f"husk, {kind}"] / peer_median, None, None),
                        derived=True,
                    )
                )
    return figures


def _command(label: str) -> str:
    name, kind = label.split(", ", 1)
    cold = " --no-cache" if kind.startswith("cold") else ""
    return {
        "husk": f"husk build -q --network none{cold} -t bench:husk CONTEXT",
        "podman": f"podman build -q --network none --isolation oci{cold} -t bench:podman CONTEXT"
        " (runc; storage in a temp dir)",
        "docker": f"DOCKER_BUILDKIT=0 docker build -q --network none{cold} -t bench:docker"
        " CONTEXT (dockerd 20.10, classic builder)",
    }[name]


if __name__ == "__main__":
    benchlib.part_main("build", __doc__ or "", measure)
