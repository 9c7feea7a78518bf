"""Runs a Dockerfile: each stage from its base, RUN steps as containers (in VMs) whose
writable layer is committed, COPY/ADD layers made on the host from the context, the
other instructions as config changes; a build cache keyed by each step's inputs.

Each RUN or COPY makes an (untagged) intermediate image, as Docker's classic builder
does: the cache refers to them, and the next step starts from one. Only a build that
ends well tags its result.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import functools
import io
import json
import os
import posixpath
import stat
import tarfile
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, cast

from husk.build import context as ctx
from husk.build import workdir
from husk.build.cache import BuildCache, step_key
from husk.build.parser import (
    Dockerfile,
    DockerfileError,
    Instruction,
    key_values,
    parse,
    substitute,
    words,
)
from husk.errors import HuskError, InvalidArgument, NotFound, NotSupported
from husk.oci.layerstream import LayerStream
from husk.oci.store import ImageRecord
from husk.runtime import commit
from husk.runtime.create import UPPER_DISK_BYTES
from husk.runtime.layertar import Layer, rewrite
from husk.runtime.offline import within_deadline
from husk.runtime.runtime import Runtime
from husk.spec import ContainerSpec, merge_env

DEFAULT_SHELL = ["/bin/sh", "-c"]
DEFAULT_PATH = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
MAX_COPY_BYTES = 16 * 1024**3
MAX_ID_FILE = 4 * 1024 * 1024
MAX_DOCKERIGNORE = 1024 * 1024
# What a stage's ENV, ARG and LABEL instructions may accumulate (the API's bounds for a
# container: a Dockerfile of 4 MiB could otherwise add 1 MiB per line).
MAX_VARIABLES = 4096
MAX_VARIABLES_BYTES = 1024 * 1024
MAX_LABELS = 1024
MAX_LABELS_BYTES = 256 * 1024
# Docker's predefined build args: usable without an ARG, left out of the cache key.
PREDEFINED_ARGS = frozenset(
    {
        "HTTP_PROXY",
        "http_proxy",
        "HTTPS_PROXY",
        "https_proxy",
        "FTP_PROXY",
        "ftp_proxy",
        "NO_PROXY",
        "no_proxy",
        "ALL_PROXY",
        "all_proxy",
    }
)
# Instructions an ONBUILD trigger may not be (Docker refuses them too).
NOT_TRIGGERS = frozenset({"ONBUILD", "FROM", "MAINTAINER"})

Output = Callable[[str], Awaitable[None]]


class BuildFailed(HuskError):
    """A RUN step exited non-zero (``code``), or a step could not be done."""

    kind = "build_failed"

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


@dataclass
class BuildOptions:
    dockerfile: str
    context: Path
    tags: list[str] = field(default_factory=list)
    build_args: dict[str, str] = field(default_factory=dict)
    target: str = ""
    no_cache: bool = False
    labels: dict[str, str] = field(default_factory=dict)
    network: str = ""
    pull: bool = False  # pull every base image, even one in the store


@dataclass
class Stage:
    name: str
    index: int
    image: ImageRecord | None  # None: scratch, nothing yet
    config: dict[str, Any]
    key: str  # the chain key of the last step
    args: dict[str, str] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)  # since the last image
    shell: list[str] = field(default_factory=lambda: list(DEFAULT_SHELL))
    cmd_set: bool = False  # a CMD of this stage (an ENTRYPOINT then keeps it)

    def env(self) -> dict[str, str]:
        pairs = (item.partition("=") for item in self.config.get("Env") or [])
        return {key: value for key, _, value in pairs}


class Builder:
    def __init__(self, runtime: Runtime, output: Output, cache: BuildCache | None = None) -> None:
        self.runtime = runtime
        self.store = runtime.images
        self.output = output
        self.cache = cache if cache is not None else BuildCache()
        self.no_cache = False
        self.pull = False
        self.stages = 0  # FROM lines started so far

    async def say(self, text: str) -> None:
        await self.output(text)

    async def build(self, options: BuildOptions) -> ImageRecord:
        dockerfile = parse(options.dockerfile)
        self.no_cache = options.no_cache
        self.pull = options.pull
        for warning in dockerfile.warnings:
            await self.say(f"[WARNING]: {warning}\n")
        names = [n for tag in options.tags for n in commit.check_reference(tag)]
        rules = _ignore_rules(options.context)
        stages = _split_stages(dockerfile)
        meta_args = _meta_args(dockerfile, options.build_args)
        if options.target and options.target.lower() not in [
            _stage_name(header, meta_args) for header, _ in stages
        ]:
            raise InvalidArgument(f"failed to reach build target {options.target} in Dockerfile")
        used_args: set[str] = set()
        built: dict[str, Stage] = {}
        total = len(dockerfile.instructions)
        step = 0
        for instruction in dockerfile.instructions:
            if instruction.keyword == "FROM":
                break
            step += 1
            await self.say(f"Step {step}/{total} : {instruction}\n")
        stage: Stage | None = None
        for header, body in stages:
            step += 1
            stage = await self._from(header, step, total, built, meta_args)
            await self._triggers(stage, dockerfile, options, rules, built, used_args)
            for instruction in body:
                step += 1
                await self.say(f"Step {step}/{total} : {instruction}\n")
                await self._step(stage, instruction, dockerfile, options, rules, built, used_args)
            built[stage.name] = stage
            built[str(stage.index)] = stage
            if options.target and stage.name == options.target:
                break
        assert stage is not None
        unused = sorted(set(options.build_args) - used_args - set(meta_args) - PREDEFINED_ARGS)
        if unused:
            await self.say(f"[Warning] One or more build-args {unused} were not consumed\n")
        if options.labels:
            stage.config["Labels"] = {**(stage.config.get("Labels") or {}), **options.labels}
            stage.history.append(commit.history_entry("LABEL (build)", empty_layer=True))
        image = await self._finish(stage, names)
        await self.say(f"Successfully built {image.short_id}\n")
        for tag in options.tags:
            await self.say(f"Successfully tagged {tag}\n")
        return image

    # -- FROM -----------------------------------------------------------------

    async def _from(
        self,
        header: Instruction,
        step: int,
        total: int,
        built: dict[str, Stage],
        meta_args: dict[str, str],
    ) -> Stage:
        await self.say(f"Step {step}/{total} : {header}\n")
        parts = words(substitute(header.text, meta_args))
        name = ""
        if len(parts) == 3 and parts[1].lower() == "as":
            name = parts[2].lower()
        elif len(parts) != 1:
            raise DockerfileError(f"line {header.line}: FROM takes IMAGE [AS NAME]")
        _refuse_flags(header, set())
        base = parts[0]
        # Counted, not recounted from ``built``: that was quadratic in the stages, and a
        # 4 MiB Dockerfile holds 300000 ``FROM scratch`` lines (hours on the event loop).
        index = self.stages
        self.stages += 1
        if base.lower() in built:
            parent = built[base.lower()]
            image = await self._finish(parent, [])
            stage = Stage(
                name or str(index),
                index,
                image,
                copy.deepcopy(image.config.get("config") or {}),
                image.id,
            )
        elif base == "scratch":
            stage = Stage(name or str(index), index, None, {"Env": [DEFAULT_PATH]}, "scratch")
        else:
            image = await self._base_image(base)
            stage = Stage(name or str(index), index, image, _base_config(image), image.id)
            await self.say(f" ---> {image.short_id}\n")
        stage.args = {k: v for k, v in meta_args.items() if k in PREDEFINED_ARGS}
        return stage

    async def _triggers(
        self,
        stage: Stage,
        dockerfile: Dockerfile,
        options: BuildOptions,
        rules: list[ctx.IgnoreRule],
        built: dict[str, Stage],
        used_args: set[str],
    ) -> None:
        """The base's ONBUILD triggers, run right after FROM as Docker's classic builder
        does; the new image does not inherit them."""
        triggers = list(stage.config.pop("OnBuild", None) or [])
        if not triggers:
            return
        if not all(isinstance(text, str) for text in triggers):
            # A base image's config is a registry's: a clear error, never a traceback.
            raise DockerfileError("the base image's ONBUILD triggers are not all strings")
        await self.say(
            f"# Executing {len(triggers)} build trigger{'s' if len(triggers) > 1 else ''}\n"
        )
        instructions = [_trigger(text, 0) for text in triggers]
        for instruction in instructions:
            await self._step(stage, instruction, dockerfile, options, rules, built, used_args)

    async def _base_image(self, reference: str) -> ImageRecord:
        """The image ``reference``: the store's, pulled when missing (or always: --pull)."""
        if not self.pull:
            try:
                return self.store.resolve(reference)
            except NotFound:
                pass
        await self.say(f"Pulling {reference}\n")
        image = await self.runtime.pull(reference, policy="always" if self.pull else "missing")
        if not isinstance(image, ImageRecord):
            raise NotFound(f"pull access denied for {reference}")
        return image

    # -- one step ----------------------------------------------------------------

    async def _step(
        self,
        stage: Stage,
        instruction: Instruction,
        dockerfile: Dockerfile,
        options: BuildOptions,
        rules: list[ctx.IgnoreRule],
        built: dict[str, Stage],
        used_args: set[str],
    ) -> None:
        keyword = instruction.keyword
        scope = {**stage.args, **stage.env()}
        text = instruction.text
        if keyword in (
            "ENV",
            "LABEL",
            "WORKDIR",
            "USER",
            "EXPOSE",
            "VOLUME",
            "STOPSIGNAL",
            "COPY",
            "ADD",
            "ARG",
        ):
            text = substitute(text, scope, dockerfile.escape)
        created_by = f"/bin/sh -c #(nop) {keyword} {text}"
        config = stage.config
        if keyword == "RUN":
            await self._run(stage, instruction, options)
            return
        if keyword in ("COPY", "ADD"):
            await self._copy(stage, instruction, text, options, rules, built)
            return
        if keyword == "ARG":
            for name, default in key_values(text, "ARG"):
                used_args.add(name)
                if name in options.build_args:
                    stage.args[name] = options.build_args[name]
                elif default != "\0":
                    stage.args[name] = default
            created_by = f"/bin/sh -c #(nop)  ARG {text}"
        elif keyword == "ENV":
            env = dict(stage.env())
            for name, value in key_values(text, "ENV"):
                env[name] = value
            config["Env"] = [f"{k}={v}" for k, v in env.items()]
        elif keyword == "LABEL":
            config["Labels"] = {**(config.get("Labels") or {}), **dict(key_values(text, "LABEL"))}
        elif keyword == "MAINTAINER":
            stage.history.append(commit.history_entry(created_by, empty_layer=True))
            return
        elif keyword == "WORKDIR":
            config["WorkingDir"] = posixpath.normpath(
                posixpath.join(config.get("WorkingDir") or "/", text.strip())
            )
            if await self._workdir(stage, config["WorkingDir"], created_by, text, options):
                return
        elif keyword == "USER":
            config["User"] = text.strip()
        elif keyword == "EXPOSE":
            ports = dict(config.get("ExposedPorts") or {})
            for port in words(text):
                ports[port if "/" in port else f"{port}/tcp"] = {}
            config["ExposedPorts"] = ports
        elif keyword == "VOLUME":
            paths = instruction.exec_form or words(text)
            config["Volumes"] = {**(config.get("Volumes") or {}), **{p: {} for p in paths}}
        elif keyword == "STOPSIGNAL":
            config["StopSignal"] = text.strip()
        elif keyword in ("CMD", "ENTRYPOINT"):
            command = (
                instruction.exec_form if instruction.exec_form is not None else [*stage.shell, text]
            )
            config["Cmd" if keyword == "CMD" else "Entrypoint"] = command
            if keyword == "CMD":
                stage.cmd_set = True
            elif not stage.cmd_set:
                config.pop("Cmd", None)  # Docker: an ENTRYPOINT resets the base image's CMD
            created_by = f"/bin/sh -c #(nop)  {keyword} {json.dumps(command)}"
        elif keyword == "SHELL":
            if instruction.exec_form is None:
                raise DockerfileError(f"line {instruction.line}: SHELL requires a JSON array")
            stage.shell = list(instruction.exec_form)
            config["Shell"] = list(instruction.exec_form)
        elif keyword == "ONBUILD":
            _trigger(text, instruction.line)
            config["OnBuild"] = [*(config.get("OnBuild") or []), text]
        elif keyword == "HEALTHCHECK":
            config["Healthcheck"] = _healthcheck(instruction, stage.shell)
        else:
            raise NotSupported(f"{keyword} is not supported by husk build")
        if keyword in ("ARG", "ENV", "LABEL"):
            _check_bounds(stage, instruction.line)
        stage.history.append(commit.history_entry(created_by, empty_layer=True))
        # What the step did is its text after substitution (build args only matter there).
        stage.key = step_key(stage.key, f"{keyword} {text}", {})

    # -- WORKDIR ----------------------------------------------------------------------

    async def _workdir(
        self, stage: Stage, path: str, created_by: str, text: str, options: BuildOptions
    ) -> bool:
        """Makes the directories of ``path`` the image lacks, in a layer of their own
        (Docker's classic builder commits them); False when there were none to make."""
        key = step_key(stage.key, f"WORKDIR {text}", {}, "mkdir")
        if await self._cached(stage, key, options):
            return True
        # The parent's key fixes the files: a directory found there once is there again
        # (remembered so that a cached rebuild does not read the layers again).
        exists_key = step_key(stage.key, f"WORKDIR {text}", {}, "exists")
        if not options.no_cache and self.cache.get(exists_key) is not None:
            return False
        image = stage.image
        layers = list(image.layers) if image is not None else []

        def streams() -> Iterator[IO[bytes]]:
            for layer in layers:
                with LayerStream(self.store.blob_path(layer.digest), layer.media_type) as raw:
                    yield cast(IO[bytes], io.BufferedReader(raw, buffer_size=1 << 20))

        missing = await asyncio.to_thread(workdir.missing_directories, streams, path)
        if not missing:
            self.cache.put(exists_key, image.id if image is not None else "scratch")
            return False
        with commit.temporary_directory(self.store) as tmp:
            data = workdir.directories_tar(missing, int(time.time()))
            layer = await asyncio.to_thread(
                rewrite, io.BytesIO(data), Path(tmp) / "layer.tar.gz", max_bytes=0
            )
            made = await self._store_layer(stage, layer, created_by)
        await self._advance(stage, made, key)
        return True

    async def _store_layer(self, stage: Stage, layer: Layer, created_by: str) -> ImageRecord:
        """The stage's image with one more layer (already checked) and its history entry."""
        history = commit.history_entry(created_by)
        return await asyncio.to_thread(
            functools.partial(
                commit.store_image,
                self.store,
                stage.image,
                stage.config,
                layer=layer,
                history=[*stage.history, history],
            )
        )

    # -- RUN ------------------------------------------------------------------------

    async def _run(self, stage: Stage, instruction: Instruction, options: BuildOptions) -> None:
        _refuse_flags(instruction, set())
        if stage.image is None:
            raise BuildFailed("RUN in a stage without a base image (FROM scratch) has no shell")
        argv = (
            instruction.exec_form
            if instruction.exec_form is not None
            else [*stage.shell, instruction.text]
        )
        args = _relevant(stage.args)
        key = step_key(stage.key, str(instruction), args, json.dumps(stage.config, sort_keys=True))
        if await self._cached(stage, key, options):
            return
        env = merge_env(
            list(stage.config.get("Env") or []),
            [f"{k}={v}" for k, v in stage.args.items() if k not in stage.env()],
        )
        # Run from the current layers with the build's config so far (not yet an image's).
        base = await self._finish(stage, [], quiet=True)
        spec = ContainerSpec(
            image=base.id,
            entrypoint=[],
            cmd=list(argv),
            env=env,
            workdir=stage.config.get("WorkingDir") or "/",
            user=stage.config.get("User") or "",
            labels={"com.husk.build": "1"},
            network_mode=options.network or "",
        )
        record = await self.runtime.create(spec, pull_policy="never")
        await self.say(f" ---> Running in {record.id[:12]}\n")
        try:
            await self.runtime.start(record.id)
            async for entry in self.runtime.logs(record.id, follow=True):
                await self.say(entry.data.decode(errors="replace"))
            code = await self.runtime.wait(record.id)
            if code != 0:
                shown = json.dumps(argv) if instruction.exec_form is not None else " ".join(argv)
                raise BuildFailed(f"The command '{shown}' returned a non-zero code: {code}", code)
            shown_args = " ".join(f"{k}={v}" for k, v in sorted(args.items()))
            prefix = f"|{len(args)} {shown_args} " if args else ""
            history = commit.history_entry(prefix + " ".join(argv))
            container = self.runtime.container(record.id)
            max_bytes = UPPER_DISK_BYTES
            with commit.temporary_directory(self.store) as tmp:
                async with self.runtime.offline.files(container) as files:
                    layer = await within_deadline(
                        commit.guest_layer(files, Path(tmp), max_bytes), "the layer"
                    )
                image = await asyncio.to_thread(
                    functools.partial(
                        commit.store_image,
                        self.store,
                        base,
                        stage.config,
                        layer=layer,
                        history=[history],
                    )
                )
        finally:
            with contextlib.suppress(HuskError):
                await self.runtime.remove(record.id, force=True, volumes=True)
            await self.say(f" ---> Removed intermediate container {record.id[:12]}\n")
        await self._advance(stage, image, key)

    # -- COPY / ADD ---------------------------------------------------------------

    async def _copy(
        self,
        stage: Stage,
        instruction: Instruction,
        text: str,
        options: BuildOptions,
        rules: list[ctx.IgnoreRule],
        built: dict[str, Stage],
    ) -> None:
        keyword = instruction.keyword
        items = instruction.exec_form if instruction.exec_form is not None else words(text)
        if len(items) < 2:
            raise DockerfileError(
                f"line {instruction.line}: {keyword} requires at least two arguments"
            )
        sources, dest = items[:-1], items[-1]
        unknown = set(instruction.flags) - {"chown", "chmod", "from", "link"}
        if unknown:
            raise NotSupported(f"{keyword} --{sorted(unknown)[0]} is not supported by husk build")
        chown = instruction.flags.get("chown")
        if chown is not None and ctx.chown_needs_names(chown):
            owner: tuple[int, int] | None = (0, 0)  # for the key; the names are resolved on a miss
        else:
            owner = ctx.parse_chown(chown) if chown is not None else None
        mode = ctx.parse_chmod(instruction.flags["chmod"]) if "chmod" in instruction.flags else None
        if not dest.startswith("/"):
            workdir = stage.config.get("WorkingDir") or "/"
            dest = posixpath.join(workdir, dest) + ("/" if dest.endswith("/") else "")
        with tempfile.TemporaryDirectory(dir=self.store.ingest_dir, prefix="build-copy-") as tmp:
            work = Path(tmp)
            origin = instruction.flags.get("from")
            if origin is not None:
                if keyword == "ADD":
                    raise NotSupported("ADD --from is not supported: use COPY --from")
                # A stage's paths are inside its root: ``..`` stops there, as in Docker.
                sources = [_in_image(s) for s in sources]
                root, keep, honour = (
                    await self._stage_files(origin, sources, built, work),
                    True,
                    False,
                )
                found = await asyncio.to_thread(
                    ctx.resolve_sources, root, [s.lstrip("/") for s in sources], [], keyword
                )
            else:
                root, keep, honour = options.context, False, True
                # A thread: wildcards walk the whole context (up to a million entries).
                found = await asyncio.to_thread(ctx.resolve_sources, root, sources, rules, keyword)
                if keyword == "ADD":
                    found = _unpack_archives(found, work)
            raw = work / "copy.tar"
            with open(raw, "wb") as out:
                digest = await asyncio.to_thread(
                    ctx.write_copy_tar,
                    ctx.copy_entries(found, dest, rules, honour_ignore=honour),
                    out,
                    ctx.CopyOptions(owner=owner, mode=mode, keep_owner=keep),
                )
            flag_text = json.dumps(instruction.flags, sort_keys=True)
            key = step_key(stage.key, f"{keyword} {flag_text} {text}", {}, digest)
            if await self._cached(stage, key, options):
                return
            if chown is not None and ctx.chown_needs_names(chown):
                owner = await self._owner(stage, chown, work)
                with open(raw, "wb") as out:
                    await asyncio.to_thread(
                        ctx.write_copy_tar,
                        ctx.copy_entries(found, dest, rules, honour_ignore=honour),
                        out,
                        ctx.CopyOptions(owner=owner, mode=mode, keep_owner=keep),
                    )

            def check() -> Any:
                with open(raw, "rb") as source:
                    return rewrite(source, work / "layer.tar.gz", max_bytes=MAX_COPY_BYTES)

            layer = await asyncio.to_thread(check)
            flags = "".join(f"--{k}={v} " for k, v in instruction.flags.items())
            created_by = f"/bin/sh -c #(nop) {keyword} {flags}{text}"
            image = await self._store_layer(stage, layer, created_by)
        await self._advance(stage, image, key)

    async def _stage_files(
        self, origin: str, sources: list[str], built: dict[str, Stage], work: Path
    ) -> Path:
        """The files ``sources`` of a stage (or image), copied out into ``work/from``."""
        stage = built.get(origin.lower())
        image = (
            await self._finish(stage, [], quiet=True)
            if stage is not None
            else await self._base_image(origin)
        )
        root = work / "from"
        root.mkdir()
        await self._image_files(image, sources, root, work, what=f"COPY --from={origin}")
        return root

    async def _image_files(
        self,
        image: ImageRecord,
        sources: list[str],
        root: Path,
        work: Path,
        *,
        what: str,
        missing_ok: bool = False,
    ) -> None:
        """``sources`` of ``image`` unpacked below ``root`` (owners kept), read through a
        created container's maintenance VM: the host never reads an image's tree itself.

        The container is made from the image without its VOLUMEs: a new container would
        mount a new (empty) volume there, and Docker copies the image's files."""
        section = image.config.get("config") or {}
        plain: ImageRecord | None = None
        if section.get("Volumes"):
            plain = await asyncio.to_thread(
                functools.partial(
                    commit.store_image,
                    self.store,
                    image,
                    {k: v for k, v in section.items() if k != "Volumes"},
                    layer=None,
                    history=[],
                )
            )
        record = await self.runtime.create(
            ContainerSpec(image=(plain or image).id, cmd=["true"], labels={"com.husk.build": "1"}),
            pull_policy="never",
        )
        try:
            for source in sources:
                # Never ``..`` here: the target below is a host path under ``root``.
                path = _in_image(source)
                target = root / posixpath.dirname(path).lstrip("/")
                target.mkdir(parents=True, exist_ok=True)
                try:
                    chunks, _ = await self.runtime.get_archive(record.id, path)
                except NotFound:
                    if missing_ok:
                        continue
                    raise ctx.ContextError(f"{what} failed: {path} not found") from None
                tar_path = work / "from.tar"
                written = 0
                with open(tar_path, "wb") as handle:
                    async for chunk in chunks:
                        written += len(chunk)
                        if written > MAX_COPY_BYTES:
                            raise ctx.ContextError(
                                f"{what}: {path} is larger than {MAX_COPY_BYTES}"
                            )
                        await asyncio.to_thread(handle.write, chunk)
                with open(tar_path, "rb") as handle:
                    await asyncio.to_thread(ctx.extract_context, handle, target, keep_owner=True)
        finally:
            with contextlib.suppress(HuskError):
                await self.runtime.remove(record.id, force=True, volumes=True)
            if plain is not None:
                with contextlib.suppress(HuskError):
                    await asyncio.to_thread(self.store.remove, plain.id)

    async def _owner(self, stage: Stage, value: str, work: Path) -> tuple[int, int]:
        """``--chown=value``'s ids; names are looked up in the stage's /etc/passwd and
        /etc/group (read through a VM, at most MAX_ID_FILE bytes each)."""
        if not ctx.chown_needs_names(value) or stage.image is None:
            return ctx.parse_chown(value)
        image = await self._finish(stage, [], quiet=True)
        root = work / "ids"
        root.mkdir()
        await self._image_files(
            image, ["/etc/passwd", "/etc/group"], root, work, what="--chown", missing_ok=True
        )
        texts = []
        for name in ("passwd", "group"):
            path = root / "etc" / name
            data = b""
            if path.is_file() and not path.is_symlink():
                with open(path, "rb") as handle:
                    data = handle.read(MAX_ID_FILE)
            texts.append(data.decode(errors="replace"))
        return ctx.parse_chown(value, texts[0], texts[1])

    # -- images and the cache --------------------------------------------------------

    async def _cached(self, stage: Stage, key: str, options: BuildOptions) -> bool:
        if options.no_cache:
            return False
        image_id = self.cache.get(key)
        if image_id is None:
            return False
        try:
            image = self.store.resolve(image_id)
        except NotFound:
            return False
        await self.say(" ---> Using cache\n")
        await self.say(f" ---> {image.short_id}\n")
        stage.image = image
        stage.config = copy.deepcopy(image.config.get("config") or {})
        stage.history = []
        stage.key = key
        return True

    async def _advance(self, stage: Stage, image: ImageRecord, key: str) -> None:
        await self.say(f" ---> {image.short_id}\n")
        self.cache.put(key, image.id)
        stage.image = image
        stage.history = []
        stage.key = key

    async def _finish(self, stage: Stage, names: list[str], *, quiet: bool = False) -> ImageRecord:
        """The stage's image: its last one, or one more with the config changes since
        (from the cache when the same steps made it before); tagged ``names``."""
        unchanged = stage.config == (
            (stage.image.config if stage.image else {}).get("config") or {}
        )
        image: ImageRecord | None = None
        key = step_key(stage.key, "#image", {}, json.dumps(stage.config, sort_keys=True))
        if stage.image is not None and not stage.history and unchanged:
            image = stage.image
        elif not self.no_cache and (cached := self.cache.get(key)) is not None:
            with contextlib.suppress(NotFound):
                image = self.store.resolve(cached)
        if image is None:
            image = await asyncio.to_thread(
                functools.partial(
                    commit.store_image,
                    self.store,
                    stage.image,
                    stage.config,
                    layer=None,
                    history=list(stage.history),
                )
            )
            self.cache.put(key, image.id)
        if not quiet and image is not stage.image:
            await self.say(f" ---> {image.short_id}\n")
        for name in names:
            await asyncio.to_thread(self.store.tag, image.id, name)
        stage.image = image
        stage.history = []
        stage.config = copy.deepcopy(image.config.get("config") or {})
        return self.store.resolve(image.id) if names else image


