"""The Dockerfile parser, substitution, .dockerignore, COPY sources and cache keys
(no VM)."""

from __future__ import annotations

import io
import os
import tarfile
from pathlib import Path

import pytest

from husk.build import context as ctx
from husk.build.cache import BuildCache, step_key
from husk.build.lineage import intermediate_ids
from husk.build.parser import DockerfileError, key_values, parse, substitute, words
from husk.errors import InvalidArgument, NotSupported
from husk.oci.store import ImageRecord


def test_continuations_comments_and_forms() -> None:
    parsed = parse(
        "# a comment\n"
        "FROM busybox AS base\n"
        "RUN echo one \\\n"
        "  # a comment inside\n"
        "    && echo two\n"
        "\n"
        'CMD ["sh", "-c", "echo hi"]\n'
        "COPY --from=base --chown=1:2 /a /b\n"
        "run lower case\n"
    )
    keywords = [i.keyword for i in parsed.instructions]
    assert keywords == ["FROM", "RUN", "CMD", "COPY", "RUN"]
    run = parsed.instructions[1]
    assert run.text == "echo one     && echo two" and run.line == 3
    assert parsed.instructions[2].exec_form == ["sh", "-c", "echo hi"]
    copy = parsed.instructions[3]
    assert copy.flags == {"from": "base", "chown": "1:2"} and copy.text == "/a /b"


def test_directives() -> None:
    parsed = parse("# syntax=docker/dockerfile:1\n# escape=`\nFROM x\nRUN a `\n b\n")
    assert parsed.escape == "`"
    assert parsed.warnings and "ignored" in parsed.warnings[0]
    assert parsed.instructions[1].text == "a  b"
    # A directive after an instruction is a comment.
    assert parse("FROM x\n# escape=`\nRUN a\n").escape == "\\"
    with pytest.raises(DockerfileError, match="escape"):
        parse("# escape=x\nFROM x\n")


def test_bad_dockerfiles() -> None:
    with pytest.raises(DockerfileError, match="unknown instruction: FORM"):
        parse("FORM x\n")
    with pytest.raises(DockerfileError, match="no instructions"):
        parse("# only a comment\n")
    with pytest.raises(NotSupported, match="heredocs"):
        parse("FROM x\nRUN <<EOF\necho\nEOF\n")
    # Shell syntax with << but no heredoc word is fine.
    assert parse("FROM x\nRUN echo $((1 << 2))\n").instructions[1].keyword == "RUN"


def test_substitution() -> None:
    env = {"A": "1", "EMPTY": "", "PATH": "/bin"}
    assert substitute("$A ${A} x${A}y", env) == "1 1 x1y"
    assert substitute("${MISSING:-def} ${EMPTY:-def} ${A:-def}", env) == "def def 1"
    assert substitute("${A:+alt} ${MISSING:+alt}", env) == "alt "
    assert substitute("${EMPTY-d} ${MISSING-d}", env) == " d"
    assert substitute("\\$A '$A'", env) == "$A '$A'"
    assert substitute("$PATH:/usr/bin", env) == "/bin:/usr/bin"
    assert substitute("cost $5", env) == "cost $5"
    with pytest.raises(DockerfileError):
        substitute("${A", env)


def test_words_and_key_values() -> None:
    assert words("a \"b c\" d\\ e 'f g'") == ["a", "b c", "d e", "f g"]
    assert key_values('A=1 B="two words" C=', "ENV") == [("A", "1"), ("B", "two words"), ("C", "")]
    assert key_values("NAME some value here", "ENV") == [("NAME", "some value here")]
    assert key_values("VERSION", "ARG") == [("VERSION", "\0")]
    assert key_values("VERSION=1.2", "ARG") == [("VERSION", "1.2")]
    with pytest.raises(DockerfileError):
        key_values("ONLYNAME", "ENV")
    with pytest.raises(DockerfileError):
        words('"unterminated')


def test_cache_keys() -> None:
    base = step_key("sha256:a", "RUN x", {"V": "1"})
    assert base == step_key("sha256:a", "RUN x", {"V": "1"})
    assert base != step_key("sha256:b", "RUN x", {"V": "1"})
    assert base != step_key("sha256:a", "RUN y", {"V": "1"})
    assert base != step_key("sha256:a", "RUN x", {"V": "2"})
    assert base != step_key("sha256:a", "RUN x", {"V": "1"}, "sha256:files")


