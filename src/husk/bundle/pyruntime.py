"""The guest's CPython: interpreter, trimmed stdlib, shared libraries, precompiled.

Everything comes from the unpacked Debian packages, so the result does not
depend on the host. The stdlib is compiled by the guest's own interpreter
into sourceless legacy .pyc files (unchecked-hash, so no timestamps) and the
sources are deleted: the guest then never stats or compiles a .py at boot.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

from husk.errors import BundleError

PYTHON = "python3.11"
STDLIB = f"usr/lib/{PYTHON}"
INTERPRETER = f"usr/bin/{PYTHON}"
MULTIARCH_LIB = "lib/x86_64-linux-gnu"
DYNLOAD_SUFFIX = ".cpython-311-x86_64-linux-gnu.so"

# Taken from libpython3.11-stdlib on top of libpython3.11-minimal (which lacks them).
# Extension modules listed here link only against libc, except _ctypes (libffi).
# ctypes gives the agent mount(2): a container root assembled without forking
# busybox seven times, which under TCG costs more than the mounts themselves.
EXTRA_STDLIB: tuple[str, ...] = (
    "json",
    f"lib-dynload/_json{DYNLOAD_SUFFIX}",
    "ctypes",
    f"lib-dynload/_ctypes{DYNLOAD_SUFFIX}",
    "shutil.py",
    "tarfile.py",
    # An aligned buffer for O_DIRECT reads of the transfer ring when splice is refused.
    f"lib-dynload/mmap{DYNLOAD_SUFFIX}",
)

# Parts of libpython3.11-minimal the guest never uses, or cannot use (ssl
# needs libssl, which is not shipped).
DROPPED_STDLIB: tuple[str, ...] = (
    "test",
    "idlelib",
    "ensurepip",
    "tkinter",
    "pydoc_data",
    "lib2to3",
    "email",
    "importlib/metadata",
    "urllib/request.py",
    "urllib/robotparser.py",
    "ssl.py",
    "sitecustomize.py",
    f"lib-dynload/_ssl{DYNLOAD_SUFFIX}",
    f"lib-dynload/_hashlib{DYNLOAD_SUFFIX}",
)
DROPPED_PREFIXES: tuple[str, ...] = ("config-",)

# Codecs Python itself may reach for; the CJK and legacy code pages go.
KEPT_ENCODINGS: frozenset[str] = frozenset(
    {
        "__init__",
        "aliases",
        "ascii",
        "latin_1",
        "utf_8",
        "utf_8_sig",
        "utf_16",
        "utf_16_be",
        "utf_16_le",
        "utf_32",
        "utf_32_be",
        "utf_32_le",
        "raw_unicode_escape",
        "unicode_escape",
        "charmap",
        "idna",
        "punycode",
        "hex_codec",
        "base64_codec",
    }
)

# (package holding it, path inside the package, path in the guest). Symlinks
# inside the packages are followed so the guest gets the real file under its soname.
SHARED_LIBRARIES: tuple[tuple[str, str, str], ...] = (
    ("libc6", f"{MULTIARCH_LIB}/libc.so.6", f"{MULTIARCH_LIB}/libc.so.6"),
    ("libc6", f"{MULTIARCH_LIB}/libm.so.6", f"{MULTIARCH_LIB}/libm.so.6"),
    (
        "libc6",
        f"{MULTIARCH_LIB}/ld-linux-x86-64.so.2",
        f"{MULTIARCH_LIB}/ld-linux-x86-64.so.2",
    ),
    ("zlib1g", f"{MULTIARCH_LIB}/libz.so.1", f"{MULTIARCH_LIB}/libz.so.1"),
    ("libexpat1", f"{MULTIARCH_LIB}/libexpat.so.1", f"{MULTIARCH_LIB}/libexpat.so.1"),
    ("libffi8", f"usr/{MULTIARCH_LIB}/libffi.so.8", f"{MULTIARCH_LIB}/libffi.so.8"),
)
# The interpreter path baked into every dynamic executable.
LOADER_LINK = ("lib64/ld-linux-x86-64.so.2", f"/{MULTIARCH_LIB}/ld-linux-x86-64.so.2")

_COMPILE_TIMEOUT = 600.0


def _resolve_inside(root: Path, relative: str) -> Path:
    """Follow symlinks as if ``root`` were ``/``, never leaving it."""
    path = root / relative
    for _ in range(40):
        if not path.is_symlink():
            break
        target = os.readlink(path)
        path = root / target.lstrip("/") if target.startswith("/") else path.parent / target
    resolved = path.resolve()
    if not resolved.is_relative_to(root.resolve()) or not resolved.is_file():
        raise BundleError(f"{relative} is missing from its package (looked in {root})")
    return resolved


def _copy_tree(source: Path, destination: Path, keep: Callable[[Path], bool]) -> None:
    for directory, subdirs, files in os.walk(source):
        here = Path(directory)
        relative = here.relative_to(source)
        subdirs[:] = sorted(d for d in subdirs if d != "__pycache__" and keep(relative / d))
        (destination / relative).mkdir(parents=True, exist_ok=True)
        for file in sorted(files):
            # Debian links a few modules to /etc; the guest has no such files.
            if keep(relative / file) and not (here / file).is_symlink():
                shutil.copy2(here / file, destination / relative / file, follow_symlinks=False)


def _keep_stdlib(relative: Path) -> bool:
    text = relative.as_posix()
    if text in DROPPED_STDLIB or text.startswith(DROPPED_PREFIXES):
        return False
    if relative.parent.as_posix() == "encodings" and relative.suffix == ".py":
        return relative.stem in KEPT_ENCODINGS
    return True


def install_python(root: Path, unpacked: Callable[[str], Path]) -> None:
    """Lay out interpreter, trimmed stdlib and libraries under ``root``.

    ``unpacked(package)`` gives the directory a package was extracted into.
    """
    interpreter = root / INTERPRETER
    interpreter.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(_resolve_inside(unpacked("python3.11-minimal"), INTERPRETER), interpreter)
    interpreter.chmod(0o755)

    stdlib = root / STDLIB
    _copy_tree(unpacked("libpython3.11-minimal") / STDLIB, stdlib, _keep_stdlib)
    full_stdlib = unpacked("libpython3.11-stdlib") / STDLIB
    for extra in EXTRA_STDLIB:
        source = full_stdlib / extra
        if source.is_dir():
            _copy_tree(source, stdlib / extra, lambda relative: relative.name != "__pycache__")
        elif source.is_file():
            (stdlib / extra).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, stdlib / extra)
        else:
            raise BundleError(f"libpython3.11-stdlib has no {extra}")

    for package, inside, guest_path in SHARED_LIBRARIES:
        target = root / guest_path
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(_resolve_inside(unpacked(package), inside), target)
        target.chmod(0o755)
    link, link_target = LOADER_LINK
    (root / link).parent.mkdir(parents=True, exist_ok=True)
    (root / link).symlink_to(link_target)


def _guest_python_env(root: Path, extra_path: Path | None = None) -> dict[str, str]:
    env = {
        "PYTHONHOME": str(root / "usr"),
        # Fixed hash seed: set and frozenset constants marshal in hash order.
        "PYTHONHASHSEED": "0",
        "PYTHONDONTWRITEBYTECODE": "1",
        "LC_ALL": "C.UTF-8",
        "PATH": "/usr/bin:/bin",
    }
    if extra_path is not None:
        env["PYTHONPATH"] = str(extra_path)
    return env


def _run_guest_python(
    root: Path, argv: list[str], what: str, extra_path: Path | None = None
) -> None:
    """Run the guest's interpreter on this host (same architecture, it only needs libc)."""
    try:
        done = subprocess.run(
            [str(root / INTERPRETER), "-S", "-B", *argv],
            env=_guest_python_env(root, extra_path),
            capture_output=True,
            text=True,
            timeout=_COMPILE_TIMEOUT,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as err:
        raise BundleError(f"{what}: cannot run the guest's python on this host: {err}") from err
    if done.returncode != 0:
        output = (done.stdout + done.stderr).strip().splitlines()
        raise BundleError(f"{what} failed: {output[-1] if output else done.returncode}")


def compile_sourceless(root: Path, directories: list[str]) -> None:
    """Compile every module under ``directories`` (relative to root) and drop the sources."""
    _run_guest_python(
        root,
        [
            "-m",
            "compileall",
            "-q",
            "-b",
            "--invalidation-mode",
            "unchecked-hash",
            # Tracebacks name guest paths, not this build's temporary directory.
            "-s",
            str(root),
            "-p",
            "/",
            *(str(root / directory) for directory in directories),
        ],
        "compiling the guest's Python modules",
    )
    for directory in directories:
        for source in sorted((root / directory).rglob("*.py")):
            if not source.with_suffix(".pyc").exists():
                raise BundleError(f"{source.relative_to(root)} was not compiled")
            source.unlink()
        for cache in sorted((root / directory).rglob("__pycache__"), reverse=True):
            shutil.rmtree(cache)


def check_imports(root: Path, lib: Path, modules: list[str]) -> None:
    """Import ``modules`` with the guest's interpreter from the sourceless tree."""
    statement = "; ".join(f"import {module}" for module in modules)
    _run_guest_python(root, ["-c", statement], "guest python smoke test", extra_path=lib)
