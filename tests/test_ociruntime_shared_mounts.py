"""husk's own processes leave an engine's shared mounts alone (issue 14's docker race).

The docker engine makes its --data-root a *shared* mount and mounts each container's
overlay root file system under it. slirp4netns's sandbox (1.2.0, as root) copies the
mount namespace it starts in, makes only ``/`` private and lazily unmounts the old
root: started in the host's namespace, that unmount propagated through the shared
data root and took every overlay rootfs of dockerd off the host, so a `docker run
--runtime husk` whose ``create`` came next found an empty root ("exec: true: not
found"). husk starts slirp4netns (every `husk run` VM's way out) in a mount namespace
of its own whose mounts are private.

No VM: the scenario runs in a throwaway mount namespace (``unshare --mount``) that
stands for the host's, with a shared bind and a tmpfs under it standing for dockerd's
data root and a container's rootfs; slirp4netns is real and started by husk's code.
Nothing of it outlives the namespace, and other processes on the host never see it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
SRC = TESTS.parent / "src"

SCENARIO = """
import json, os, subprocess, sys
from pathlib import Path
from husk.vm import network
from ociruntime_fixtures import netns_holder, start_husk_egress

root = Path(sys.argv[1])
rootfs = root / "merged"
rootfs.mkdir()
# as dockerd does with its --data-root when the mount above it is private
subprocess.run(["mount", "--bind", root, root], check=True)
subprocess.run(["mount", "--make-shared", root], check=True)


def rootfs_survives(start) -> bool:
    subprocess.run(["mount", "-t", "tmpfs", "rootfs", rootfs], check=True)
    (rootfs / "true").write_text("")
    start()
    survived = os.path.ismount(rootfs) and (rootfs / "true").exists()
    if os.path.ismount(rootfs):
        subprocess.run(["umount", rootfs], check=True)
    return survived


log = root / "network.log"
with netns_holder() as pid:
    husk = rootfs_survives(lambda: start_husk_egress(pid, log))
    network.private_mounts_prefix = lambda: []  # slirp4netns started as before the fix
    bare = rootfs_survives(lambda: start_husk_egress(pid, log))
print(json.dumps({"husk": husk, "bare": bare}))
"""


@pytest.mark.usefixtures("as_root")
def test_a_vms_way_out_leaves_the_engines_shared_mounts_alone(tmp_path: Path) -> None:
    for tool in ("slirp4netns", "unshare"):  # install.sh installs both
        assert shutil.which(tool), f"{tool} is not installed: run install.sh"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), str(TESTS)])}
    isolated = ["unshare", "--mount", "--propagation", "private"]
    result = subprocess.run(
        [*isolated, sys.executable, "-c", SCENARIO, str(tmp_path)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    outcome = json.loads(result.stdout.splitlines()[-1])
    # husk's slirp4netns: the container's root file system is still mounted on the host
    assert outcome["husk"] is True
    # the same slirp4netns started in the host's namespace unmounts it there: what the
    # test guards against (if a fixed slirp4netns stops doing so, this line says why)
    assert outcome["bare"] is False, "slirp4netns no longer propagates its unmounts"
