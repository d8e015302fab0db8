"""The streaming fast path: a local Zarr store's chunk files read directly, without Zarr's per-chunk pipeline.

A block of one array is one chunk file, ``<store>/<array>/c/<block>/0/...``. For the codec chains vlcache
writes (``bytes`` little-endian, then nothing / ``zstd`` / ``blosc``, then ``crc32c``) this module reads it
the way a memory-mapped ``.npy`` is read:

* uncompressed chunks (schema v2 float16 features) are **memory-mapped** once per process (the mapping is
  kept, :mod:`.mapped`) and handed out as a read-only array over the mapping: no decode, no copy until
  rows are gathered into a batch;
* compressed chunks (masks, boxes, strings' neighbours, v1 features) are read whole and decompressed
  with numcodecs, Zarr's own codec library.

Every chunk's crc32c (hardware, ~30 GB/s here) is checked before its rows are used. With
``verify="once"`` (what the streaming reader uses) a chunk file is checked once per process: a process
remembers each file it checked by (inode, size, modification time), so a file rewritten since is checked
again; a byte flipped in place within the same clock tick as the check would not be, which is why
``vlcache store verify`` never uses this module. Anything else (strings, missing chunk files, other
codecs, remote stores) returns ``None`` and the caller reads through Zarr.

Zarr replaces a chunk file atomically (a new file renamed over the old), so a mapped chunk never changes
under a reader, and the new file is checked again (new inode).
"""

from __future__ import annotations

import os
import sys
import threading

import crc32c
import numpy as np
from numcodecs import Blosc, Zstd
from zarr.codecs import BloscCodec, BytesCodec, Crc32cCodec, ZstdCodec

from .base import chunk_index, is_local, local_path, redact_url
from .errors import CorruptChunkError
from .mapped import MAPS, file_identity, map_range
from .schema import STR

_DECOMPRESSORS = {ZstdCodec: Zstd, BloscCodec: Blosc}

# Files this process has checked: path -> (inode, size, mtime_ns). Shared by every reader in the process.
_checked: dict[str, tuple[int, int, int]] = {}
_checked_lock = threading.Lock()


def readahead_ranges(file: str, ranges) -> None:
    """Like :func:`readahead` for byte ranges ``(offset, nbytes)`` of one file (chunks inside an HDF5 file)."""
    if not hasattr(os, "posix_fadvise"):
        return
    try:
        fd = os.open(file, os.O_RDONLY)
    except OSError:
        return
    try:
        for offset, nbytes in ranges:
            os.posix_fadvise(fd, int(offset), int(nbytes), os.POSIX_FADV_WILLNEED)
    finally:
        os.close(fd)


def readahead(files) -> None:
    """Ask the kernel to read ``files`` into the page cache in the background (``POSIX_FADV_WILLNEED``; a
    no-op for cached pages and missing files). On a cold cache their reads are then in flight together,
    and overlap with the work on the blocks before them."""
    if not hasattr(os, "posix_fadvise"):
        return
    for file in files:
        try:
            fd = os.open(file, os.O_RDONLY)
        except OSError:
            continue
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_WILLNEED)
        finally:
            os.close(fd)


class ChunkPlan:
    """How to decode one array's chunks: element type, full chunk shape, decompressor (or none)."""

    def __init__(self, dtype: np.dtype, chunk_shape: tuple[int, ...], decompressor):
        self.dtype = dtype
        self.chunk_shape = chunk_shape
        self.decompressor = decompressor
        self.nbytes = int(np.prod(chunk_shape)) * dtype.itemsize


def plan_for(array, spec) -> ChunkPlan | None:
    """A :class:`ChunkPlan` for a ``zarr.Array`` whose codecs this module reads, else None."""
    if spec.dtype == STR:
        return None
    codecs = list(array.metadata.codecs)
    if len(codecs) not in (2, 3) or not isinstance(codecs[0], BytesCodec) or not isinstance(codecs[-1], Crc32cCodec):
        return None
    dtype = np.dtype(spec.dtype)
    if dtype.itemsize > 1 and (sys.byteorder != "little" or str(getattr(codecs[0].endian, "value", "")) != "little"):
        return None
    decompressor = None
    if len(codecs) == 3:
        kind = _DECOMPRESSORS.get(type(codecs[1]))
        if kind is None:
            return None
        decompressor = kind()
    return ChunkPlan(dtype, tuple(array.metadata.chunks), decompressor)


