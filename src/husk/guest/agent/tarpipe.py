"""tarfile over the archive child's pipes, with file data moved by the kernel.

Under TCG every guest instruction is emulated, so what a copy costs is the number of
times Python touches each byte. tarfile's stream mode reads its source into a buffer,
joins and slices it per read (two copies) and copies file data through ``read`` and
``write`` (two more). Here the archive's headers still go through tarfile (its parsing,
its checks, its extraction rules, unchanged), but a regular file's data goes
straight from the stdin pipe into the file with splice(2) (``husk cp`` into the
container) and from the file into the stdout pipe with splice(2) (out of it): the
kernel moves the pages, no Python loop turn per block.

Only the standard library: this runs in the guest.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import tarfile
import typing

HEADER_LIMIT = 1024 * 1024
"""The most one read of the archive's headers may ask for (a PAX or GNU long-name
header); Go's archive/tar, which Docker uses, refuses such headers over 1 MiB too.
Reads of file data (tarfile's sparse files) are in COPY_BLOCK pieces, within it."""
READ_AHEAD = 64 * 1024
"""What a header read takes from the pipe at once: the small files that follow a
header come with it, a big file's data is mostly left in the pipe for splice."""
INLINE_LIMIT = 64 * 1024
"""Files up to this size are read into the output buffer rather than spliced: a tree of
many small files then costs a write per MiB of them, not a flush and a splice each."""
SPLICE_MAX = 1 << 30
PIPE_SIZE = 1024 * 1024
"""The archive child's pipes are widened to this (pipe-max-size's default, allowed
without privileges): the agent hands over up to a MiB per wake-up, not 64 KiB."""
_NO_SPLICE = frozenset({errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EXDEV})

COMPRESSED_MAGIC = (b"\x1f\x8b\x08", b"BZh91", b"\x5d\x00\x00\x80", b"\xfd7zXZ")
"""The prefixes tarfile's ``r|*`` mode takes for gzip, bzip2 and the two lzma forms: such
a stream goes through tarfile's own decompressing stream as before."""


def widen_pipe(fd: int) -> None:
    """Best effort: a pipe refused a bigger size (a lowered pipe-max-size) stays as it is."""
    with contextlib.suppress(OSError):
        if fcntl.fcntl(fd, fcntl.F_GETPIPE_SZ) < PIPE_SIZE:
            fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, PIPE_SIZE)


def write_all(fd: int, data: bytes | bytearray | memoryview) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


class PipeSource:
    """A pipe as the seekable-forward file tarfile's read mode expects.

    ``seek`` only moves forward (it reads and drops), as tarfile's own stream does;
    ``copy_into`` hands the next bytes to a file descriptor without Python copying them.
    """

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._buffer = bytearray()
        self._position = 0  # of the first byte in _buffer

    def peek(self, size: int) -> bytes:
        """Up to ``size`` bytes that ``read`` will return next (fewer only at the end)."""
        self._fill(size)
        return bytes(self._buffer[:size])

    def _fill(self, size: int) -> None:
        while len(self._buffer) < size:
            chunk = os.read(self._fd, max(size - len(self._buffer), READ_AHEAD))
            if not chunk:
                return
            self._buffer += chunk

    def read(self, size: int = -1) -> bytes:
        if size is None or size < 0 or size > HEADER_LIMIT:
            raise tarfile.ReadError(
                f"an archive header of {size} bytes is over the {HEADER_LIMIT} byte limit"
            )
        self._fill(size)
        data = bytes(self._buffer[:size])
        del self._buffer[:size]
        self._position += len(data)
        return data

    def tell(self) -> int:
        return self._position

    def seek(self, position: int, whence: int = os.SEEK_SET) -> int:
        if whence == os.SEEK_CUR:
            position += self._position
        elif whence != os.SEEK_SET:
            raise tarfile.StreamError("seeking from the end is not allowed")
        if position < self._position:
            raise tarfile.StreamError("seeking backwards is not allowed")
        while self._position < position:
            dropped = self.read(min(position - self._position, HEADER_LIMIT))
            if not dropped:
                break  # at the end: tarfile notices when it reads the next header
        return self._position

    def copy_into(self, target: int, size: int) -> None:
        """Writes the next ``size`` bytes to ``target``: what is buffered, then by splice.

        Short input is tarfile's "unexpected end of data" (a ReadError), as its own copy.
        """
        buffered = min(len(self._buffer), size)
        if buffered:
            write_all(target, memoryview(self._buffer)[:buffered])
            del self._buffer[:buffered]
            self._position += buffered
        remaining = size - buffered
        splicing = True
        while remaining:
            if splicing:
                try:
                    moved = os.splice(self._fd, target, min(remaining, SPLICE_MAX))
                except OSError as exc:
                    if exc.errno not in _NO_SPLICE:
                        raise
                    splicing = False  # a target that takes no splice: copy instead
                    continue
            else:
                data = os.read(self._fd, min(remaining, HEADER_LIMIT))
                write_all(target, data)
                moved = len(data)
            if not moved:
                raise tarfile.ReadError("unexpected end of data")
            remaining -= moved
            self._position += moved