# The config fields a build reads and extends, and the JSON types they must have.
_STRING_LISTS = ("Env", "OnBuild", "Cmd", "Entrypoint", "Shell")
_STRINGS = ("WorkingDir", "User", "StopSignal")


def _base_config(image: ImageRecord) -> dict[str, Any]:
    """A base image's config section (a registry's), checked where the build uses it:
    a clear error rather than a traceback halfway through."""
    config = copy.deepcopy(image.config.get("config") or {})
    problem = ""
    if not isinstance(config, dict):
        problem = "its config is not an object"
    else:
        for key in _STRING_LISTS:
            value = config.get(key)
            if value is not None and not (
                isinstance(value, list) and all(isinstance(item, str) for item in value)
            ):
                problem = f"{key} is not a list of strings"
        for key in _STRINGS:
            if config.get(key) is not None and not isinstance(config[key], str):
                problem = f"{key} is not a string"
        labels = config.get("Labels")
        if labels is not None and not (
            isinstance(labels, dict) and all(isinstance(v, str) for v in labels.values())
        ):
            problem = "Labels is not an object of strings"
    if problem:
        raise InvalidArgument(f"the base image {image.short_id}: {problem}")
    return config


def _check_bounds(stage: Stage, line: int) -> None:
    """DockerfileError when the stage's variables or labels grew beyond the bounds."""
    env = [str(item) for item in stage.config.get("Env") or []]
    labels = stage.config.get("Labels") or {}
    for what, count, size, max_count, max_size in (
        ("environment", len(env), sum(map(len, env)), MAX_VARIABLES, MAX_VARIABLES_BYTES),
        (
            "build args",
            len(stage.args),
            sum(len(k) + len(v) for k, v in stage.args.items()),
            MAX_VARIABLES,
            MAX_VARIABLES_BYTES,
        ),
        (
            "labels",
            len(labels),
            sum(len(str(k)) + len(str(v)) for k, v in dict(labels).items()),
            MAX_LABELS,
            MAX_LABELS_BYTES,
        ),
    ):
        if count > max_count or size > max_size:
            raise DockerfileError(
                f"line {line}: the stage's {what} would exceed {max_count} entries or"
                f" {max_size} bytes"
            )


