"""Open a layer blob as its uncompressed tar stream, hashing it on the way.

The compression is taken from the blob's magic bytes, not only from its media
type, because registries and archives mislabel layers. The uncompressed digest
(the config's diff_id) is computed while the stream is read, so verifying it
costs no second pass.
"""

from __future__ import annotations

import hashlib
import io
import os
import queue
import threading
import zlib
from pathlib import Path
from typing import Any, BinaryIO, Protocol

import zstandard

from husk.errors import InvalidArgument, NotSupported

TAR_BLOCK = 512
READ_CHUNK = 1 << 20
"""Bytes read from a blob (and asked of a decompressor) at a time."""
READ_AHEAD_CHUNKS = 3
"""Decompressed chunks a layer's read-ahead thread may hold before its reader takes them."""

LAYER_MEDIA_TYPES = frozenset(
    {
        "",  # docker-archive layers carry no media type
        "application/vnd.oci.image.layer.v1.tar",
        "application/vnd.oci.image.layer.v1.tar+gzip",
        "application/vnd.oci.image.layer.v1.tar+zstd",
        "application/vnd.oci.image.layer.nondistributable.v1.tar",
        "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip",
        "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd",
        "application/vnd.docker.image.rootfs.diff.tar",
        "application/vnd.docker.image.rootfs.diff.tar.gzip",
        "application/vnd.docker.image.rootfs.diff.tar.zstd",
        "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip",
    }
)

_GZIP_MAGIC = b"\x1f\x8b"
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
_ZSTD_SKIPPABLE_MASK = 0xFFFFFFF0
_ZSTD_SKIPPABLE_MAGIC = 0x184D2A50
_FOREIGN_MAGICS = {b"BZh": "bzip2", b"\xfd7zXZ\x00": "xz", b"\x04\x22\x4d\x18": "lz4"}


class CorruptLayer(InvalidArgument):
    """A layer blob that cannot be decompressed or parsed (truncated, garbage)."""


class BudgetExceeded(Exception):
    """More uncompressed bytes than a :class:`ByteBudget` allowed: a limit of the reader's
    (where it stages the layers), not a fault of the layer."""


class ByteBudget:
    """Uncompressed bytes that several layer streams may still read between them."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.remaining = total

    def spend(self, count: int) -> None:
        self.remaining -= count
        if self.remaining < 0:
            raise BudgetExceeded(f"more than {self.total} bytes uncompressed")


class _Source(Protocol):
    def read(self, size: int, /) -> bytes: ...


class _GzipSource:
    """Streaming gzip (multi-member) decoder with bounded output per read.

    ``gzip.GzipFile`` reads in small pieces; this one reads the blob in large
    chunks and refuses a stream that ends before its end-of-member marker.
    """

    def __init__(self, raw: BinaryIO) -> None:
        self._raw = raw
        self._decoder = zlib.decompressobj(16 + zlib.MAX_WBITS)
        self._pending = b""
        self._done = False

    def read(self, size: int) -> bytes:
        while not self._done:
            if not self._pending:
                self._pending = self._raw.read(READ_CHUNK)
                if not self._pending:
                    if not self._decoder.eof:
                        raise CorruptLayer("gzip stream is truncated")
                    self._done = True
                    break
            if self._decoder.eof:
                if not self._pending.strip(b"\0"):
                    self._pending = b""  # zero padding after the last member
                    continue
                self._decoder = zlib.decompressobj(16 + zlib.MAX_WBITS)
            out = self._decoder.decompress(self._pending, size)
            self._pending = (
                self._decoder.unused_data if self._decoder.eof else self._decoder.unconsumed_tail
            )
            if out:
                return out
        return b""


class _ReadAhead:
    """Decompresses and hashes a layer in a thread, a few chunks ahead of its reader.

    zlib, zstandard and hashlib release the GIL on large buffers, so on a machine with
    two cores the decompression runs beside the (Python) tar parsing and extraction
    instead of between its steps. What the thread raises is handed to the reader.
    """

    def __init__(self, source: _Source, digest: Any) -> None:
        self._source = source
        self._digest = digest
        self._chunks: queue.Queue[bytes | BaseException] = queue.Queue(READ_AHEAD_CHUNKS)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="layer-read-ahead", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                data = self._source.read(READ_CHUNK)
                self._digest.update(data)
                self._put(data)
                if not data:
                    return
        except BaseException as err:  # handed to the reader, raised there
            self._put(err)

    def _put(self, item: bytes | BaseException) -> None:
        while not self._stop.is_set():
            try:
                self._chunks.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def next(self) -> bytes:
        """The next chunk (b"" at the end); raises what the thread met."""
        item = self._chunks.get()
        if isinstance(item, BaseException):
            raise item
        return item

    def close(self) -> None:
        self._stop.set()
        self._thread.join()


def check_zstd_frames(raw: BinaryIO, size: int) -> None:
    """Walk the frame and block headers of a zstd blob; refuse a truncated one.

    The zstandard streaming reader reports a cut-off frame as a clean end of
    data, so completeness is checked from the headers (a few bytes per 128 KiB
    block) before decompressing.
    """
    pos = 0
    while pos < size:
        raw.seek(pos)
        head = raw.read(4)
        if len(head) < 4:
            raise CorruptLayer("zstd stream is truncated")
        magic = int.from_bytes(head, "little")
        if magic & _ZSTD_SKIPPABLE_MASK == _ZSTD_SKIPPABLE_MAGIC:
            length = raw.read(4)
            if len(length) < 4:
                raise CorruptLayer("zstd stream is truncated")
            pos += 8 + int.from_bytes(length, "little")
            continue
        if head != _ZSTD_MAGIC:
            raise CorruptLayer(f"zstd stream has garbage at offset {pos}")
        descriptor_byte = raw.read(1)
        if not descriptor_byte:
            raise CorruptLayer("zstd stream is truncated")
        descriptor = descriptor_byte[0]
        if descriptor & 0x08:
            raise CorruptLayer(f"zstd frame at offset {pos} has a reserved bit set")
        single_segment = (descriptor >> 5) & 1
        header_size = (
            1
            + (0 if single_segment else 1)
            + (0, 1, 2, 4)[descriptor & 3]
            + (single_segment, 2, 4, 8)[descriptor >> 6]
        )
        pos += 4 + header_size
        while True:
            raw.seek(pos)
            block = raw.read(3)
            if len(block) < 3:
                raise CorruptLayer("zstd stream is truncated")
            value = int.from_bytes(block, "little")
            block_type = (value >> 1) & 3
            if block_type == 3:
                raise CorruptLayer(f"zstd stream has an invalid block at offset {pos}")
            pos += 3 + (1 if block_type == 1 else value >> 3)
            if value & 1:
                break
        if (descriptor >> 2) & 1:
            pos += 4
    if pos != size:
        raise CorruptLayer("zstd stream is truncated")


def detect_compression(head: bytes) -> str:
    """``gzip``, ``zstd`` or ``tar`` from a blob's first bytes."""
    if head.startswith(_GZIP_MAGIC):
        return "gzip"
    if head.startswith(_ZSTD_MAGIC):
        return "zstd"
    for magic, name in _FOREIGN_MAGICS.items():
        if head.startswith(magic):
            raise NotSupported(f"{name}-compressed layers are not supported (only gzip and zstd)")
    return "tar"


