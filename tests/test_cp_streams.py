"""``husk cp``'s streams without a VM: the guest archive child's tars (file data spliced
through pipes, everything else tarfile's, the same results as tarfile's own stream mode)
and the daemon's batching of an upload."""

from __future__ import annotations

import asyncio
import errno
import gzip
import io
import os
import stat
import tarfile
import threading
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from husk.guest.agent import archive, tarpipe


def _feed(data: bytes) -> int:
    """A pipe's read end that yields ``data`` (written by a thread), then EOF."""
    read_end, write_end = os.pipe()

    def writer() -> None:
        try:
            tarpipe.write_all(write_end, data)
        except BrokenPipeError:
            pass
        finally:
            os.close(write_end)

    threading.Thread(target=writer, daemon=True).start()
    return read_end


def _extract(data: bytes, dest: Path) -> None:
    source = _feed(data)
    try:
        archive.extract_stream(source, str(dest))
    finally:
        os.close(source)


def _drain(produce: Callable[[int], None]) -> bytes:
    """What ``produce`` writes to a pipe, read by a thread as it comes."""
    read_end, write_end = os.pipe()
    chunks: list[bytes] = []

    def reader() -> None:
        while chunk := os.read(read_end, 1 << 20):
            chunks.append(chunk)

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        produce(write_end)
    finally:
        os.close(write_end)
        thread.join()
        os.close(read_end)
    return b"".join(chunks)


def _tree(root: Path) -> dict[str, tuple[str, int, bytes | str, int]]:
    found: dict[str, tuple[str, int, bytes | str, int]] = {}
    for path in sorted(root.rglob("*")):
        info = path.lstat()
        name = str(path.relative_to(root))
        if stat.S_ISLNK(info.st_mode):
            found[name] = ("link", 0, os.readlink(path), 0)
        elif stat.S_ISDIR(info.st_mode):
            found[name] = ("dir", stat.S_IMODE(info.st_mode), b"", 0)
        else:
            mtime = int(info.st_mtime)
            found[name] = ("file", stat.S_IMODE(info.st_mode), path.read_bytes(), mtime)
    return found


def _sample_tar(fmt: int = tarfile.PAX_FORMAT) -> bytes:
    """Small and big files (a big one crossing many pipe fills), a long PAX name, a
    directory, a symlink and a hard link, odd sizes around the 512-byte blocks."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=fmt) as tar:
        top = tarfile.TarInfo("top")
        top.type, top.mode = tarfile.DIRTYPE, 0o750
        tar.addfile(top)
        for index, size in enumerate([0, 1, 511, 512, 513, 70_000, 3 * 1024 * 1024 + 7]):
            info = tarfile.TarInfo(f"top/f{index}")
            info.size, info.mode, info.mtime = size, 0o640 + index % 2, 1_600_000_000 + index
            tar.addfile(info, io.BytesIO(os.urandom(size)))
        long_name = "top/" + "n" * 200
        info = tarfile.TarInfo(long_name)
        info.size, info.mtime = 5, 1_500_000_000
        tar.addfile(info, io.BytesIO(b"long\n"))
        link = tarfile.TarInfo("top/sym")
        link.type, link.linkname = tarfile.SYMTYPE, "f6"
        tar.addfile(link)
        hard = tarfile.TarInfo("top/hard")
        hard.type, hard.linkname = tarfile.LNKTYPE, "top/f5"
        tar.addfile(hard)
    return buffer.getvalue()


@pytest.mark.parametrize("fmt", [tarfile.PAX_FORMAT, tarfile.GNU_FORMAT, tarfile.USTAR_FORMAT])
def test_extraction_matches_tarfiles_own_stream(tmp_path: Path, fmt: int) -> None:
    data = _sample_tar(fmt) if fmt != tarfile.USTAR_FORMAT else _ustar_tar()
    ours, theirs = tmp_path / "ours", tmp_path / "theirs"
    ours.mkdir()
    theirs.mkdir()
    _extract(data, ours)
    with tarfile.open(fileobj=io.BytesIO(data), mode="r|") as tar:
        for member in tar:
            tar.extract(member, str(theirs), numeric_owner=True)
    assert _tree(ours) == _tree(theirs)
    if fmt != tarfile.USTAR_FORMAT:
        assert (ours / "top" / "hard").stat().st_ino == (ours / "top" / "f5").stat().st_ino


def _ustar_tar() -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for index in range(50):
            info = tarfile.TarInfo(f"d{index % 3}/file{index}")
            info.size = index * 101
            tar.addfile(info, io.BytesIO(bytes([index]) * info.size))
    return buffer.getvalue()


def test_a_gzip_stream_still_extracts(tmp_path: Path) -> None:
    """A compressed stream goes through tarfile's own decompressing stream."""
    _extract(gzip.compress(_ustar_tar()), tmp_path)
    assert (tmp_path / "d1" / "file49").read_bytes() == bytes([49]) * 49 * 101


