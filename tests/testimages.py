"""Builders of the test images, as OCI image layouts, from Debian packages on this host.

Every builder is deterministic (fixed mtimes, sorted entries, gzip without a
timestamp): the same inputs give the same digests, so pushes and imports are
cheap to repeat.

- :func:`busybox_image_layout`: busybox-static with its applet links, /etc/passwd
  and /etc/group with a non-root user, ``Cmd ["sh"]``.
- :func:`multilayer_image_layout`: four layers (gzip, gzip, zstd, plain tar) with
  whiteouts, an opaque directory, hardlinks, symlinks, setuid/setgid files,
  ownership, a device node and an xattr.
- :func:`multiplatform_index_layout`: an index for linux/amd64 and linux/arm64.
- :func:`docker_cli_image_layout`: busybox plus the host's static docker CLI.
- :func:`python_testcontainers_image_layout`: busybox plus Debian's python3.11 and
  testcontainers with docker-py.
- :func:`install_busybox_image`: imports the busybox image into an image store
  without a registry (``python tests/testimages.py busybox``).
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import shutil
import subprocess
import sys
import tarfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import zstandard

BUSYBOX_BINARY = Path("/bin/busybox")
BUSYBOX_DEBIAN_PACKAGE = "busybox-static"
FIXED_MTIME = 1_700_000_000
CREATED = "2023-11-14T22:13:20Z"
BUSYBOX_NAME = "husk.local/busybox:latest"
DEFAULT_ENV = ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"]

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
LAYER_MEDIA_TYPES = {
    "gzip": "application/vnd.oci.image.layer.v1.tar+gzip",
    "zstd": "application/vnd.oci.image.layer.v1.tar+zstd",
    "none": "application/vnd.oci.image.layer.v1.tar",
}

PASSWD = (
    "root:x:0:0:root:/root:/bin/sh\n"
    "daemon:x:1:1:daemon:/usr/sbin:/bin/false\n"
    "husk:x:1000:1000:husk test user:/home/husk:/bin/sh\n"
    "nobody:x:65534:65534:nobody:/nonexistent:/bin/false\n"
)
GROUP = "root:x:0:\ndaemon:x:1:\nwheel:x:10:husk\nhusk:x:1000:\nnogroup:x:65534:\n"


@dataclass(frozen=True)
class Entry:
    """One tar entry. ``kind``: file, dir, symlink, hardlink, chardev, blockdev, fifo."""

    path: str
    kind: str = "file"
    data: bytes = b""
    mode: int = 0o644
    uid: int = 0
    gid: int = 0
    target: str = ""
    major: int = 0
    minor: int = 0
    xattrs: tuple[tuple[str, str], ...] = ()


def file(
    path: str, data: bytes | str = b"", mode: int = 0o644, uid: int = 0, gid: int = 0
) -> Entry:
    raw = data.encode() if isinstance(data, str) else data
    return Entry(path, "file", raw, mode, uid, gid)


def directory(path: str, mode: int = 0o755, uid: int = 0, gid: int = 0) -> Entry:
    return Entry(path, "dir", mode=mode, uid=uid, gid=gid)


def symlink(path: str, target: str) -> Entry:
    return Entry(path, "symlink", mode=0o777, target=target)


def hardlink(path: str, target: str) -> Entry:
    return Entry(path, "hardlink", target=target)


_KIND_TO_TYPE = {
    "file": tarfile.REGTYPE,
    "dir": tarfile.DIRTYPE,
    "symlink": tarfile.SYMTYPE,
    "hardlink": tarfile.LNKTYPE,
    "chardev": tarfile.CHRTYPE,
    "blockdev": tarfile.BLKTYPE,
    "fifo": tarfile.FIFOTYPE,
}


def tar_bytes(entries: Iterable[Entry]) -> bytes:
    """An uncompressed tar of ``entries`` in the given order (order matters for hardlinks)."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for entry in entries:
            info = tarfile.TarInfo(entry.path.lstrip("/") + ("/" if entry.kind == "dir" else ""))
            info.type = _KIND_TO_TYPE[entry.kind]
            info.mode = entry.mode
            info.uid, info.gid = entry.uid, entry.gid
            info.uname = info.gname = ""
            info.mtime = FIXED_MTIME
            info.linkname = entry.target.lstrip("/") if entry.kind == "hardlink" else entry.target
            info.devmajor, info.devminor = entry.major, entry.minor
            if entry.xattrs:
                info.pax_headers = {f"SCHILY.xattr.{k}": v for k, v in entry.xattrs}
            if entry.kind == "file":
                info.size = len(entry.data)
                tar.addfile(info, io.BytesIO(entry.data))
            else:
                tar.addfile(info)
    return buffer.getvalue()