def _in_image(source: str) -> str:
    """``source`` as an absolute, normalised path of an image (``..`` ends at its root)."""
    return posixpath.normpath("/" + source.lstrip("/"))


def _relevant(args: dict[str, str]) -> dict[str, str]:
    return {k: v for k, v in args.items() if k not in PREDEFINED_ARGS}


def _ignore_rules(root: Path) -> list[ctx.IgnoreRule]:
    """The context's ``.dockerignore``: a file of the context (a symlink is followed only
    inside it, never to a host file), at most MAX_DOCKERIGNORE bytes."""
    path = root / ".dockerignore"
    if not os.path.lexists(path):
        return []
    resolved = Path(os.path.realpath(path))
    if root.resolve() not in resolved.parents:
        raise ctx.ContextError(".dockerignore leads outside the build context")
    try:
        with open(resolved, "rb") as handle:
            if not stat.S_ISREG(os.fstat(handle.fileno()).st_mode):
                return []
            data = handle.read(MAX_DOCKERIGNORE + 1)
    except OSError:
        return []
    if len(data) > MAX_DOCKERIGNORE:
        raise InvalidArgument(f".dockerignore is larger than {MAX_DOCKERIGNORE} bytes")
    return ctx.parse_dockerignore(data.decode(errors="replace"))


