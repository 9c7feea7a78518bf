"""husk as an OCI runtime (issue 14): `run --rm IMAGE true` through each engine, with
husk-runtime and with runc, beside `husk run --rm`, paired.

Run as root. Every engine is started by the bench with its state under temporary
directories, exactly as the engine tests do (tests/test_ociruntime_*_vm.py): podman 4.3
with its own --root/--runroot and containers.conf, containerd 1.6 (`ctr run`, the
io.containerd.runc.v2 shim with --runc-binary) and dockerd 20.10 (`--add-runtime husk`,
`--iptables=false --bridge=none`). Containers use no network (`--network none`, or ctr's
default), so runc and husk-runtime do the same work. The image is Debian's busybox-static
as a root file system, imported into each engine; `husk run` uses the same tree as
`husk.local/busybox` in a scratch data directory. husk-runtime is this checkout's
(`main()` of `husk.ociruntime.cli` as the console script runs it, no pyenv shim in
between), with the scratch data directory's guest bundle and boot templates; the
checkout's bytecode is compiled first, as an installed husk's is.

Every configuration is warmed up once (the first start builds the boot template of its
shape); then the runs go round all configurations in turn, so load on the host falls
on all of them alike. Everything runs under TCG.

    python3 bench/bench_ociruntime.py [--runs 5] [--quick] [--json]
"""

from __future__ import annotations

import compileall
import contextlib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import benchlib
from benchlib import Figure, PartOptions, progress

SECTION = "husk as an OCI runtime (issue 14)"
TIMEOUT = 300.0


def _timed(run: Callable[[], subprocess.CompletedProcess[str]]) -> float:
    started = time.monotonic()
    done = run()
    seconds = time.monotonic() - started
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, done.args))}: {done.stderr.strip()[-500:]}")
    return seconds


def _run(argv: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        argv, env=env, capture_output=True, text=True, timeout=TIMEOUT, check=False
    )


@contextlib.contextmanager
def _engines(work: Path) -> Iterator[dict[str, Callable[[], subprocess.CompletedProcess[str]]]]:
    """The engine configurations, each a callable that runs one `run --rm ... true`."""
    from ociruntime_fixtures import busybox_tar, kill_processes, kill_shims
    from test_ociruntime_ctr_vm import IMAGE as CTR_IMAGE
    from test_ociruntime_ctr_vm import Containerd
    from test_ociruntime_docker_vm import IMAGE as DOCKER_IMAGE
    from test_ociruntime_docker_vm import Dockerd
    from test_ociruntime_podman_vm import IMAGE as PODMAN_IMAGE
    from test_ociruntime_podman_vm import Engine
    from testimages import busybox_image_layout

    stop: list[Callable[[], None]] = []
    run_dirs: list[Path] = []
    try:
        for name in ("podman", "containerd", "docker"):
            (work / name).mkdir()
        progress("oci: podman")
        podman = Engine(work / "podman")
        run_dirs.append(podman.run_dir)
        podman("import", str(busybox_tar(work / "podman")), PODMAN_IMAGE)
        podman_runc = [arg for arg in podman.base if arg not in ("--runtime", str(podman.wrapper))]
        stop.append(lambda: _run([*podman.base, "system", "reset", "-f"], podman.env) and None)

        progress("oci: containerd")
        containerd = Containerd(work / "containerd")
        run_dirs.append(containerd.run_dir)
        stop.append(containerd.stop)
        containerd.wait_ready()
        layout = busybox_image_layout(work / "containerd" / "layout")
        archive = work / "containerd" / "image.tar"
        with tarfile.open(archive, "w") as tar:
            for entry in sorted(layout.iterdir()):
                tar.add(entry, arcname=entry.name)
        containerd.ctr("images", "import", "--base-name", CTR_IMAGE.rsplit(":", 1)[0], str(archive))

        progress("oci: dockerd")
        dockerd = Dockerd(work / "docker")
        run_dirs.append(dockerd.run_dir)
        stop.append(dockerd.stop)
        dockerd.wait_ready()
        dockerd.docker("import", str(busybox_tar(work / "docker")), DOCKER_IMAGE)

        counter = iter(range(1_000_000))

        def ctr(husk: bool) -> subprocess.CompletedProcess[str]:
            extra = containerd.run_args() if husk else []
            return containerd.ctr(
                "run", "--rm", *extra, CTR_IMAGE, f"bench-{next(counter)}", "true", check=False
            )

        def docker(husk: bool) -> subprocess.CompletedProcess[str]:
            runtime = ["--runtime", "husk"] if husk else []
            return dockerd.docker(
                "run", "--rm", *runtime, "--network", "none", DOCKER_IMAGE, "true", check=False
            )

        podman_args = ["run", "--rm", "--network", "none", PODMAN_IMAGE, "true"]
        yield {
            "podman + husk-runtime": lambda: _run([*podman.base, *podman_args], podman.env),
            "podman + runc": lambda: _run([*podman_runc, *podman_args], podman.env),
            "ctr + husk-runtime": lambda: ctr(True),
            "ctr + runc": lambda: ctr(False),
            "docker + husk-runtime": lambda: docker(True),
            "docker + runc": lambda: docker(False),
        }
    finally:
        for step in reversed(stop):
            with contextlib.suppress(Exception):
                step()
        kill_shims(work)
        for run_dir in run_dirs:
            kill_processes(run_dir)
            shutil.rmtree(run_dir, ignore_errors=True)
        subprocess.run(["umount", "-R", str(work)], capture_output=True, check=False)


