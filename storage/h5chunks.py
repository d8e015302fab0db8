"""The streaming fast path for a local HDF5 store: raw chunks memory-mapped from the ``.h5`` file.

h5py reads a chunk through HDF5's filter pipeline on every read: a ``pread`` into a buffer, ``fletcher32``
over it, then a copy into the output array (most of an HDF5 store's read time in a profile of
``bench/stream.py``). For chunks whose only filter is ``fletcher32`` (the float16 features since schema
v2) this module reads each block the *first* time in a process through h5py -- so HDF5 itself checks its
checksum -- and from then on memory-maps the chunk's bytes inside the file (offset and size from HDF5's
chunk index, :class:`H5ChunkIndex`; the mapping is kept for the process, :mod:`.mapped`): later reads in
that process are a mapping, with neither a checksum pass nor a copy, like the Zarr fast path (:mod:`.chunks`). Compressed chunks (boxes, masks, flags) always
go through h5py.

A chunk counts as checked by (inode, size, modification time, offset) of the file: vlcache writes an HDF5
store to a temporary file and renames it into place, so a rewritten store is a new inode and is checked
again. The index is built once, in the process that creates the reader, and travels to DataLoader workers
by pickling; a worker whose file is no longer the indexed one reads everything through h5py.
"""

from __future__ import annotations

import os
import threading

import h5py
import numpy as np

from .base import is_local, local_path
from .chunks import readahead_ranges
from .mapped import MAPS, file_identity, map_range
from .schema import STR

# Chunks this process has read through h5py: (inode, size, mtime_ns, byte offset).
_checked: set[tuple[int, int, int, int]] = set()
_checked_lock = threading.Lock()


class H5ArrayChunks:
    """One array's chunks in the file: element type, chunk shape, and per block (offset, stored bytes);
    offset -1 where a block has no chunk (never written: h5py gives the fill value)."""

    def __init__(self, dtype: np.dtype, chunk_shape: tuple[int, ...], offsets: np.ndarray, sizes: np.ndarray):
        self.dtype, self.chunk_shape = dtype, chunk_shape
        self.offsets, self.sizes = offsets, sizes
        self.nbytes = int(np.prod(chunk_shape)) * dtype.itemsize


def _mappable(ds: h5py.Dataset, block_size: int) -> bool:
    """Raw chunks of one block each, checksummed by fletcher32 and nothing else, little-endian numbers."""
    plist = ds.id.get_create_plist()
    filters = [plist.get_filter(i)[0] for i in range(plist.get_nfilters())]
    return (filters == [h5py.h5z.FILTER_FLETCHER32] and ds.chunks is not None
            and ds.chunks == (block_size, *ds.shape[1:]) and ds.dtype.kind in "iuf"
            and ds.dtype.byteorder in ("<", "=", "|") and np.little_endian)


class H5ChunkIndex:
    """Where each mappable array's chunks lie in a local HDF5 store (picklable; built once per reader)."""

    def __init__(self, file: str, identity: tuple[int, int, int], arrays: dict[str, H5ArrayChunks]):
        self.file, self.identity, self.arrays = file, identity, arrays

    @classmethod
    def build(cls, backend, paths) -> "H5ChunkIndex | None":
        """The index of ``paths`` of a local, read-only HDF5 backend; None for any other store or when
        no array qualifies."""
        if backend.kind != "hdf5" or backend.mode != "r" or not is_local(backend.url):
            return None
        backend._ensure_open()
        h5 = backend._file
        lay = backend.layout
        arrays = {}
        for path in paths:
            if not backend.has(path) or backend.spec(path).dtype == STR:
                continue
            ds = backend._ds(path)
            if not _mappable(ds, lay.block_size):
                continue
            offsets = np.full(lay.num_blocks, -1, np.int64)
            sizes = np.zeros(lay.num_blocks, np.int64)
            for b in range(lay.num_blocks):
                info = ds.id.get_chunk_info_by_coord((b * lay.block_size,) + (0,) * (ds.ndim - 1))
                if info.byte_offset is not None and info.filter_mask == 0:
                    offsets[b], sizes[b] = info.byte_offset, info.size
            arrays[path] = H5ArrayChunks(np.dtype(ds.dtype), tuple(ds.chunks), offsets, sizes)
        if not arrays:
            return None
        return cls(local_path(backend.url), file_identity(os.fstat(h5.id.get_vfd_handle())), arrays)

    def readahead(self, blocks) -> None:
        """Start reading ``blocks`` of every indexed array into the page cache."""
        readahead_ranges(self.file, [(a.offsets[b], a.sizes[b]) for a in self.arrays.values()
                                     for b in blocks if 0 <= b < a.offsets.size and a.offsets[b] >= 0])


class H5ChunkFiles:
    """Per-process reads of an indexed HDF5 store's blocks (see the module docstring)."""

    def __init__(self, backend, index: H5ChunkIndex, fd: int):
        self.backend, self.index, self.fd = backend, index, fd
        self.plans = index.arrays

    @classmethod
    def open(cls, backend, index: H5ChunkIndex | None) -> "H5ChunkFiles | None":
        """Reads through ``index`` when ``backend``'s open file is the indexed one, else None."""
        if index is None or backend.kind != "hdf5":
            return None
        backend._ensure_open()
        # our own descriptor of the very file h5py reads (and checks) for us, valid after h5py closes it
        fd = os.dup(backend._file.id.get_vfd_handle())
        if file_identity(os.fstat(fd)) != index.identity:
            os.close(fd)
            return None
        return cls(backend, index, fd)

    def __del__(self, _close=os.close):  # bound early: os may be gone at interpreter exit
        try:
            _close(self.fd)  # mappings made from it stay valid
        except OSError:
            pass

    def maps(self, path: str) -> bool:
        """Whether the chunks of ``path`` are memory-mapped (after their first, checked read)."""
        return path in self.plans

    def read_block(self, path: str, block: int) -> np.ndarray | None:
        """Rows of ``block`` of ``path`` (read-only), or None when this module does not read them."""
        chunks = self.plans.get(path)
        if chunks is None or not 0 <= block < chunks.offsets.size or chunks.offsets[block] < 0:
            return None
        offset, size = int(chunks.offsets[block]), int(chunks.sizes[block])
        if size != chunks.nbytes + 4:  # not a raw chunk plus its checksum: let HDF5 read it
            return None
        key = (*self.index.identity, offset)
        if key not in _checked:
            data = self.backend.read_block(path, block)  # HDF5 checks fletcher32 (CorruptChunkError if bad)
            with _checked_lock:
                _checked.add(key)
            return data
        rows = self.backend.layout.block_rows(block)
        data = MAPS.get(self.index.file, offset, self.index.identity)  # mapped once per process (.mapped)
        if data is None:
            data = map_range(self.fd, offset, chunks.nbytes, chunks.dtype)
            MAPS.keep(self.index.file, offset, self.index.identity, data)
        return data.reshape(chunks.chunk_shape)[: len(rows)]