class ChunkFiles:
    """Direct reads of one local Zarr store's blocks (see the module docstring).

    ``plans``: array path -> :class:`ChunkPlan` (arrays without one are not read here).
    ``verify``: ``"once"`` per chunk file per process, or ``"always"``.
    """

    def __init__(self, backend, plans: dict[str, ChunkPlan], verify: str = "once"):
        if verify not in ("once", "always"):
            raise ValueError(f"verify must be 'once' or 'always', got {verify!r}")
        self.backend = backend
        self.root = local_path(backend.url)
        self.plans = plans
        self.verify = verify

    @classmethod
    def for_backend(cls, backend, paths, verify: str = "once") -> "ChunkFiles | None":
        """Chunk-file reader for ``paths`` of a local, read-only Zarr backend; None for any other store."""
        if backend.kind != "zarr" or backend.mode != "r" or not is_local(backend.url):
            return None
        plans = {}
        for p in paths:
            plan = plan_for(backend._array(p), backend.spec(p))
            if plan is not None:
                plans[p] = plan
        return cls(backend, plans, verify) if plans else None

    def maps(self, path: str) -> bool:
        """Whether the chunks of ``path`` are memory-mapped (uncompressed), not decoded."""
        plan = self.plans.get(path)
        return plan is not None and plan.decompressor is None

    def read_block(self, path: str, block: int) -> np.ndarray | None:
        """Rows of ``block`` of ``path`` (read-only), or None when this module does not read them."""
        plan = self.plans.get(path)
        if plan is None:
            return None
        file = os.path.join(self.root, self.backend.chunk_key(path, block))
        data = self._mapped(plan, path, block, file) if plan.decompressor is None else self._decoded(plan, path, block, file)
        if data is None:
            return None  # never written: Zarr gives the fill value
        rows = self.backend.layout.block_rows(block)
        return data.reshape(plan.chunk_shape)[: len(rows)]

    def _mapped(self, plan, path, block, file) -> np.ndarray | None:
        if self.verify == "once":  # a kept mapping of this very file version was checked when it was made
            try:
                kept = MAPS.get(file, 0, file_identity(os.stat(file)))
            except FileNotFoundError:
                return None
            if kept is not None:
                return kept[:-4].view(plan.dtype)
        try:
            fd = os.open(file, os.O_RDONLY)
        except FileNotFoundError:
            return None
        try:
            st = os.fstat(fd)
            if st.st_size != plan.nbytes + 4:
                raise self._damaged(path, block, f"has {st.st_size} bytes, expected {plan.nbytes + 4}")
            raw = map_range(fd, 0, st.st_size, np.dtype(np.uint8))
        finally:
            os.close(fd)  # the mapping stays valid
        identity = file_identity(st)
        if self.verify == "always" or _checked.get(file) != identity:
            self._check(raw[:-4], bytes(raw[-4:]), path, block)
            with _checked_lock:
                _checked[file] = identity
        MAPS.keep(file, 0, identity, raw)
        return raw[:-4].view(plan.dtype)

    def _decoded(self, plan, path, block, file) -> np.ndarray | None:
        try:
            with open(file, "rb", buffering=0) as f:
                raw = f.read()
        except FileNotFoundError:
            return None
        if len(raw) < 4:
            raise self._damaged(path, block, f"has {len(raw)} bytes, too short to hold its checksum")
        view = memoryview(raw)
        self._check(view[:-4], view[-4:], path, block)
        try:
            out = np.frombuffer(plan.decompressor.decode(view[:-4]), dtype=np.uint8)
        except Exception as e:  # noqa: BLE001 - any decoder failure is chunk damage
            raise self._damaged(path, block, f"could not be decoded ({type(e).__name__}: {e})") from e
        if out.size != plan.nbytes:
            raise self._damaged(path, block, f"decodes to {out.size} bytes, expected {plan.nbytes}")
        return out.view(plan.dtype)

    def _check(self, body, stored, path, block) -> None:
        if crc32c.crc32c(body) != int.from_bytes(stored, "little"):
            raise self._damaged(path, block, "failed its checksum (crc32c)")

    def _damaged(self, path, block, reason) -> CorruptChunkError:
        ndim = len(self.backend.spec(path).row_shape)
        return CorruptChunkError(redact_url(self.backend.url), path, chunk_index(ndim, block), reason)