def test_cache_store(tmp_path: Path) -> None:
    cache = BuildCache(tmp_path / "cache.json")
    assert cache.get("k") is None
    cache.put("k", "sha256:1")
    assert BuildCache(tmp_path / "cache.json").get("k") == "sha256:1"
    assert cache.prune() == 1 and cache.get("k") is None
    (tmp_path / "cache.json").write_text("not json")
    assert cache.get("k") is None


def test_dockerignore() -> None:
    rules = ctx.parse_dockerignore("# c\n*.key\n**/*.tmp\nbuild\n!build/keep.txt\n")
    assert ctx.ignored("a.key", rules) and not ctx.ignored("dir/a.key", rules)
    assert ctx.ignored("x/y/z.tmp", rules) and ctx.ignored("z.tmp", rules)
    assert ctx.ignored("build/out.o", rules) and not ctx.ignored("build/keep.txt", rules)
    assert not ctx.ignored("src/main.c", rules)


def _context(tmp_path: Path) -> Path:
    root = tmp_path / "ctx"
    (root / "dir" / "sub").mkdir(parents=True)
    (root / "a.txt").write_text("a")
    (root / "dir" / "b.txt").write_text("b")
    (root / "dir" / "sub" / "c.txt").write_text("c")
    (tmp_path / "outside.txt").write_text("secret")
    return root


def _names(
    root: Path, sources: list[str], dest: str, **options: object
) -> dict[str, tarfile.TarInfo]:
    found = ctx.resolve_sources(root, sources, [], "COPY")
    out = io.BytesIO()
    ctx.write_copy_tar(
        ctx.copy_entries(found, dest, [], honour_ignore=True),
        out,
        ctx.CopyOptions(**options),  # type: ignore[arg-type]
    )
    out.seek(0)
    with tarfile.open(fileobj=out) as tar:
        return {m.name: m for m in tar.getmembers()}


def test_copy_layouts(tmp_path: Path) -> None:
    root = _context(tmp_path)
    assert set(_names(root, ["a.txt"], "/app/")) == {"app/a.txt"}
    assert set(_names(root, ["a.txt"], "/app/renamed")) == {"app/renamed"}
    assert set(_names(root, ["a.txt"], "/app/.")) == {"app/a.txt"}  # COPY a.txt . in /app
    assert set(_names(root, ["dir"], "/app")) == {"app/b.txt", "app/sub", "app/sub/c.txt"}
    assert set(_names(root, ["*.txt", "dir/b.txt"], "/d")) == {"d/a.txt", "d/b.txt"}
    owned = _names(root, ["a.txt"], "/x", owner=(1000, 50), mode=0o640)["x"]
    assert (owned.uid, owned.gid, owned.mode) == (1000, 50, 0o640)


def test_copy_refuses_what_is_outside_the_context(tmp_path: Path) -> None:
    root = _context(tmp_path)
    with pytest.raises(ctx.ContextError, match="outside the build context"):
        ctx.resolve_sources(root, ["../outside.txt"], [], "COPY")
    os.symlink(tmp_path / "outside.txt", root / "absolute-link")
    os.symlink("../outside.txt", root / "relative-link")
    for link in ("absolute-link", "relative-link"):
        with pytest.raises(ctx.ContextError, match="leads outside"):
            ctx.resolve_sources(root, [link], [], "COPY")
    with pytest.raises(ctx.ContextError, match="file not found"):
        ctx.resolve_sources(root, ["missing.txt"], [], "COPY")
    rules = ctx.parse_dockerignore("a.txt\n")
    with pytest.raises(ctx.ContextError, match=r"excluded by \.dockerignore"):
        ctx.resolve_sources(root, ["a.txt"], rules, "COPY")
    with pytest.raises(NotSupported, match="URL"):
        ctx.resolve_sources(root, ["https://example.com/x"], [], "ADD")
    # A link inside a copied directory is copied as a link, never followed.
    os.symlink("/etc/passwd", root / "dir" / "inner-link")
    names = _names(root, ["dir"], "/app")
    assert names["app/inner-link"].issym() and names["app/inner-link"].linkname == "/etc/passwd"


