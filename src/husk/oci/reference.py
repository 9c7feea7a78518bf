"""Image references: parse, validate and normalise.

``alpine``, ``alpine:latest`` and ``docker.io/library/alpine:latest`` are one
image. Every reference is normalised to its full form (domain, path, tag or
digest) before it is stored or looked up, so any spelling resolves.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from husk.errors import InvalidArgument

DEFAULT_DOMAIN = "docker.io"
LEGACY_DEFAULT_DOMAIN = "index.docker.io"
OFFICIAL_NAMESPACE = "library"
DEFAULT_TAG = "latest"
MAX_NAME_LENGTH = 255

_PATH_COMPONENT = re.compile(r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*")
_DOMAIN_LABEL = re.compile(r"[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?")
_IPV6_HOST = re.compile(r"\[[0-9a-fA-F:.]+\]")
_PORT = re.compile(r"[0-9]{1,5}")
_TAG = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")
_DIGEST = re.compile(r"[a-z0-9]+(?:[.+_-][a-z0-9]+)*:[a-zA-Z0-9=_-]{32,}")
_SHA256_HEX = re.compile(r"[a-f0-9]{64}")


def validate_digest(digest: str, *, what: str = "digest") -> str:
    """Return ``digest`` if it is a well-formed ``algorithm:hex`` digest.

    Only sha256 is accepted: it is the only algorithm husk can verify.
    """
    if not _DIGEST.fullmatch(digest):
        raise InvalidArgument(f"invalid {what} {digest!r}: expected 'sha256:<64 hex digits>'")
    algorithm, _, encoded = digest.partition(":")
    if algorithm != "sha256":
        raise InvalidArgument(f"unsupported {what} algorithm {algorithm!r} in {digest!r}")
    if not _SHA256_HEX.fullmatch(encoded):
        raise InvalidArgument(f"invalid {what} {digest!r}: sha256 needs 64 lowercase hex digits")
    return digest


def _is_domain(component: str) -> bool:
    """Docker's rule: the first component is a registry if it looks like a host."""
    return "." in component or ":" in component or component == "localhost"


def _validate_domain(domain: str, original: str) -> None:
    host, port = domain, ""
    if host.startswith("["):
        end = host.find("]")
        if end < 0:
            raise InvalidArgument(f"invalid reference {original!r}: bad IPv6 registry {domain!r}")
        host, rest = host[: end + 1], host[end + 1 :]
        if rest:
            if not rest.startswith(":"):
                raise InvalidArgument(f"invalid reference {original!r}: bad registry {domain!r}")
            port = rest[1:]
        if not _IPV6_HOST.fullmatch(host):
            raise InvalidArgument(f"invalid reference {original!r}: bad IPv6 registry {domain!r}")
    else:
        if ":" in host:
            host, port = host.rsplit(":", 1)
        labels = host.split(".")
        if not all(_DOMAIN_LABEL.fullmatch(label) for label in labels):
            raise InvalidArgument(f"invalid reference {original!r}: bad registry host {host!r}")
    if (port or domain.endswith(":")) and (not _PORT.fullmatch(port) or not 0 < int(port) < 65536):
        raise InvalidArgument(f"invalid reference {original!r}: bad registry port {port!r}")


