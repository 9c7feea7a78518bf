"""The oracle's own harness: a dockerd of ours runs containers and leaves nothing behind."""

from __future__ import annotations

from pathlib import Path

from engines import Engine, mounts_under, processes_naming, start_dockerd, stop_dockerd

from testimages import busybox_entries, tar_bytes


def test_dockerd_runs_a_container_and_leaves_nothing(tmp_path: Path) -> None:
    daemon = start_dockerd()
    engine = Engine(
        "docker",
        {"DOCKER_HOST": f"unix://{daemon.socket}", "DOCKER_CONFIG": str(tmp_path)},
        run_args=("--network", "none"),
        log=daemon.log,
    )
    try:
        rootfs = tmp_path / "rootfs.tar"
        rootfs.write_bytes(tar_bytes(busybox_entries()))
        engine.docker("import", str(rootfs), "conf-harness:1", check=True)
        # A running container (its shim and overlay mount) is there when the daemon stops.
        engine.docker("run", "-d", *engine.run_args, "conf-harness:1", "sleep", "300", check=True)
        ran = engine.run("conf-harness:1", "sh", "-c", "echo $((6 * 7))")
        assert (ran.returncode, ran.stdout) == (0, b"42\n")
        assert processes_naming(str(daemon.root).encode())  # containerd and a shim
    finally:
        stop_dockerd(daemon, engine)
    assert daemon.process.poll() is not None
    assert processes_naming(str(daemon.root).encode()) == []
    assert mounts_under(daemon.root) == []
    assert not daemon.root.exists()
