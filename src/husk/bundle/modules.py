"""Choose the kernel modules the guest needs and the order to load them in.

Dependencies come from each module's own ``.modinfo`` section (``depends=``
and ``softdep=``), the data depmod turns into modules.dep and modules.softdep;
Debian ships the .ko files but generates those index files only at install
time. Soft dependencies name aliases (ext4 wants ``crypto-crc32c`` first), so
they are resolved through every module's ``alias=`` entries.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from husk.bundle.elf import ElfError, read_section
from husk.errors import BundleError

# What the guest needs, in the order we prefer them loaded. Built-in (=y)
# drivers have no .ko and are skipped.
GUEST_MODULES: tuple[str, ...] = (
    "virtio_mmio",
    "virtio_console",
    "virtio_blk",
    "virtio_net",
    "virtio_rng",
    # Free-page reporting: pages the guest frees go back to the host (issue 16).
    "virtio_balloon",
    "erofs",
    "ext4",
    "overlay",
    "9p",
    "9pnet_virtio",
    "vsock",
    "vmw_vsock_virtio_transport",
)

ON_DEMAND_MODULES: dict[str, tuple[str, ...]] = {
    # The WireGuard overlay: in the initramfs, loaded by the agent on first use only
    # (a container that never joins an overlay must not pay for it at boot).
    "wireguard": ("wireguard",),
}


def normalize(name: str) -> str:
    """The kernel treats '-' and '_' in module names as the same character."""
    return name.replace("-", "_")


@dataclass(frozen=True)
class ModuleInfo:
    name: str
    path: Path
    depends: tuple[str, ...]
    soft_pre: tuple[str, ...]
    soft_post: tuple[str, ...]
    aliases: tuple[str, ...]


def _parse_softdep(value: str) -> tuple[list[str], list[str]]:
    pre: list[str] = []
    post: list[str] = []
    target: list[str] | None = None
    for token in value.split():
        if token == "pre:":
            target = pre
        elif token == "post:":
            target = post
        elif target is not None:
            target.append(token)
    return pre, post


def read_module_info(path: Path) -> ModuleInfo:
    try:
        with path.open("rb") as stream:
            raw = read_section(stream, ".modinfo")
    except (OSError, ElfError) as err:
        raise BundleError(f"cannot read kernel module {path}: {err}") from err
    fields: dict[str, list[str]] = {}
    for item in (raw or b"").split(b"\0"):
        key, sep, value = item.decode("utf-8", "replace").partition("=")
        if sep:
            fields.setdefault(key, []).append(value)
    pre: list[str] = []
    post: list[str] = []
    for softdep in fields.get("softdep", []):
        more_pre, more_post = _parse_softdep(softdep)
        pre += more_pre
        post += more_post
    depends = [d for value in fields.get("depends", []) for d in value.split(",") if d]
    name = fields.get("name", [path.name.removesuffix(".ko")])[0]
    return ModuleInfo(
        name=normalize(name),
        path=path,
        depends=tuple(normalize(d) for d in depends),
        soft_pre=tuple(pre),
        soft_post=tuple(post),
        aliases=tuple(fields.get("alias", [])),
    )


class ModuleTree:
    """The modules of one kernel release, as unpacked from linux-image-<release>."""

    def __init__(self, release_dir: Path) -> None:
        self.release_dir = release_dir
        self._paths: dict[str, Path] = {}
        for directory, _, files in os.walk(release_dir / "kernel"):
            for file in files:
                if file.endswith(".ko"):
                    self._paths[normalize(file[: -len(".ko")])] = Path(directory, file)
        self._builtin = self._read_builtin()
        self._infos: dict[str, ModuleInfo] = {}
        self._aliases: dict[str, list[str]] | None = None

    def _read_builtin(self) -> set[str]:
        builtin_list = self.release_dir / "modules.builtin"
        names: set[str] = set()
        if builtin_list.exists():
            for line in builtin_list.read_text().split():
                names.add(normalize(Path(line).name.removesuffix(".ko")))
        modinfo = self.release_dir / "modules.builtin.modinfo"
        if modinfo.exists():
            # "name.alias=x" lines let soft dependencies on built-in aliases resolve.
            for item in modinfo.read_bytes().split(b"\0"):
                key, _, value = item.decode("utf-8", "replace").partition("=")
                if key.endswith(".alias"):
                    names.add(f"alias:{value}")
        return names

    def is_builtin(self, name: str) -> bool:
        return normalize(name) in self._builtin

    def info(self, name: str) -> ModuleInfo:
        name = normalize(name)
        if name not in self._infos:
            path = self._paths.get(name)
            if path is None:
                raise BundleError(f"kernel module {name} not found in {self.release_dir}")
            self._infos[name] = read_module_info(path)
        return self._infos[name]

    def _providers(self, alias: str) -> list[str]:
        if self._aliases is None:
            self._aliases = {}
            for name in sorted(self._paths):
                for provided in self.info(name).aliases:
                    self._aliases.setdefault(provided, []).append(name)
        return self._aliases.get(alias, [])

    def resolve_soft(self, target: str) -> str | None:
        """The module to load for a soft dependency, or None if it is built in.

        Several modules can provide one alias (crc32c_generic and crc32c_intel):
        the generic implementation wins because it runs on any CPU, including
        TCG's, which lacks the instructions the accelerated ones need.
        """
        name = normalize(target)
        if name in self._paths:
            return name
        if self.is_builtin(name) or f"alias:{target}" in self._builtin:
            return None
        providers = self._providers(target)
        if not providers:
            raise BundleError(f"no kernel module provides {target!r} (a soft dependency)")
        generic = [p for p in providers if p.endswith("_generic")]
        return (generic or providers)[0]

    def load_order(self, wanted: tuple[str, ...] = GUEST_MODULES) -> list[ModuleInfo]:
        """``wanted`` and everything they need, each after its dependencies."""
        order: list[ModuleInfo] = []
        done: set[str] = set()
        visiting: set[str] = set()

        def visit(name: str) -> None:
            if name in done or name in visiting:
                return
            visiting.add(name)
            info = self.info(name)
            for soft in info.soft_pre:
                resolved = self.resolve_soft(soft)
                if resolved is not None:
                    visit(resolved)
            for dependency in info.depends:
                visit(dependency)
            visiting.discard(name)
            done.add(name)
            order.append(info)
            for soft in info.soft_post:
                resolved = self.resolve_soft(soft)
                if resolved is not None:
                    visit(resolved)

        for name in wanted:
            name = normalize(name)
            if self.is_builtin(name):
                continue
            visit(name)
        return order
