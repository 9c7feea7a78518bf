"""Hostile tar headers at every host reader of a tar (husk.oci.tarsafe): a guest's ``cp`` or
``commit`` tar, a registry's layer, a client's build context or image archive.

tarfile read a PAX or GNU long-name header's claimed size whole into memory (a 300 MB
header held 1.1 GB of the CLI, 0.9 GB of the daemon), followed a chain of such headers
by recursion (RecursionError), kept every global record, and raised ValueError or
IndexError on a truncated sparse map: tracebacks, not refusals. No VM: the readers are
the host's own code."""

from __future__ import annotations

import io
import tarfile
import tracemalloc
from collections.abc import Callable
from pathlib import Path

import pytest

from husk.build.context import extract_context
from husk.cli.cp import copy_policy
from husk.errors import HuskError
from husk.oci.archive import load_path
from husk.oci.extract import extract_archive
from husk.oci.store import ImageStore
from husk.oci.tarsafe import HEADER_LIMIT
from husk.oci.unpack import apply_layer, check_layer
from husk.runtime import layertar

TAR = "application/vnd.oci.image.layer.v1.tar"
BIG = 16 * HEADER_LIMIT
"""A header's size in the attacks: 16 times the cap, so the old parse's peak (about
three times the size) is far above what the test allows."""


def _pad(size: int) -> bytes:
    return b"\0" * (-size % tarfile.BLOCKSIZE)


def _header(name: str, kind: bytes, size: int) -> bytes:
    info = tarfile.TarInfo(name)
    info.type, info.size = kind, size
    return info.tobuf(tarfile.USTAR_FORMAT)


def _file(name: str = "f", data: bytes = b"x", **pax: str) -> bytes:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.pax_headers = dict(pax)
    form = tarfile.PAX_FORMAT if pax or len(name) > 100 else tarfile.USTAR_FORMAT
    return info.tobuf(form) + data + _pad(len(data))


def _pax_record(keyword: str, size: int) -> bytes:
    """One PAX record of exactly ``size`` bytes: ``"<size> keyword=xxx…\\n"``."""
    prefix = f"{size} {keyword}=".encode()
    return prefix + b"x" * (size - len(prefix) - 1) + b"\n"


def _end() -> bytes:
    return b"\0" * (2 * tarfile.BLOCKSIZE)


def huge_pax() -> bytes:
    record = _pax_record("comment", BIG)
    return _header("././@PaxHeader", tarfile.XHDTYPE, BIG) + record + _pad(BIG) + _file() + _end()


def huge_gnu_long_name() -> bytes:
    name = b"a" * BIG
    return _header("././@LongLink", tarfile.GNUTYPE_LONGNAME, BIG) + name + _file() + _end()


def header_chain() -> bytes:
    """300 GNU long-name headers in front of one file (tarfile recursed once per header)."""
    one = _header("././@LongLink", tarfile.GNUTYPE_LONGNAME, 2) + b"a\0" + _pad(2)
    return one * 300 + _file() + _end()


def global_records() -> bytes:
    """Three global PAX headers of 600 KB each (tarfile kept them all for the archive)."""
    out = b""
    size = 600 * 1024
    for index in range(3):
        record = _pax_record(f"comment{index}", size)
        out += _header("pax_global_header", tarfile.XGLTYPE, size) + record + _pad(size)
        out += _file(f"f{index}")
    return out + _end()


SPARSE_1_0 = {
    "GNU.sparse.major": "1",
    "GNU.sparse.minor": "0",
    "GNU.sparse.name": "f",
    "GNU.sparse.realsize": "10",
}
"""The PAX records of a PAX 1.0 sparse file (its map leads its data)."""


def truncated_sparse_map() -> bytes:
    """A PAX 1.0 sparse file whose map has no newline (tarfile: ValueError)."""
    return _file("f", b"y" * 512, **SPARSE_1_0) + _end()