def compress(data: bytes, compression: str) -> bytes:
    if compression == "gzip":
        out = io.BytesIO()
        with gzip.GzipFile(fileobj=out, mode="wb", mtime=0, compresslevel=6) as handle:
            handle.write(data)
        return out.getvalue()
    if compression == "zstd":
        return zstandard.ZstdCompressor(level=3).compress(data)
    if compression == "none":
        return data
    raise ValueError(f"unknown compression {compression!r}")


def _digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _json(doc: Any) -> bytes:
    return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()


@dataclass
class Layer:
    entries: Sequence[Entry]
    compression: str = "gzip"


@dataclass
class ImageSpec:
    layers: Sequence[Layer]
    architecture: str = "amd64"
    os: str = "linux"
    variant: str = ""
    cmd: list[str] | None = field(default_factory=lambda: ["sh"])
    entrypoint: list[str] | None = None
    env: list[str] = field(default_factory=lambda: list(DEFAULT_ENV))
    workdir: str = ""
    user: str = ""
    labels: dict[str, str] = field(default_factory=dict)
    exposed_ports: dict[str, dict[str, Any]] = field(default_factory=dict)
    stop_signal: str = ""
    volumes: list[str] = field(default_factory=list)
    """The image's VOLUME paths (Config.Volumes)."""