class LayerStream(io.RawIOBase):
    """The uncompressed tar bytes of one layer blob; :meth:`digest` hashes all read."""

    def __init__(
        self,
        path: Path,
        media_type: str,
        *,
        algorithm: str = "sha256",
        budget: ByteBudget | None = None,
    ) -> None:
        super().__init__()
        self._budget = budget
        if media_type not in LAYER_MEDIA_TYPES:
            raise NotSupported(f"layer media type {media_type!r} is not supported")
        if algorithm not in ("sha256", "sha512"):
            raise NotSupported(f"digest algorithm {algorithm!r} is not supported for diff_ids")
        self._algorithm = algorithm
        self._hash = hashlib.new(algorithm)
        self.size = 0
        """Uncompressed bytes read so far."""
        self._raw: BinaryIO = open(path, "rb")  # noqa: SIM115 - closed by close()
        try:
            self.compression = detect_compression(self._raw.read(8))
            self._raw.seek(0)
            self._ahead = _ReadAhead(self._open_source(), self._hash)
        except BaseException:
            self._raw.close()
            raise
        self._chunk = b""
        self._offset = 0
        self._ended: BaseException | None = None
        """Set once the thread delivered the end (an exception, or a StopIteration for
        the end of the data): every later read gives the same."""

    def _open_source(self) -> _Source:
        if self.compression == "gzip":
            return _GzipSource(self._raw)
        if self.compression == "zstd":
            check_zstd_frames(self._raw, os.fstat(self._raw.fileno()).st_size)
            self._raw.seek(0)
            reader: _Source = zstandard.ZstdDecompressor().stream_reader(
                self._raw, read_size=READ_CHUNK, read_across_frames=True, closefd=False
            )
            return reader
        return self._raw

    def readable(self) -> bool:
        return True

    def read(self, size: int | None = -1) -> bytes:
        if size is None or size < 0:
            size = READ_CHUNK
        if self._offset >= len(self._chunk):
            self._chunk, self._offset = self._next_chunk(), 0
        if self._offset == 0 and size >= len(self._chunk):
            data = self._chunk  # the whole chunk: no copy
        else:
            data = self._chunk[self._offset : self._offset + size]
        self._offset += len(data)
        self.size += len(data)
        if self._budget is not None:
            self._budget.spend(len(data))
        return data

    def _next_chunk(self) -> bytes:
        if isinstance(self._ended, StopIteration):
            return b""
        if self._ended is not None:
            raise self._ended
        try:
            data = self._ahead.next()
        except zlib.error as err:
            self._ended = CorruptLayer(f"gzip stream is corrupt: {err}")
        except zstandard.ZstdError as err:
            self._ended = CorruptLayer(f"zstd stream is corrupt: {err}")
        except BaseException as err:
            self._ended = err
        else:
            if not data:
                self._ended = StopIteration()
            return data
        raise self._ended

    def readinto(self, buffer: memoryview | bytearray) -> int:  # type: ignore[override]
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)

    def drain(self) -> None:
        """Read (and hash) whatever follows the tar's end-of-archive marker."""
        while self.read(READ_CHUNK):
            pass

    def check_whole_blocks(self) -> None:
        """Refuse a tar stream cut inside a header (after :meth:`drain`).

        tarfile takes a header cut short for the end of the archive; every tar
        stream is a whole number of 512-byte blocks, so a remainder means the
        layer was truncated (a cut inside an entry's data tarfile reports itself).
        """
        if self.size % TAR_BLOCK:
            raise CorruptLayer(
                f"tar stream is truncated: {self.size} bytes is not a whole number of "
                f"{TAR_BLOCK}-byte blocks"
            )

    def digest(self) -> str:
        return f"{self._algorithm}:{self._hash.hexdigest()}"

    def close(self) -> None:
        if not self.closed:
            self._ahead.close()  # before the blob it reads is closed
            self._raw.close()
        super().close()