def _stage_name(header: Instruction, meta_args: dict[str, str]) -> str:
    parts = words(substitute(header.text, meta_args))
    return parts[2].lower() if len(parts) == 3 and parts[1].lower() == "as" else ""


def _split_stages(dockerfile: Dockerfile) -> list[tuple[Instruction, list[Instruction]]]:
    stages: list[tuple[Instruction, list[Instruction]]] = []
    for instruction in dockerfile.instructions:
        if instruction.keyword == "FROM":
            stages.append((instruction, []))
        elif stages:
            stages[-1][1].append(instruction)
        elif instruction.keyword != "ARG":
            raise DockerfileError(f"line {instruction.line}: {instruction.keyword} before FROM")
    if not stages:
        raise DockerfileError("no FROM instruction in the Dockerfile")
    return stages


def _meta_args(dockerfile: Dockerfile, build_args: dict[str, str]) -> dict[str, str]:
    """ARGs before the first FROM (usable in FROM lines), with the --build-arg values."""
    values: dict[str, str] = {k: v for k, v in build_args.items() if k in PREDEFINED_ARGS}
    for instruction in dockerfile.instructions:
        if instruction.keyword == "FROM":
            break
        for name, default in key_values(instruction.text, "ARG"):
            if name in build_args:
                values[name] = build_args[name]
            elif default != "\0":
                values[name] = substitute(default, values)
    return values