class SplicingReader(tarfile.TarFile):
    """tarfile's read side whose regular files' data is spliced in (see PipeSource)."""

    fileobj: typing.Any

    def makefile(self, tarinfo: tarfile.TarInfo, targetpath: typing.Any) -> None:
        if tarinfo.sparse is not None or not isinstance(self.fileobj, PipeSource):
            super().makefile(tarinfo, targetpath)  # type: ignore[misc]
            return
        self.fileobj.seek(tarinfo.offset_data)
        # The flags of tarfile's own open(targetpath, "wb"): a link there is followed,
        # within the container root this child is confined to, exactly as before.
        fd = os.open(targetpath, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o666)
        try:
            self.fileobj.copy_into(fd, tarinfo.size)
        finally:
            os.close(fd)


class PipeSink:
    """A pipe as tarfile's write mode sees a file, that can also splice a file's data in."""

    def __init__(self, fd: int, buffering: int) -> None:
        self._fd = fd
        self._buffer = bytearray()
        self._limit = buffering
        self._position = 0

    def write(self, data: bytes | bytearray) -> int:
        self._buffer += data
        self._position += len(data)
        if len(self._buffer) >= self._limit:
            self.flush()
        return len(data)

    def flush(self) -> None:
        if self._buffer:
            write_all(self._fd, self._buffer)
            self._buffer.clear()

    def tell(self) -> int:
        return self._position

    def send(self, source: int, size: int) -> None:
        """Appends the next ``size`` bytes of ``source`` (a regular file) to the stream.

        A file that ends early is tarfile's "unexpected end of data" (an OSError), as
        its own copy: the header already promised ``size`` bytes.
        """
        if size <= INLINE_LIMIT:  # a small file rides in the buffer with its neighbours
            small = bytearray()
            while len(small) < size:
                chunk = os.read(source, size - len(small))
                if not chunk:
                    raise OSError("unexpected end of data")
                small += chunk
            self.write(small)
            return
        self.flush()
        remaining = size
        splicing = True
        while remaining:
            if splicing:
                try:
                    moved = os.splice(source, self._fd, min(remaining, SPLICE_MAX))
                except OSError as exc:
                    if exc.errno not in _NO_SPLICE:
                        raise
                    splicing = False  # e.g. a file system without splice_read
                    continue
            else:
                data = os.read(source, min(remaining, HEADER_LIMIT))
                write_all(self._fd, data)
                moved = len(data)
            if not moved:
                raise OSError("unexpected end of data")
            remaining -= moved
            self._position += moved


class SplicingWriter(tarfile.TarFile):
    """tarfile's write side whose regular files' data is spliced out (see PipeSink)."""

    fileobj: typing.Any

    def addfile(self, tarinfo: tarfile.TarInfo, fileobj: typing.Any = None) -> None:
        sink = self.fileobj
        if fileobj is None or not isinstance(sink, PipeSink) or not tarinfo.isreg():
            super().addfile(tarinfo, fileobj)
            return
        super().addfile(tarinfo)  # the header only; the data and padding follow
        sink.send(fileobj.fileno(), tarinfo.size)
        blocks, remainder = divmod(tarinfo.size, tarfile.BLOCKSIZE)
        if remainder:
            sink.write(tarfile.NUL * (tarfile.BLOCKSIZE - remainder))
            blocks += 1
        self.offset += blocks * tarfile.BLOCKSIZE