def measure(options: PartOptions) -> list[Figure]:
    if os.geteuid() != 0:
        return [Figure(SECTION, "`run --rm true`", "s", status="not available: run as root")]
    benchlib.use_tcg()
    benchlib.import_tests_helpers()
    # As installed, husk has its modules' bytecode. A source tree in an environment with
    # PYTHONDONTWRITEBYTECODE (this one) has none: every engine call would compile what
    # it imports (the keeper's stack: ~0.5 s of CPU) where the daemon compiled once.
    compileall.compile_dir(benchlib.REPO_ROOT / "src", quiet=1)
    runs = 2 if options.quick else options.runs
    with benchlib.scratch_root("hbo") as root:
        benchlib.link_bundle(root)
        image = benchlib.import_busybox(root)
        env = benchlib.husk_env(root)
        # husk-runtime (the engines' wrapper) reads the same data directory.
        os.environ.update({k: v for k, v in env.items() if k.startswith("HUSK_")})
        husk_argv = [sys.executable, "-m", "husk.cli.main", "run", "--rm", image, "true"]
        work = Path(tempfile.mkdtemp(prefix="hbo-engines-", dir="/tmp"))
        try:
            with _engines(work) as configurations:
                configurations = {
                    "husk run --rm": lambda: _run(husk_argv, env),
                    **configurations,
                }
                samples: dict[str, list[float]] = {label: [] for label in configurations}
                for label, run in configurations.items():
                    progress(f"oci: warm-up, {label}")
                    _timed(run)
                for index in range(runs):
                    for label, run in configurations.items():
                        progress(f"oci: {label}, run {index + 1}/{runs}")
                        samples[label].append(_timed(run))
        finally:
            shutil.rmtree(work, ignore_errors=True)
    figures = [
        Figure(SECTION, f"`run --rm IMAGE true`, {label}", "s", values, _command(label))
        for label, values in samples.items()
    ]
    by_label: dict[str, Any] = {figure.name.split(", ", 1)[1]: figure for figure in figures}
    husk_median = by_label["husk run --rm"].median or 0.0
    for engine in ("podman", "ctr", "docker"):
        with_husk = by_label[f"{engine} + husk-runtime"].median or 0.0
        figures.append(
            Figure(
                SECTION,
                f"{engine} + husk-runtime minus `husk run --rm` (medians, same run)",
                "s",
                summary=(with_husk - husk_median, None, None),
                derived=True,
                note="issue 14's target: ≤ 0.3 s" if engine == "podman" else "",
            )
        )
    return figures


def _command(label: str) -> str:
    return {
        "husk run --rm": "husk run --rm husk.local/busybox true",
        "podman + husk-runtime": "podman --runtime husk-runtime run --rm --network none IMAGE true",
        "podman + runc": "podman run --rm --network none IMAGE true",
        "ctr + husk-runtime": "ctr run --rm --runtime io.containerd.runc.v2 "
        "--runc-binary husk-runtime IMAGE ID true",
        "ctr + runc": "ctr run --rm IMAGE ID true",
        "docker + husk-runtime": "docker run --rm --runtime husk --network none IMAGE true",
        "docker + runc": "docker run --rm --network none IMAGE true",
    }[label]


if __name__ == "__main__":
    benchlib.part_main("ociruntime", __doc__ or "", measure)