def _refuse_flags(instruction: Instruction, known: set[str]) -> None:
    """A flag husk does not implement (``RUN --mount``, ``FROM --platform``) is an error,
    never silently ignored."""
    unknown = sorted(set(instruction.flags) - known)
    if unknown:
        raise NotSupported(
            f"line {instruction.line}: {instruction.keyword} --{unknown[0]} is not supported"
            " by husk build"
        )


def _healthcheck(instruction: Instruction, shell: list[str]) -> dict[str, Any]:
    _refuse_flags(instruction, {"interval", "timeout", "start-period", "retries"})
    text = instruction.text
    if text.upper() == "NONE":
        return {"Test": ["NONE"]}
    if not text.upper().startswith("CMD"):
        raise DockerfileError(f"line {instruction.line}: HEALTHCHECK takes CMD or NONE")
    command = text[3:].strip()
    parsed: list[str] | None = None
    if command.startswith("["):
        with contextlib.suppress(ValueError, RecursionError):
            value = json.loads(command)
            if isinstance(value, list) and all(isinstance(v, str) for v in value):
                parsed = value
    test = ["CMD", *parsed] if parsed is not None else ["CMD-SHELL", command]
    check: dict[str, Any] = {"Test": test}
    for flag, field_name in (
        ("interval", "Interval"),
        ("timeout", "Timeout"),
        ("start-period", "StartPeriod"),
    ):
        if flag in instruction.flags:
            check[field_name] = int(_seconds(instruction.flags[flag]) * 1e9)
    if "retries" in instruction.flags:
        check["Retries"] = int(instruction.flags["retries"])
    return check