def test_entries_outside_the_destination_are_refused(tmp_path: Path) -> None:
    for name in ("../escape", "/abs", "a/../../b"):
        buffer = io.BytesIO()
        with tarfile.open(fileobj=buffer, mode="w") as tar:
            info = tarfile.TarInfo(name)
            info.size = 1
            tar.addfile(info, io.BytesIO(b"x"))
        source = _feed(buffer.getvalue())
        read_err, write_err = os.pipe()
        pid = os.fork()
        if pid == 0:  # pragma: no cover - child: _fail ends the process
            os.dup2(write_err, 2)
            archive.extract_stream(source, str(tmp_path / "dest"))
            os._exit(0)
        os.close(write_err)
        _, status = os.waitpid(pid, 0)
        message = os.read(read_err, 4096).decode()
        os.close(read_err)
        os.close(source)
        assert os.waitstatus_to_exitcode(status) == 1
        assert message == f"refusing archive entry {name!r}: outside the destination"
    assert not (tmp_path / "escape").exists() and not Path("/abs").exists()


def test_a_truncated_file_is_an_error(tmp_path: Path) -> None:
    data = _sample_tar()
    cut = data.index(b"long\n") - 1024 * 1024  # inside the 3 MiB file's data
    with pytest.raises(tarfile.ReadError, match="unexpected end of data"):
        _extract(data[:cut], tmp_path)


def test_an_oversized_header_is_refused_not_read_into_memory(tmp_path: Path) -> None:
    """A PAX header claiming more than 1 MiB (Go's archive/tar, i.e. Docker, refuses the
    same): the old stream mode read the whole claimed size into the guest's memory."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        info = tarfile.TarInfo("f")
        info.pax_headers = {"comment": "c" * (2 * 1024 * 1024)}
        tar.addfile(info)
    with pytest.raises(tarfile.ReadError, match="over the 1048576 byte limit"):
        _extract(buffer.getvalue(), tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_pipe_source_seeks_forward_only() -> None:
    source = tarpipe.PipeSource(_feed(b"0123456789"))
    assert source.read(3) == b"012" and source.tell() == 3
    assert source.seek(7) == 7 and source.read(10) == b"789"
    with pytest.raises(tarfile.StreamError):
        source.seek(2)


def test_file_data_falls_back_to_copying_when_splice_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def refuse(*_: object) -> int:
        raise OSError(errno.EINVAL, "no splice here")

    monkeypatch.setattr(os, "splice", refuse)
    data = _sample_tar()
    _extract(data, tmp_path / "in")
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        big = tar.extractfile("top/f6")
        assert big is not None
        assert (tmp_path / "in" / "top" / "f6").read_bytes() == big.read()
    produced = _drain(lambda out: archive.write_archive(str(tmp_path / "in" / "top"), out))
    with tarfile.open(fileobj=io.BytesIO(produced)) as tar:
        copied = tar.extractfile("top/f6")
        assert copied is not None
        assert copied.read() == (tmp_path / "in" / "top" / "f6").read_bytes()


def _old_archive(path: str) -> bytes:
    """The tar the guest sent before (tarfile.add through a plain write mode)."""
    buffer = io.BytesIO()
    name = os.path.basename(path.rstrip("/")) or "."
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        tar.add(path, arcname=name, recursive=True)
    return buffer.getvalue()


def test_archive_out_is_byte_for_byte_what_tarfile_writes(tmp_path: Path) -> None:
    _extract(_sample_tar(), tmp_path)
    (tmp_path / "top" / "empty").mkdir()
    os.mkfifo(tmp_path / "top" / "fifo")
    for path in (tmp_path / "top", tmp_path / "top" / "f6", tmp_path / "top" / "sym"):
        produced = _drain(lambda out, p=path: archive.write_archive(str(p), out))  # type: ignore[misc]
        assert produced == _old_archive(str(path))


def test_a_file_that_shrinks_while_sent_is_an_error(tmp_path: Path) -> None:
    """The header promised the size lstat gave: fewer bytes is an error, never a tar
    whose next header is read from the middle of file data."""
    shrinking = tmp_path / "f"
    shrinking.write_bytes(b"x" * 100_000)
    small = tmp_path / "small"
    small.write_bytes(b"x" * 1000)
    null = os.open(os.devnull, os.O_WRONLY)
    sink = tarpipe.PipeSink(null, 1 << 20)
    try:
        with open(shrinking, "rb") as source, pytest.raises(OSError, match="unexpected end"):
            sink.send(source.fileno(), 200_000)  # spliced
        with open(small, "rb") as source, pytest.raises(OSError, match="unexpected end"):
            sink.send(source.fileno(), 5000)  # read into the buffer (a small file)
    finally:
        os.close(null)


def test_an_upload_reaches_the_guest_in_batches_of_a_mib() -> None:
    """The client's 64 KiB chunks (or the odd bytes a slow client sends) were each a frame,
    a guest wake-up and a pipe write; now the guest gets them a MiB at a time, in order."""
    from husk.runtime.archive import UPLOAD_BATCH, batched

    pieces = [os.urandom(size) for size in [1, 65536] * 40 + [7]]

    async def client() -> AsyncIterator[bytes]:
        for piece in pieces:
            yield piece

    async def gather() -> list[bytes]:
        return [chunk async for chunk in batched(client())]

    sent = asyncio.run(gather())
    assert b"".join(sent) == b"".join(pieces)
    assert all(len(chunk) >= UPLOAD_BATCH for chunk in sent[:-1])
    assert len(sent) == 3 and 0 < len(sent[-1]) < UPLOAD_BATCH