def test_context_tar_is_extracted_safely(tmp_path: Path) -> None:
    def tar_of(name: str, kind: bytes = tarfile.REGTYPE) -> io.BytesIO:
        buffer = io.BytesIO()
        with tarfile.open(fileobj=buffer, mode="w") as tar:
            member = tarfile.TarInfo(name)
            member.type = kind
            tar.addfile(member, io.BytesIO(b""))
        buffer.seek(0)
        return buffer

    for number, (name, kind) in enumerate(
        [("../escape", tarfile.REGTYPE), ("dev/null", tarfile.CHRTYPE)]
    ):
        dest = tmp_path / f"d{number}"
        dest.mkdir()
        with pytest.raises(InvalidArgument):
            ctx.extract_context(tar_of(name, kind), dest)
    assert not (tmp_path / "escape").exists()
    with pytest.raises(InvalidArgument):
        ctx.extract_context(io.BytesIO(b"garbage" * 100), tmp_path)


def test_chown_and_chmod() -> None:
    assert ctx.parse_chown("1000:1000") == (1000, 1000)
    assert ctx.parse_chown("5") == (5, 5)
    assert ctx.parse_chown("root") == (0, 0)
    passwd = "root:x:0:0::/root:/bin/sh\napp:x:1001:1002::/home/app:/bin/sh\n"
    group = "root:x:0:\nstaff:x:50:app\n"
    assert ctx.chown_needs_names("app") and not ctx.chown_needs_names("1:root")
    assert ctx.parse_chown("app", passwd, group) == (1001, 1001)  # no group: the uid's number
    assert ctx.parse_chown("app:staff", passwd, group) == (1001, 50)
    assert ctx.parse_chown("7:staff", passwd, group) == (7, 50)
    with pytest.raises(InvalidArgument, match="unable to find user ghost"):
        ctx.parse_chown("ghost", passwd, group)
    with pytest.raises(InvalidArgument, match="unable to find group nope"):
        ctx.parse_chown("app:nope", passwd, group)
    assert ctx.parse_chmod("0755") == 0o755
    with pytest.raises(InvalidArgument):
        ctx.parse_chmod("u+x")


def _image(
    image_id: str, names: tuple[str, ...], diff_ids: tuple[str, ...], steps: list[str]
) -> ImageRecord:
    history = [{"created": "t", "created_by": step} for step in steps]
    return ImageRecord(
        names=names,
        id=image_id,
        manifest_digest=image_id,
        config={"history": history},
        layers=(),
        diff_ids=diff_ids,
        size=0,
        created="",
        os="linux",
        architecture="amd64",
    )


def test_intermediate_images_are_untagged_parents() -> None:
    base = _image("base", ("busybox:latest",), ("l1",), ["from"])
    step = _image("step", (), ("l1", "l2"), ["from", "RUN a"])
    final = _image("final", ("app:1",), ("l1", "l2"), ["from", "RUN a", "CMD x"])
    stray = _image("stray", (), ("l1", "l9"), ["from", "RUN b"])
    assert intermediate_ids([base, step, final, stray]) == {"step"}


def test_cli_context_tar_honours_dockerignore(tmp_path: Path) -> None:
    from husk.cli.build import STDIN_DOCKERFILE, _context_tar

    root = _context(tmp_path)
    (root / "Dockerfile").write_text("FROM x\n")
    (root / "secret.key").write_text("k")
    (root / ".dockerignore").write_text("*.key\nDockerfile\n")
    out = io.BytesIO()
    assert _context_tar(root, None, out) == "Dockerfile"
    out.seek(0)
    with tarfile.open(fileobj=out) as tar:
        names = set(tar.getnames())
    # The Dockerfile and .dockerignore travel even when ignored; the key does not.
    assert {"Dockerfile", ".dockerignore", "a.txt", "dir/sub/c.txt"} <= names
    assert "secret.key" not in names
    elsewhere = tmp_path / "other.Dockerfile"
    elsewhere.write_text("FROM y\n")
    out = io.BytesIO()
    assert _context_tar(root, elsewhere, out) == STDIN_DOCKERFILE
    out.seek(0)
    with tarfile.open(fileobj=out) as tar:
        extracted = tar.extractfile(STDIN_DOCKERFILE)
        assert extracted is not None and extracted.read() == b"FROM y\n"


def test_unsupported_flags_are_refused() -> None:
    from husk.build.executor import _refuse_flags

    for line in ("RUN --mount=type=cache,target=/x make", "FROM --platform=linux/arm64 x"):
        with pytest.raises(NotSupported, match="is not supported by husk build"):
            _refuse_flags(parse(line + "\n").instructions[0], set())
    _refuse_flags(parse("HEALTHCHECK --retries=3 CMD x\n").instructions[0], {"retries"})