def _seconds(text: str) -> float:
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}
    for unit in ("ms", "s", "m", "h"):
        if text.endswith(unit) and text[: -len(unit)].replace(".", "", 1).isdigit():
            return float(text[: -len(unit)]) * units[unit]
    raise InvalidArgument(f"invalid duration {text!r}")


def _unpack_archives(found: list[ctx.Source], work: Path) -> list[ctx.Source]:
    """ADD: a local tar archive (plain or compressed) is unpacked; anything else copied."""
    result = []
    for number, source in enumerate(found):
        if source.path.is_file() and tarfile.is_tarfile(source.path):
            target = work / f"add{number}"
            target.mkdir()
            with open(source.path, "rb") as handle:
                ctx.extract_context(handle, target)
            result.append(ctx.Source(target, ""))
        else:
            result.append(source)
    return result


def _trigger(text: str, line: int) -> Instruction:
    """An ONBUILD trigger's one instruction; Docker refuses ONBUILD, FROM and MAINTAINER."""
    where = f"line {line}: " if line else ""
    parsed = parse(text).instructions
    if len(parsed) != 1:
        raise DockerfileError(f"{where}ONBUILD takes exactly one instruction: {text!r}")
    keyword = parsed[0].keyword
    if keyword == "ONBUILD":
        raise DockerfileError(f"{where}Chaining ONBUILD via `ONBUILD ONBUILD` isn't allowed")
    if keyword in NOT_TRIGGERS:
        raise DockerfileError(f"{where}{keyword} isn't allowed as an ONBUILD trigger")
    return parsed[0]