@dataclass(frozen=True)
class Reference:
    """A normalised image reference.

    ``tag`` is None only when the reference names a digest alone.
    """

    domain: str
    path: str
    tag: str | None = None
    digest: str | None = None

    @property
    def repository(self) -> str:
        """``domain/path``: the name without tag or digest."""
        return f"{self.domain}/{self.path}"

    @property
    def ref(self) -> str:
        """What to ask the registry for: the digest if known, else the tag."""
        return self.digest or self.tag or DEFAULT_TAG

    def __str__(self) -> str:
        text = self.repository
        if self.tag is not None:
            text += f":{self.tag}"
        if self.digest is not None:
            text += f"@{self.digest}"
        return text

    @property
    def familiar_repository(self) -> str:
        """The repository as Docker displays it (``alpine`` for Hub's library images)."""
        if self.domain != DEFAULT_DOMAIN:
            return self.repository
        prefix = f"{OFFICIAL_NAMESPACE}/"
        if self.path.startswith(prefix) and "/" not in self.path[len(prefix) :]:
            return self.path[len(prefix) :]
        return self.path

    def with_tag(self, tag: str) -> Reference:
        return Reference(self.domain, self.path, tag, None)

    def with_digest(self, digest: str) -> Reference:
        return Reference(self.domain, self.path, None, digest)

    def tagged(self) -> str:
        """``repository:tag`` (the digest dropped), or ``repository@digest`` if untagged."""
        if self.tag is not None:
            return f"{self.repository}:{self.tag}"
        return str(self)


def parse_reference(text: str, *, default_tag: bool = True) -> Reference:
    """Parse ``text`` into a normalised :class:`Reference`.

    With ``default_tag`` a reference naming neither tag nor digest gets ``latest``.
    Raises InvalidArgument naming the bad part.
    """
    original = text
    if not text:
        raise InvalidArgument("invalid reference: empty image name")
    if text != text.strip() or any(c.isspace() for c in text):
        raise InvalidArgument(f"invalid reference {original!r}: contains whitespace")

    digest: str | None = None
    if "@" in text:
        text, _, digest = text.partition("@")
        if not digest:
            raise InvalidArgument(f"invalid reference {original!r}: empty digest after '@'")
        try:
            validate_digest(digest)
        except InvalidArgument as err:
            raise InvalidArgument(f"invalid reference {original!r}: {err}") from None

    tag: str | None = None
    last_slash = text.rfind("/")
    colon = text.rfind(":")
    if colon > last_slash:
        text, tag = text[:colon], text[colon + 1 :]
        if not _TAG.fullmatch(tag):
            raise InvalidArgument(
                f"invalid reference {original!r}: bad tag {tag!r} "
                "(letters, digits, '_', '.', '-'; at most 128; not starting with '.' or '-')"
            )

    if not text:
        raise InvalidArgument(f"invalid reference {original!r}: missing repository name")

    first, sep, rest = text.partition("/")
    if sep and _is_domain(first):
        domain, path = first, rest
        _validate_domain(domain, original)
    else:
        domain, path = DEFAULT_DOMAIN, text

    if domain == LEGACY_DEFAULT_DOMAIN:
        domain = DEFAULT_DOMAIN
    if not path:
        raise InvalidArgument(f"invalid reference {original!r}: missing repository name")

    for component in path.split("/"):
        if not component:
            raise InvalidArgument(f"invalid reference {original!r}: empty path component")
        if not _PATH_COMPONENT.fullmatch(component):
            hint = " (must be lowercase)" if component.lower() != component else ""
            raise InvalidArgument(
                f"invalid reference {original!r}: bad repository component {component!r}{hint}"
            )

    if domain == DEFAULT_DOMAIN and "/" not in path:
        path = f"{OFFICIAL_NAMESPACE}/{path}"
    if len(f"{domain}/{path}") > MAX_NAME_LENGTH:
        raise InvalidArgument(
            f"invalid reference {original!r}: repository name longer than {MAX_NAME_LENGTH}"
        )

    if tag is None and digest is None and default_tag:
        tag = DEFAULT_TAG
    return Reference(domain, path, tag, digest)


def names_an_id(text: str) -> bool:
    """Whether ``text`` can only be an image id (``sha256:…`` or 64 hex digits), never a
    name a registry could serve: such a reference is looked up locally, never pulled."""
    return text.startswith("sha256:") or _SHA256_HEX.fullmatch(text) is not None


def normalise(text: str) -> str:
    """The canonical string of a reference (``alpine`` → ``docker.io/library/alpine:latest``)."""
    return str(parse_reference(text))


def looks_like_reference(text: str) -> bool:
    try:
        parse_reference(text)
    except InvalidArgument:
        return False
    return True
