"""``husk build`` and ``husk builder prune``: the context is sent to the daemon as a tar
(``.dockerignore`` applied here, as the docker CLI does) and the build's output shown."""

from __future__ import annotations

import io
import json
import os
import sys
import tarfile
import tempfile
from pathlib import Path
from typing import IO, Any
from urllib.parse import urlencode

import click

from husk import errors
from husk.cli.format import escape_text
from husk.client.daemon import connect

BUILD_TIMEOUT = 6 * 3600.0
STDIN_DOCKERFILE = ".husk-dockerfile-stdin"


def _context_tar(root: Path, dockerfile: Path | None, out: IO[bytes]) -> str:
    """Writes the context (minus .dockerignore's exclusions) to ``out``; the Dockerfile's
    name inside it."""
    from husk.build.context import ignored, parse_dockerignore  # lazy: CLI start-up (~35 ms)

    rules = []
    ignore_file = root / ".dockerignore"
    if ignore_file.is_file():
        rules = parse_dockerignore(ignore_file.read_text(errors="replace"))
    name = "Dockerfile"
    extra: bytes | None = None
    if dockerfile is not None:
        full = dockerfile.resolve()
        if root.resolve() in full.parents:
            name = str(full.relative_to(root.resolve()))
        else:
            extra, name = full.read_bytes(), STDIN_DOCKERFILE
    keep = {name, ".dockerignore"}
    with tarfile.open(fileobj=out, mode="w|", format=tarfile.PAX_FORMAT) as tar:
        for directory, dirs, files in os.walk(root):
            dirs.sort()
            for entry in [*dirs, *sorted(files)]:
                path = Path(directory) / entry
                rel = str(path.relative_to(root))
                if rel not in keep and ignored(rel, rules):
                    continue
                tar.add(path, arcname=rel, recursive=False)
        if extra is not None:
            info = tarfile.TarInfo(STDIN_DOCKERFILE)
            info.size = len(extra)
            tar.addfile(info, io.BytesIO(extra))
    return name


def _pairs(values: tuple[str, ...], what: str) -> dict[str, str]:
    result = {}
    for value in values:
        key, sep, text = value.partition("=")
        if not key:
            raise errors.InvalidArgument(f"invalid {what}: {value!r}")
        if sep:
            result[key] = text
        elif key in os.environ:  # NAME alone: the caller's NAME, as docker build takes it
            result[key] = os.environ[key]
    return result


@click.command(name="build")
@click.option("-t", "--tag", "tags", multiple=True, help="Name and optionally a tag (name:tag).")
@click.option(
    "-f", "--file", "dockerfile", help="Name of the Dockerfile (default: CONTEXT/Dockerfile)."
)
@click.option("--build-arg", "build_args", multiple=True, help="Set a build-time variable.")
@click.option("--target", default="", help="Build this stage and stop.")
@click.option("--no-cache", is_flag=True, help="Do not use the build cache.")
@click.option("--label", "labels", multiple=True, help="Set a label on the image.")
@click.option("-q", "--quiet", is_flag=True, help="Print only the image id.")
@click.option("--network", default="", help="Network of the RUN steps (default or none).")
@click.option("--pull", is_flag=True, help="Always pull the base images.")
@click.option("--platform", default="", help="Target platform (only the host's).")
@click.argument("context")
def build(
    tags: tuple[str, ...],
    dockerfile: str | None,
    build_args: tuple[str, ...],
    target: str,
    no_cache: bool,
    labels: tuple[str, ...],
    quiet: bool,
    network: str,
    pull: bool,
    platform: str,
    context: str,
) -> None:
    """Build an image from a Dockerfile and a context (a directory, or - for a tar or a
    Dockerfile on standard input)."""
    if platform:
        raise errors.NotSupported("--platform is not supported by husk build yet")
    with tempfile.TemporaryFile() as body:
        name = _prepare_context(context, dockerfile, body)
        body.seek(0)
        pairs: list[tuple[str, str]] = [("t", tag) for tag in tags]
        pairs += [
            ("dockerfile", name),
            ("buildargs", json.dumps(_pairs(build_args, "--build-arg"))),
            ("labels", json.dumps(_pairs(labels, "--label"))),
            ("target", target),
            ("nocache", "1" if no_cache else "0"),
            ("pull", "1" if pull else "0"),
            ("q", "1" if quiet else "0"),
            ("networkmode", network),
            ("rm", "1"),
        ]
        _stream(connect(), f"/build?{urlencode(pairs)}", body)


def _prepare_context(context: str, dockerfile: str | None, body: IO[bytes]) -> str:
    if context == "-":
        data = sys.stdin.buffer.read()
        if _is_tar(data):
            body.write(data)
            return dockerfile or "Dockerfile"
        with tarfile.open(fileobj=body, mode="w|") as tar:
            info = tarfile.TarInfo("Dockerfile")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        return "Dockerfile"
    root = Path(context)
    if not root.is_dir():
        raise errors.InvalidArgument(f"unable to prepare context: path {context!r} not found")
    file = Path(dockerfile) if dockerfile else None
    if file is not None and not file.is_file():
        raise errors.InvalidArgument(f"Cannot locate specified Dockerfile: {dockerfile}")
    if file is None and not (root / "Dockerfile").is_file():
        raise errors.InvalidArgument(f"Cannot locate specified Dockerfile: {root / 'Dockerfile'}")
    return _context_tar(root, file, body)


def _is_tar(data: bytes) -> bool:
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:*") as tar:
            return tar.next() is not None
    except (tarfile.TarError, EOFError):
        return False


def _stream(api: Any, path: str, body: IO[bytes]) -> None:
    with api.open(
        "POST",
        path,
        body=body,
        headers={"Content-Type": "application/x-tar"},
        timeout=BUILD_TIMEOUT,
    ) as response:
        for line in response.iter_lines():
            if not line.strip():
                continue
            try:
                message = json.loads(line)
            except ValueError:
                continue
            if not isinstance(message, dict):
                continue
            if message.get("error"):
                detail = message.get("errorDetail") or {}
                code = detail.get("code") if isinstance(detail, dict) else None
                click.echo(escape_text(str(message["error"])), err=True)
                # A failed RUN's code is the CLI's, as docker build exits.
                sys.exit(code if isinstance(code, int) and 0 < code < 256 else 1)
            text = message.get("stream")
            if isinstance(text, str):
                sys.stdout.write(escape_text(text, keep="\n"))
                sys.stdout.flush()


@click.group(name="builder")
def builder() -> None:
    """Manage the build cache."""


@builder.command(name="prune")
@click.option("-f", "--force", is_flag=True, help="Do not ask for confirmation.")
@click.option("-a", "--all", "all_entries", is_flag=True, help="Remove all (the default).")
def prune(force: bool, all_entries: bool) -> None:
    """Remove the build cache."""
    if not force and not click.confirm(
        "WARNING! This will remove all dangling build cache.\nAre you sure you want to continue?",
        default=False,
    ):
        return
    connect().post("/build/prune", timeout=600)
    click.echo("Total reclaimed space: 0B")
