"""Reading a hostile tar with tarfile, its headers bounded.

tarfile reads a PAX or GNU long-name header's claimed size into memory whole (and
decodes it: about three times the size at its peak), follows a chain of such headers
by recursion, keeps every global PAX record for the rest of the archive, and reads a
GNU sparse map until it is complete. A guest's ``cp`` or ``commit`` tar, a registry's
layer, a client's image archive or build context could each make husk hold gigabytes
(a 300 MB PAX header: 1.1 GB in the CLI, 0.9 GB in the daemon), raise RecursionError
(a few hundred headers in a row) or ValueError/IndexError (a truncated sparse map): a
traceback instead of a refusal.

:class:`BoundedTarInfo`, given to ``tarfile.open(tarinfo=...)`` through :func:`open_tar`,
refuses instead, as Go's archive/tar (Docker's) does: one header at most
:data:`HEADER_LIMIT` bytes (the guest's own cap, ``husk.guest.agent.tarpipe``), global
records together as much, a sparse map as much, at most :data:`MAX_CHAIN` headers in
front of one entry. Every refusal is a :class:`tarfile.TarError`, which each caller
already turns into its one-line error.
"""

from __future__ import annotations

import contextlib
import tarfile
from collections.abc import Iterator
from typing import IO, Any, cast

HEADER_LIMIT = 1 << 20
"""Bytes of one PAX or GNU long-name header, of all global PAX records, of one sparse map."""
MAX_CHAIN = 16
"""Extended headers in front of one entry (GNU long name and link, PAX, global PAX: 4
in any real archive)."""

_EXTENDED = (
    tarfile.GNUTYPE_LONGNAME,
    tarfile.GNUTYPE_LONGLINK,
    tarfile.XHDTYPE,
    tarfile.XGLTYPE,
    tarfile.SOLARIS_XHDTYPE,
)


class HeaderTooLarge(tarfile.TarError):
    """An extended header, or the headers in front of one entry, over the bounds."""


class MalformedHeader(tarfile.TarError):
    """A header tarfile's own parse fails on with something other than a TarError."""


class _LimitedReader:
    """The archive's file object, reads past ``limit`` bytes refused (a sparse map)."""

    def __init__(self, inner: Any, limit: int) -> None:
        self._inner = inner
        self._left = limit

    def read(self, size: int = -1) -> bytes:
        if size < 0 or size > self._left:
            raise HeaderTooLarge(f"a sparse map of more than {HEADER_LIMIT} bytes")
        self._left -= size
        return bytes(self._inner.read(size))

    def tell(self) -> int:
        return int(self._inner.tell())


@contextlib.contextmanager
def _sparse_map(tar: Any) -> Iterator[None]:
    original = tar.fileobj
    tar.fileobj = _LimitedReader(original, HEADER_LIMIT)
    try:
        yield
    except (ValueError, IndexError):  # tarfile's parse of a truncated or garbled map
        raise MalformedHeader("a malformed sparse map") from None
    finally:
        tar.fileobj = original


class BoundedTarInfo(tarfile.TarInfo):
    """tarfile's header parsing with the bounds of this module (hooks on tarfile's
    per-type steps, which are the same from Python 3.8 to 3.13)."""

    def _proc_member(self, tar: Any) -> Any:
        if self.type not in _EXTENDED:
            return cast(Any, super())._proc_member(tar)
        if not 0 <= self.size <= HEADER_LIMIT:
            raise HeaderTooLarge(
                f"an extended header of {self.size} bytes (at most {HEADER_LIMIT})"
            )
        depth = getattr(tar, "_husk_header_chain", 0) + 1
        if depth > MAX_CHAIN:
            raise HeaderTooLarge(f"more than {MAX_CHAIN} extended headers in front of one entry")
        if self.type == tarfile.XGLTYPE:
            held = sum(len(key) + len(value) for key, value in tar.pax_headers.items())
            if held + self.size > HEADER_LIMIT:
                raise HeaderTooLarge(f"global headers of more than {HEADER_LIMIT} bytes")
        tar._husk_header_chain = depth
        try:
            return cast(Any, super())._proc_member(tar)
        finally:
            tar._husk_header_chain = depth - 1

    def _proc_sparse(self, tar: Any) -> Any:
        with _sparse_map(tar):
            return cast(Any, super())._proc_sparse(tar)

    def _proc_gnusparse_10(self, following: Any, pax_headers: Any, tar: Any) -> Any:
        with _sparse_map(tar):
            return cast(Any, super())._proc_gnusparse_10(following, pax_headers, tar)


def open_tar(fileobj: IO[bytes], mode: str, **kwargs: Any) -> tarfile.TarFile:
    """``tarfile.open`` of a hostile archive (read modes), headers bounded."""
    opener: Any = tarfile.open  # typeshed ties each mode to a literal
    return cast(
        tarfile.TarFile, opener(fileobj=fileobj, mode=mode, tarinfo=BoundedTarInfo, **kwargs)
    )