class LayoutWriter:
    """Writes blobs into an OCI image layout directory."""

    def __init__(self, dest: Path) -> None:
        self.dest = dest
        self.blobs = dest / "blobs" / "sha256"
        self.blobs.mkdir(parents=True, exist_ok=True)
        (dest / "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}')

    def blob(self, data: bytes, media_type: str) -> dict[str, Any]:
        digest = _digest(data)
        path = self.blobs / digest.split(":", 1)[1]
        if not path.exists():
            path.write_bytes(data)
        return {"mediaType": media_type, "digest": digest, "size": len(data)}

    def image(self, spec: ImageSpec) -> dict[str, Any]:
        """Write an image's layers, config and manifest; return the manifest descriptor."""
        layer_descriptors = []
        diff_ids = []
        history = []
        for number, layer in enumerate(spec.layers):
            raw = tar_bytes(layer.entries)
            diff_ids.append(_digest(raw))
            blob = compress(raw, layer.compression)
            layer_descriptors.append(self.blob(blob, LAYER_MEDIA_TYPES[layer.compression]))
            history.append({"created": CREATED, "created_by": f"husk testimages layer {number}"})
        container_config: dict[str, Any] = {"Env": spec.env}
        if spec.cmd is not None:
            container_config["Cmd"] = spec.cmd
        if spec.entrypoint is not None:
            container_config["Entrypoint"] = spec.entrypoint
        if spec.workdir:
            container_config["WorkingDir"] = spec.workdir
        if spec.user:
            container_config["User"] = spec.user
        if spec.labels:
            container_config["Labels"] = spec.labels
        if spec.exposed_ports:
            container_config["ExposedPorts"] = spec.exposed_ports
        if spec.stop_signal:
            container_config["StopSignal"] = spec.stop_signal
        if spec.volumes:
            container_config["Volumes"] = {path: {} for path in spec.volumes}
        config: dict[str, Any] = {
            "created": CREATED,
            "architecture": spec.architecture,
            "os": spec.os,
            "config": container_config,
            "rootfs": {"type": "layers", "diff_ids": diff_ids},
            "history": history,
        }
        if spec.variant:
            config["variant"] = spec.variant
        config_descriptor = self.blob(_json(config), OCI_CONFIG)
        manifest = {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": config_descriptor,
            "layers": layer_descriptors,
        }
        descriptor = self.blob(_json(manifest), OCI_MANIFEST)
        platform = {"architecture": spec.architecture, "os": spec.os}
        if spec.variant:
            platform["variant"] = spec.variant
        descriptor["platform"] = platform
        return descriptor

    def index(self, manifests: list[dict[str, Any]]) -> dict[str, Any]:
        doc = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": manifests}
        return self.blob(_json(doc), OCI_INDEX)

    def tag(self, descriptor: dict[str, Any], tag: str) -> None:
        """Name ``descriptor`` in the layout's index.json (replacing the same tag)."""
        index_path = self.dest / "index.json"
        if index_path.exists():
            index = json.loads(index_path.read_text())
        else:
            index = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": []}
        kept = [
            m
            for m in index["manifests"]
            if (m.get("annotations") or {}).get("org.opencontainers.image.ref.name") != tag
        ]
        entry = {k: v for k, v in descriptor.items() if k != "platform"}
        entry["annotations"] = {"org.opencontainers.image.ref.name": tag}
        index["manifests"] = [*kept, entry]
        index_path.write_text(json.dumps(index, indent=1))


# ------------------------------------------------------------------ busybox


def busybox_applets() -> list[str]:
    """Applet paths (``bin/sh``, ``usr/bin/awk`` …) as busybox-static itself lists them."""
    if not BUSYBOX_BINARY.is_file():
        raise RuntimeError(
            f"{BUSYBOX_BINARY} is missing: install the Debian package {BUSYBOX_DEBIAN_PACKAGE}"
        )
    out = subprocess.run(
        [str(BUSYBOX_BINARY), "--list-full"], capture_output=True, check=True, timeout=30
    ).stdout.decode()
    return sorted({line.strip() for line in out.splitlines() if line.strip()})


def busybox_entries() -> list[Entry]:
    entries = [
        directory("bin"),
        directory("dev"),
        directory("etc"),
        directory("home"),
        directory("home/husk", 0o755, 1000, 1000),
        directory("proc"),
        directory("root", 0o700),
        directory("sbin"),
        directory("sys"),
        directory("tmp", 0o1777),
        directory("usr"),
        directory("usr/bin"),
        directory("usr/sbin"),
        directory("var"),
        directory("var/tmp", 0o1777),
        directory("www"),
        file("www/index.html", "hello from husk\n"),
        file("bin/busybox", BUSYBOX_BINARY.read_bytes(), 0o755),
        file("etc/passwd", PASSWD),
        file("etc/group", GROUP),
        file("etc/hostname", "husk\n"),
        file("etc/hosts", "127.0.0.1\tlocalhost\n::1\tlocalhost\n"),
        file("etc/resolv.conf", ""),
    ]
    for applet in busybox_applets():
        if applet == "bin/busybox":
            continue
        depth = applet.count("/")
        entries.append(symlink(applet, "../" * depth + "bin/busybox"))
    return entries


def busybox_spec() -> ImageSpec:
    return ImageSpec(
        layers=[Layer(busybox_entries(), "gzip")],
        cmd=["sh"],
        labels={"org.opencontainers.image.title": "husk test busybox"},
    )


def busybox_image_layout(dest: Path, tag: str = "latest") -> Path:
    """An OCI layout at ``dest`` holding the busybox image as ``tag``; returns ``dest``."""
    writer = LayoutWriter(dest)
    writer.tag(writer.image(busybox_spec()), tag)
    return dest


# --------------------------------------------------------------- multilayer

MULTILAYER_SETUID_PATH = "usr/local/bin/suid-tool"
MULTILAYER_SETGID_PATH = "usr/local/bin/sgid-tool"


def multilayer_spec() -> ImageSpec:
    base = Layer(busybox_entries(), "gzip")
    second = Layer(
        [
            directory("data"),
            file("data/keep.txt", "kept\n"),
            file("data/remove-me.txt", "to be whited out\n"),
            directory("data/opaque"),
            file("data/opaque/old-a.txt", "hidden by opaque\n"),
            directory("data/opaque/old-sub"),
            file("data/opaque/old-sub/deep.txt", "hidden by opaque\n"),
            directory("data/gone-dir"),
            file("data/gone-dir/inner.txt", "whole dir whited out\n"),
            file("data/hard-source.txt", "shared inode\n", 0o640),
            hardlink("data/hard-link.txt", "data/hard-source.txt"),
            symlink("data/relative-link", "keep.txt"),
            symlink("data/absolute-link", "/data/keep.txt"),
            symlink("data/dangling-link", "/nowhere/at/all"),
            directory("usr/local"),
            directory("usr/local/bin"),
            file(MULTILAYER_SETUID_PATH, "#!/bin/sh\necho suid\n", 0o4755),
            file(MULTILAYER_SETGID_PATH, "#!/bin/sh\necho sgid\n", 0o2755, 0, 10),
            file("data/owned-by-husk.txt", "mine\n", 0o600, 1000, 1000),
            directory("data/sticky", 0o1777),
            Entry(
                "data/with-xattr.txt",
                "file",
                b"xattr\n",
                0o644,
                xattrs=(("user.husk.test", "hello"),),
            ),
        ],
        "gzip",
    )
    third = Layer(
        [
            directory("data"),
            file("data/.wh.remove-me.txt"),
            file("data/.wh.gone-dir"),
            directory("data/opaque"),
            file("data/opaque/.wh..wh..opq"),
            file("data/opaque/new.txt", "after opaque\n"),
            file("data/zstd-layer.txt", "from the zstd layer\n"),
            file("data/keep.txt", "kept, replaced in layer 3\n"),
        ],
        "zstd",
    )
    fourth = Layer(
        [
            directory("data"),
            Entry("data/fifo", "fifo", mode=0o644),
            Entry("data/char-null", "chardev", mode=0o666, major=1, minor=3),
            file("data/plain-tar.txt", "from an uncompressed layer\n"),
            hardlink("data/hard-link-2.txt", "data/plain-tar.txt"),
        ],
        "none",
    )
    return ImageSpec(
        layers=[base, second, third, fourth],
        cmd=["sh"],
        env=[*DEFAULT_ENV, "HUSK_TEST=multilayer"],
        workdir="/data",
        labels={"org.opencontainers.image.title": "husk test multilayer"},
        exposed_ports={"8080/tcp": {}},
    )


def multilayer_image_layout(dest: Path, tag: str = "latest") -> Path:
    writer = LayoutWriter(dest)
    writer.tag(writer.image(multilayer_spec()), tag)
    return dest


# ------------------------------------------------------------ multiplatform


def multiplatform_index_layout(dest: Path, tag: str = "latest") -> Path:
    """An index: linux/amd64 is the busybox image; linux/arm64/v8 a one-file image."""
    writer = LayoutWriter(dest)
    amd64 = writer.image(busybox_spec())
    arm64 = writer.image(
        ImageSpec(
            layers=[Layer([file("platform.txt", "linux/arm64\n")], "gzip")],
            architecture="arm64",
            variant="v8",
            cmd=["/platform.txt"],
        )
    )
    writer.tag(writer.index([amd64, arm64]), tag)
    return dest


DOCKER_CLI_BINARY = Path("/usr/local/bin/docker")


def docker_cli_image_layout(dest: Path, tag: str = "latest") -> Path:
    """busybox plus the host's static docker CLI (``/usr/local/bin/docker``), for
    containers that drive a daemon through a bound socket."""
    spec = busybox_spec()
    cli = file("usr/local/bin/docker", DOCKER_CLI_BINARY.read_bytes(), 0o755)
    spec.layers = [*spec.layers, Layer([directory("usr/local/bin"), cli], "none")]
    writer = LayoutWriter(dest)
    writer.tag(writer.image(spec), tag)
    return dest


PYTHON_BINARY = Path("/usr/bin/python3.11")
PYTHON_STDLIB = Path("/usr/lib/python3.11")
_STDLIB_SKIPPED = frozenset(
    {"test", "idlelib", "tkinter", "turtledemo", "ensurepip", "lib2to3", "pydoc_data"}
)
PIP_SITE_PACKAGES = Path("/root/.pyenv/versions/3.11.7/lib/python3.11/site-packages")
TESTCONTAINERS_PACKAGES = (
    "testcontainers",
    "docker",
    "requests",
    "urllib3",
    "idna",
    "certifi",
    "charset_normalizer",
    "wrapt",
    "dotenv",
    "typing_extensions.py",
)


def _shared_libraries(binaries: Iterable[Path]) -> set[str]:
    """Paths of the libraries (and the loader) that ``binaries`` need, as ldd names them."""
    needed: set[str] = set()
    for binary in binaries:
        listing = subprocess.run(["ldd", str(binary)], capture_output=True, text=True).stdout
        for line in listing.splitlines():
            parts = line.split()
            path = parts[2] if "=>" in parts and len(parts) > 2 else parts[0] if parts else ""
            if path.startswith("/"):
                needed.add(path)
    return needed


def _tree(source: Path, dest: str, skip: frozenset[str] = frozenset()) -> list[Entry]:
    entries = [directory(dest)]
    for path in sorted(source.rglob("*")):
        relative = path.relative_to(source)
        if relative.parts[0] in skip:
            continue
        target = f"{dest}/{relative}"
        if path.is_symlink():
            continue
        if path.is_dir():
            entries.append(directory(target))
        elif path.is_file():
            data = _checked_pyc(path) if path.suffix == ".pyc" else path.read_bytes()
            entries.append(file(target, data, path.stat().st_mode & 0o755 | 0o644))
    return entries


def _checked_pyc(path: Path) -> bytes:
    """A bytecode file as one Python still uses in the image: there every file has
    FIXED_MTIME, so a pyc validated by its source's mtime would be stale and each import
    in the (emulated) guest would compile the module again. A pyc current for its source
    here is rewritten hash-based and checked (PEP 552: flags 0b11, the source's hash),
    which no mtime affects; any other pyc is kept as it is."""
    import importlib.util

    data = path.read_bytes()
    source = path.parent.parent / (path.name.split(".", 1)[0] + ".py")
    if path.parent.name != "__pycache__" or len(data) < 16 or not source.is_file():
        return data
    flags = int.from_bytes(data[4:8], "little")
    info = source.stat()
    recorded = (int.from_bytes(data[8:12], "little"), int.from_bytes(data[12:16], "little"))
    if flags != 0 or recorded != (int(info.st_mtime) & 0xFFFFFFFF, info.st_size & 0xFFFFFFFF):
        return data
    return (
        data[:4]
        + (0b11).to_bytes(4, "little")
        + importlib.util.source_hash(source.read_bytes())
        + data[16:]
    )


def python_testcontainers_image_layout(
    dest: Path,
    tag: str = "latest",
    extra: Sequence[Entry] = (),
    cmd: list[str] | None = None,
) -> Path:
    """busybox plus Debian's python3.11 (its binary, libraries and standard library from
    this host's packages) and testcontainers with docker-py (pure Python, from pip);
    ``extra`` entries go in the same layer and ``cmd`` replaces busybox's ``sh``."""
    spec = busybox_spec()
    if cmd is not None:
        spec.cmd = cmd
    dynload = sorted((PYTHON_STDLIB / "lib-dynload").glob("*.so"))
    entries: list[Entry] = [file("usr/bin/python3", PYTHON_BINARY.read_bytes(), 0o755)]
    made: set[str] = set()
    for library in sorted(_shared_libraries([PYTHON_BINARY, *dynload])):
        parent = ""
        for part in library.strip("/").split("/")[:-1]:
            parent = f"{parent}/{part}" if parent else part
            if parent not in made:
                made.add(parent)
                entries.append(directory(parent))
        entries.append(file(library.strip("/"), Path(library).read_bytes(), 0o755))
    entries += [directory("usr/lib"), *_tree(PYTHON_STDLIB, "usr/lib/python3.11", _STDLIB_SKIPPED)]
    entries += [directory("usr/lib/python3"), directory("usr/lib/python3/dist-packages")]
    prefixes = tuple(
        name.removesuffix(".py").replace("dotenv", "python_dotenv") + "-"
        for name in TESTCONTAINERS_PACKAGES
    )
    metadata = [  # importlib.metadata must find them (testcontainers asks its own version)
        path.name
        for path in sorted(PIP_SITE_PACKAGES.glob("*.dist-info"))
        if path.name.startswith(prefixes)
    ]
    for name in [*TESTCONTAINERS_PACKAGES, *metadata]:
        source = PIP_SITE_PACKAGES / name
        target = f"usr/lib/python3/dist-packages/{name}"
        if source.is_dir():
            entries += _tree(source, target)
        else:
            entries.append(file(target, source.read_bytes()))
    entries += extra
    spec.layers = [*spec.layers, Layer(entries, "none")]
    writer = LayoutWriter(dest)
    writer.tag(writer.image(spec), tag)
    return dest


def small_image_layout(dest: Path, text: str, tag: str = "latest") -> Path:
    """A tiny single-layer image whose content depends on ``text`` (distinct digests)."""
    writer = LayoutWriter(dest)
    writer.tag(writer.image(ImageSpec(layers=[Layer([file("hello.txt", text)], "gzip")])), tag)
    return dest


# -------------------------------------------------------------- offline use


def install_busybox_image(
    store: Any = None, name: str = BUSYBOX_NAME, workdir: Path | None = None
) -> Any:
    """Import the busybox image into ``store`` (default: husk's) as ``name``, offline."""
    import tempfile

    from husk.oci.archive import load_path
    from husk.oci.store import ImageStore

    target_store = store if store is not None else ImageStore()
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        layout = busybox_image_layout(Path(tmp) / "layout")
        records = load_path(layout, store=target_store, name=name)
        shutil.rmtree(layout, ignore_errors=True)
    return records[0]


if __name__ == "__main__":
    if sys.argv[1:] != ["busybox"]:
        sys.exit("usage: python tests/testimages.py busybox")
    record = install_busybox_image()
    print(f"{BUSYBOX_NAME} {record.id}")
