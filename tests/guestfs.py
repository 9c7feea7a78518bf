"""A small container root built from Debian's busybox-static, as an erofs disk image.

Used by the guest-core tests, which need a rootfs before the image layer exists.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

BUSYBOX = Path("/bin/busybox")

PASSWD = """root:x:0:0:root:/root:/bin/sh
app:x:1000:1000:app user:/home/app:/bin/sh
nobody:x:65534:65534:nobody:/nonexistent:/bin/false
"""
GROUP = """root:x:0:
staff:x:50:app
audio:x:29:app
app:x:1000:
nogroup:x:65534:
"""


def busybox_tree(root: Path) -> Path:
    """Lays out a busybox rootfs at ``root`` (which must not exist)."""
    for d in ("bin", "etc", "proc", "sys", "dev", "tmp", "root", "home/app", "www", "var"):
        (root / d).mkdir(parents=True, exist_ok=True)
    shutil.copy2(BUSYBOX, root / "bin" / "busybox")
    applets = subprocess.run(
        [str(BUSYBOX), "--list"], check=True, capture_output=True, text=True
    ).stdout.split()
    for applet in applets:
        if applet != "busybox" and "/" not in applet:
            os.symlink("busybox", root / "bin" / applet)
    os.chmod(root / "tmp", 0o1777)
    os.chown(root / "home" / "app", 1000, 1000)
    (root / "etc" / "passwd").write_text(PASSWD)
    (root / "etc" / "group").write_text(GROUP)
    (root / "www" / "index.html").write_text("hello from husk\n")
    return root


def busybox_erofs(work: Path) -> Path:
    """An erofs image of :func:`busybox_tree` (built once per ``work`` dir)."""
    image = work / "busybox.erofs"
    if image.exists():
        return image
    tree = busybox_tree(work / "busybox-root")
    partial = work / "busybox.erofs.partial"
    subprocess.run(["mkfs.erofs", "--quiet", str(partial), str(tree)], check=True)
    partial.rename(image)
    return image
