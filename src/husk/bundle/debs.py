"""The Debian packages a guest bundle is made of: resolve, fetch, verify, unpack.

Packages come either from apt (``apt-get download`` into a cache, checked against
the archive's SHA256 and reused while it still matches) or from a directory of
pre-downloaded .deb files, for offline builds.
"""

from __future__ import annotations

import functools
import hashlib
import os
import subprocess
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from husk.errors import BundleError
from husk.tools import tool_argv

ARCH = "amd64"
KERNEL_META_PACKAGE = "linux-image-amd64"
# The kernel meta-package is resolved to its linux-image-<release>-amd64 dependency.
PACKAGES: tuple[str, ...] = (
    KERNEL_META_PACKAGE,
    "busybox-static",
    "python3.11-minimal",
    "libpython3.11-minimal",
    "libpython3.11-stdlib",
    "libc6",
    "zlib1g",
    "libexpat1",
    "libffi8",
)
_APT_TIMEOUT = 600.0


@dataclass(frozen=True)
class Deb:
    name: str
    version: str
    path: Path
    sha256: str

    def manifest_entry(self) -> dict[str, str]:
        return {"name": self.name, "version": self.version, "sha256": self.sha256}


@dataclass(frozen=True)
class _AptRecord:
    name: str
    version: str
    depends: str
    sha256: str


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        for chunk in iter(lambda: stream.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _run(argv: list[str], what: str, cwd: Path | None = None) -> str:
    try:
        done = subprocess.run(
            tool_argv(argv),
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=_APT_TIMEOUT,
            check=False,
        )
    except FileNotFoundError as err:
        raise BundleError(f"{what}: {argv[0]} is not installed (needs a Debian host)") from err
    except subprocess.TimeoutExpired as err:
        raise BundleError(f"{what}: {argv[0]} took longer than {_APT_TIMEOUT:.0f} s") from err
    if done.returncode != 0:
        lines = [line for line in done.stderr.splitlines() if line.strip()]
        detail = lines[-1] if lines else f"exit status {done.returncode}"
        raise BundleError(f"{what}: {detail}")
    return done.stdout


def _parse_paragraphs(text: str) -> list[dict[str, str]]:
    paragraphs: list[dict[str, str]] = []
    current: dict[str, str] = {}
    key = ""
    for line in text.splitlines():
        if not line.strip():
            if current:
                paragraphs.append(current)
            current, key = {}, ""
        elif line[0] in " \t" and key:
            current[key] += "\n" + line.strip()
        else:
            key, _, value = line.partition(":")
            current[key] = value.strip()
    if current:
        paragraphs.append(current)
    return paragraphs


def _kernel_image_name(depends: str) -> str:
    for item in depends.split(","):
        name = item.split("|")[0].split("(")[0].strip()
        if name.startswith("linux-image-"):
            return name
    raise BundleError(f"{KERNEL_META_PACKAGE} depends on no linux-image-<release> package")


def _apt_records(names: Iterable[str]) -> dict[str, _AptRecord]:
    wanted = list(names)
    text = _run(
        ["apt-cache", "show", "--no-all-versions", *(f"{name}:{ARCH}" for name in wanted)],
        f"apt-cache show {' '.join(wanted)}",
    )
    records: dict[str, _AptRecord] = {}
    for paragraph in _parse_paragraphs(text):
        name = paragraph.get("Package", "")
        if name in wanted and name not in records:
            records[name] = _AptRecord(
                name=name,
                version=paragraph.get("Version", ""),
                depends=paragraph.get("Depends", ""),
                sha256=paragraph.get("SHA256", ""),
            )
    missing = [name for name in wanted if name not in records]
    if missing:
        raise BundleError(f"apt knows no package {', '.join(missing)}: run apt-get update")
    return records


def _cache_name(name: str, version: str) -> str:
    # The name apt-get download itself would pick (epoch colon escaped).
    return f"{name}_{version.replace(':', '%3a')}_{ARCH}.deb"


def _download(record: _AptRecord, cache: Path) -> Path:
    target = cache / _cache_name(record.name, record.version)
    if target.exists() and sha256_file(target) == record.sha256:
        return target
    with tempfile.TemporaryDirectory(dir=cache, prefix=".download-") as scratch:
        # World-readable scratch dir: apt's _apt user can then write into it when we are root.
        os.chmod(scratch, 0o777)
        _run(
            ["apt-get", "download", "-q", f"{record.name}:{ARCH}={record.version}"],
            f"apt-get download {record.name}",
            cwd=Path(scratch),
        )
        downloaded = sorted(Path(scratch).glob("*.deb"))
        if len(downloaded) != 1:
            raise BundleError(f"apt-get download {record.name} produced no single .deb")
        actual = sha256_file(downloaded[0])
        if actual != record.sha256:
            raise BundleError(
                f"{record.name} {record.version}: downloaded sha256 {actual} "
                f"does not match the archive's {record.sha256}"
            )
        os.chmod(downloaded[0], 0o644)
        os.replace(downloaded[0], target)
    return target


def fetch(cache: Path) -> list[Deb]:
    """Download (or reuse from ``cache``) the candidate version of every package."""
    cache.mkdir(parents=True, exist_ok=True)
    records = _apt_records(PACKAGES)
    image = _kernel_image_name(records[KERNEL_META_PACKAGE].depends)
    records.update(_apt_records([image]))
    debs = []
    for name in (*PACKAGES, image):
        record = records[name]
        path = _download(record, cache)
        debs.append(Deb(name=name, version=record.version, path=path, sha256=record.sha256))
    return debs


def _control(path: Path) -> dict[str, str]:
    text = _run(
        ["dpkg-deb", "-f", str(path), "Package", "Version", "Architecture", "Depends"],
        f"reading {path}",
    )
    paragraphs = _parse_paragraphs(text)
    return paragraphs[0] if paragraphs else {}


def _compare_versions(left: tuple[str, Path], right: tuple[str, Path]) -> int:
    """Debian version order, by dpkg itself (epochs, tildes and all)."""
    if left[0] == right[0]:
        return 0
    newer = subprocess.run(
        ["dpkg", "--compare-versions", left[0], "gt", right[0]], check=False, timeout=30
    )
    return 1 if newer.returncode == 0 else -1


def from_directory(directory: Path) -> list[Deb]:
    """The packages found in ``directory``; the newest version wins when several exist."""
    if not directory.is_dir():
        raise BundleError(f"--deb-dir {directory} is not a directory")
    found: dict[str, list[tuple[str, Path]]] = {}
    for path in sorted(directory.glob("*.deb")):
        control = _control(path)
        if control.get("Architecture") not in (ARCH, "all"):
            continue
        found.setdefault(control.get("Package", ""), []).append((control["Version"], path))
    chosen: dict[str, tuple[str, Path]] = {}
    for name, versions in found.items():
        versions.sort(key=functools.cmp_to_key(_compare_versions))
        chosen[name] = versions[-1]
    names = list(PACKAGES)
    if KERNEL_META_PACKAGE in chosen:
        meta = _control(chosen[KERNEL_META_PACKAGE][1])
        names.append(_kernel_image_name(meta.get("Depends", "")))
    missing = [name for name in names if name not in chosen]
    if missing:
        raise BundleError(f"--deb-dir {directory} lacks {', '.join(missing)} (.deb files)")
    return [
        Deb(
            name=name,
            version=chosen[name][0],
            path=chosen[name][1],
            sha256=sha256_file(chosen[name][1]),
        )
        for name in names
    ]


def extract(deb: Deb, destination: Path) -> Path:
    """Unpack the files of ``deb`` into ``destination`` and return it."""
    destination.mkdir(parents=True, exist_ok=True)
    _run(["dpkg-deb", "-x", str(deb.path), str(destination)], f"unpacking {deb.path.name}")
    return destination


def kernel_image(debs: list[Deb]) -> Deb:
    for deb in debs:
        if deb.name.startswith("linux-image-") and deb.name != KERNEL_META_PACKAGE:
            return deb
    raise BundleError("no linux-image-<release> package among the inputs")


def by_name(debs: list[Deb], name: str) -> Deb:
    for deb in debs:
        if deb.name == name:
            return deb
    raise BundleError(f"package {name} missing from the inputs")
