"""Image references: normalisation of every spelling, and errors naming the bad part."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from husk.errors import InvalidArgument
from husk.oci.platform import Platform, parse_platform, select_platform
from husk.oci.reference import normalise, parse_reference

DIGEST = "sha256:" + "ab" * 32


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("alpine", "docker.io/library/alpine:latest"),
        ("alpine:latest", "docker.io/library/alpine:latest"),
        ("docker.io/library/alpine:latest", "docker.io/library/alpine:latest"),
        ("index.docker.io/library/alpine", "docker.io/library/alpine:latest"),
        ("docker.io/alpine:3.19", "docker.io/library/alpine:3.19"),
        ("user/app", "docker.io/user/app:latest"),
        ("localhost/app", "localhost/app:latest"),
        ("localhost:5000/app:v1", "localhost:5000/app:v1"),
        ("host:5000/ns/repo@" + DIGEST, "host:5000/ns/repo@" + DIGEST),
        ("host.example.com/a/b/c:tag", "host.example.com/a/b/c:tag"),
        ("alpine:3.19@" + DIGEST, "docker.io/library/alpine:3.19@" + DIGEST),
        ("127.0.0.1:5000/busybox", "127.0.0.1:5000/busybox:latest"),
        ("[::1]:5000/busybox:x", "[::1]:5000/busybox:x"),
        ("Registry.Example.com/app", "Registry.Example.com/app:latest"),
        ("a__b/c.d-e_f:T_1.0-x", "docker.io/a__b/c.d-e_f:T_1.0-x"),
    ],
)
def test_normalise(text: str, expected: str) -> None:
    assert normalise(text) == expected


def test_parts_and_familiar_name() -> None:
    ref = parse_reference("host:5000/ns/repo:v2@" + DIGEST)
    assert (ref.domain, ref.path, ref.tag, ref.digest) == ("host:5000", "ns/repo", "v2", DIGEST)
    assert ref.repository == "host:5000/ns/repo"
    assert ref.ref == DIGEST
    assert parse_reference("alpine").familiar_repository == "alpine"
    assert parse_reference("user/app").familiar_repository == "user/app"
    assert parse_reference("docker.io/library/a/b").familiar_repository == "library/a/b"
    assert parse_reference("quay.io/x/y").familiar_repository == "quay.io/x/y"
    assert parse_reference("alpine@" + DIGEST).tag is None
    assert parse_reference("alpine", default_tag=False).tag is None


@pytest.mark.parametrize(
    ("text", "bad_part"),
    [
        ("", "empty"),
        ("Alpine", "'Alpine' (must be lowercase)"),
        ("alpine:", "bad tag ''"),
        ("alpine:-x", "bad tag '-x'"),
        ("alpine:" + "x" * 129, "bad tag"),
        ("alpine@sha256:xyz", "sha256"),
        ("alpine@md5:" + "a" * 32, "unsupported digest algorithm 'md5'"),
        ("alpine@", "empty digest"),
        ("host:99999/app", "bad registry port '99999'"),
        ("host:/app", "bad registry port ''"),
        ("-bad.host/app", "bad registry host '-bad.host'"),
        ("a//b", "empty path component"),
        ("a/B/c", "'B'"),
        ("a/b_/c", "'b_'"),
        ("with space", "whitespace"),
        ("docker.io/", "missing repository name"),
        (":tag", "missing repository name"),
        ("[::1/app", "IPv6"),
        ("a" * 300, "longer than 255"),
    ],
)
def test_malformed_references_name_the_bad_part(text: str, bad_part: str) -> None:
    with pytest.raises(InvalidArgument) as caught:
        parse_reference(text)
    assert bad_part in str(caught.value)
    assert "\n" not in str(caught.value)


# No '.' in components: a first component with a dot is a registry host, by Docker's rule.
component = st.from_regex(r"[a-z0-9]{1,8}(?:(?:_|__|-+)[a-z0-9]{1,8}){0,2}", fullmatch=True)


@settings(max_examples=60, deadline=None)
@given(
    domain=st.sampled_from(["", "docker.io/", "localhost:5000/", "reg.example.com/"]),
    parts=st.lists(component, min_size=1, max_size=3),
    tag=st.one_of(st.none(), st.from_regex(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,20}", fullmatch=True)),
)
def test_normalise_is_idempotent(domain: str, parts: list[str], tag: str | None) -> None:
    text = domain + "/".join(parts) + (f":{tag}" if tag else "")
    once = normalise(text)
    assert normalise(once) == once
    assert once.endswith(f":{tag or 'latest'}")


def test_platform_parsing_and_selection() -> None:
    assert parse_platform("linux/amd64") == Platform("linux", "amd64")
    assert parse_platform("linux/aarch64/v8") == Platform("linux", "arm64", "v8")
    with pytest.raises(InvalidArgument, match="os/arch"):
        parse_platform("linux")
    entries = [
        (Platform("linux", "arm", "v6"), "a"),
        (Platform("linux", "arm", "v7"), "b"),
        (Platform("linux", "arm64"), "c"),
        (Platform("linux", "amd64"), "d"),
    ]
    assert select_platform(entries, Platform("linux", "arm", "v7")) == entries[1]
    assert select_platform(entries, Platform("linux", "arm64", "v8")) == entries[2]
    assert select_platform(entries, Platform("linux", "amd64")) == entries[3]
    assert select_platform(entries, Platform("linux", "s390x")) is None
    assert select_platform(entries, Platform("windows", "amd64")) is None