def endless_sparse_map() -> bytes:
    """A PAX 1.0 sparse map claiming 10**8 fields, 1.1 MiB of them given."""
    data = b"100000000\n" + b"1000000000\n" * (HEADER_LIMIT // 10)
    return _file("f", data, **SPARSE_1_0) + _end()


def truncated_old_sparse() -> bytes:
    """An old GNU sparse header announcing an extension block that never comes
    (tarfile: IndexError)."""
    info = tarfile.TarInfo("f")
    info.type = tarfile.GNUTYPE_SPARSE
    block = bytearray(info.tobuf(tarfile.GNU_FORMAT))
    block[482] = 1  # isextended
    block[148:156] = b" " * 8
    block[148:155] = b"%06o\0" % tarfile.calc_chksums(bytes(block))[0]
    return bytes(block)


ATTACKS: dict[str, Callable[[], bytes]] = {
    "huge_pax": huge_pax,
    "huge_gnu_long_name": huge_gnu_long_name,
    "header_chain": header_chain,
    "global_records": global_records,
    "truncated_sparse_map": truncated_sparse_map,
    "endless_sparse_map": endless_sparse_map,
    "truncated_old_sparse": truncated_old_sparse,
}


def _cp_out(data: bytes, tmp_path: Path) -> None:
    """``husk cp CONTAINER:SRC DEST``'s extraction of a guest's archive."""
    (tmp_path / "dest").mkdir()
    extract_archive(io.BytesIO(data), tmp_path / "dest", copy_policy(False), label="archive")


def _commit(data: bytes, tmp_path: Path) -> None:
    """The daemon's rewrite of a guest's committed layer."""
    layertar.rewrite(io.BytesIO(data), tmp_path / "layer.gz", max_bytes=1 << 30)


def _context(data: bytes, tmp_path: Path) -> None:
    """The daemon's unpacking of a client's build context."""
    (tmp_path / "ctx").mkdir()
    extract_context(io.BytesIO(data), tmp_path / "ctx")


def _pull(data: bytes, tmp_path: Path) -> None:
    """A registry's layer: checked at pull, applied at a disk build."""
    layer = tmp_path / "layer.tar"
    layer.write_bytes(data)
    try:
        check_layer(layer, TAR)
    finally:
        apply_layer(layer, TAR, tmp_path / "root")


def _load(data: bytes, tmp_path: Path) -> None:
    """``docker load``: a client's image archive."""
    archive = tmp_path / "image.tar"
    archive.write_bytes(data)
    load_path(archive, store=ImageStore(tmp_path / "images"))


READERS: dict[str, Callable[[bytes, Path], None]] = {
    "cp_out": _cp_out,
    "commit": _commit,
    "build_context": _context,
    "pull": _pull,
    "load": _load,
}


def _peak(read: Callable[[], None]) -> tuple[int, HuskError | None]:
    """What ``read`` allocates at its peak, and the refusal it ended with if any."""
    refused = None
    tracemalloc.start()
    try:
        try:
            read()
        except HuskError as err:
            refused = err
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return peak, refused


SPARSE_MAP_ALLOWANCE = 32 << 20
"""A sparse map of HEADER_LIMIT bytes is parsed by tarfile into a list of Python ints
(about 36 bytes per number of 2 bytes): at most this much, per entry, while it is read."""


CASES = [
    (reader, attack)
    for reader in sorted(READERS)
    for attack in sorted(ATTACKS)
    # One parser for every reader (the other attacks show each reader uses it); its
    # sparse map costs ~1.5 s under tracemalloc, so one reader shows it.
    if attack != "endless_sparse_map" or reader == "cp_out"
]


@pytest.mark.parametrize(("reader", "attack"), CASES)
def test_hostile_headers_are_one_line_refusals_in_bounded_memory(
    reader: str, attack: str, tmp_path: Path
) -> None:
    data = ATTACKS[attack]()
    # The same reader on an ordinary archive of the same size: its own buffers (a pull's
    # reads of 1 MiB and more).
    ordinary = _file("big", bytes(len(data))) + _end()
    (tmp_path / "baseline").mkdir()
    baseline, _ = _peak(lambda: READERS[reader](ordinary, tmp_path / "baseline"))
    peak, refused = _peak(lambda: READERS[reader](data, tmp_path))
    assert refused is not None, f"{reader} took the archive"
    message = str(refused)
    assert message and "\n" not in message, message
    # The old parse held about three times a header's BIG bytes.
    allowance = SPARSE_MAP_ALLOWANCE if "sparse_map" in attack else 4 * HEADER_LIMIT
    assert peak - baseline < allowance, f"{reader}/{attack}: {peak} bytes (baseline {baseline})"


def test_ordinary_extended_headers_still_read(tmp_path: Path) -> None:
    """A long name (GNU and PAX), a global record and a PAX mtime: what real archives
    carry is read as before."""
    long_name = "d" * 150 + "/" + "n" * 150
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.GNU_FORMAT) as tar:
        info = tarfile.TarInfo(long_name)
        info.size = 2
        tar.addfile(info, io.BytesIO(b"hi"))
    pax = io.BytesIO()
    with tarfile.open(
        fileobj=pax, mode="w", format=tarfile.PAX_FORMAT, pax_headers={"comment": "g"}
    ) as tar:
        info = tarfile.TarInfo("p" * 200)
        info.size = 3
        info.pax_headers = {"mtime": "1500000000.5"}
        tar.addfile(info, io.BytesIO(b"pax"))
    for index, data in enumerate((out.getvalue(), pax.getvalue())):
        dest = tmp_path / f"dest{index}"
        dest.mkdir()
        extract_archive(io.BytesIO(data), dest, copy_policy(False), label="archive")
        files = [path for path in dest.rglob("*") if path.is_file()]
        assert [path.read_bytes() for path in files] == [b"hi" if index == 0 else b"pax"]
