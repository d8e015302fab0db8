"""Reading a store's rows block by block, in the process that reads: the engine of the streaming datasets.

:class:`BlockReader` opens the store lazily in the process that reads (the process id is checked, so no
file handle crosses a DataLoader fork), keeps a small LRU of read blocks (``cache_blocks`` per array, so a
window's blocks are read once), and gathers a batch's rows block by block, one ``np.take`` per block and
array straight into the batch tensor. Local stores' chunks are read by :mod:`.chunks` (memory-mapped once
per process, :mod:`.mapped`; checksums checked once per process); everything else through the backend.
Batch tensors are reused: in the process that trains, :class:`BatchBuffers`; in DataLoader workers,
shared-memory slots the main process hands back (:mod:`.shared_batches`).
"""

from __future__ import annotations

import os
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
import torch
from torch.utils.data import get_worker_info

from .backends import HDF5_SUFFIXES, is_local, local_path, open_backend
from .chunks import ChunkFiles, readahead
from .errors import StoreError
from .h5chunks import H5ChunkFiles, H5ChunkIndex
from .schema import DONE, STR
from .shared_batches import SLOT_KEY, SharedBatchSlots, empty_tensor, torch_dtype
from .zarr_backend import chunk_key

__all__ = ["BatchBuffers", "BlockReader", "empty_tensor"]

SMALL_BLOCK_CACHE = 32 << 20  # bytes of small decoded blocks kept per array (see BlockReader._cache_limit)


class BlockReader:
    """Per-process lazy backend plus an LRU of decoded blocks; pickles without handle or cache."""

    def __init__(self, url, fields, storage_options=None, cache_blocks: int = 4, threads: int = 2,
                 direct: bool = True, pin_memory: bool = False):
        if not fields:
            raise ValueError("fields must name at least one store array, e.g. ['regions/feats']")
        self.url = os.fspath(url)
        self.fields = list(fields)
        self.storage_options = storage_options
        self.cache_blocks = max(1, int(cache_blocks))
        self.threads = max(1, int(threads))
        self.direct = bool(direct)
        self.buffers = BatchBuffers(pin=pin_memory)
        self.slots: SharedBatchSlots | None = None  # set by stream_loader for its DataLoader workers
        backend = open_backend(self.url, "r", storage_options=storage_options)  # validate now, in the parent
        try:
            missing = [f for f in self.fields if not backend.has(f)]
            if missing:
                raise StoreError(f"store {self.url} has no array(s) {missing}; arrays: {backend.arrays()}")
            self.block_size = backend.chunk_rows()
            self.num_rows = backend.layout.num_rows
            self.specs = {f: backend.spec(f) for f in self.fields}
            # local HDF5: where the raw chunks lie in the file, for mapping and readahead (storage/h5chunks.py)
            self.h5_index = H5ChunkIndex.build(backend, self.fields) if self.direct else None
        finally:
            backend.close()
        self._reset()
        self._ahead, self._ahead_pid = None, None  # the readahead thread, in the process that started it

    def _reset(self):
        self._backend, self._files, self._pid, self._cache, self._pool = None, None, None, {}, None
        self._block_bytes: dict[str, int] = {}  # path -> _decoded_bytes (depends on this process's _files)
        self._done_blocks: set[int] = set()  # blocks whose rows are all done (checked in this process)

    def __getstate__(self):
        state = self.__dict__.copy()
        state.update(_backend=None, _files=None, _pid=None, _cache={}, _block_bytes={}, _pool=None,
                     _done_blocks=set(), _ahead=None, _ahead_pid=None)
        return state

    def backend(self):
        if self._pid != os.getpid():  # first use in this process (or a forked copy): open our own handle
            self._reset()
            self._backend = open_backend(self.url, "r", storage_options=self.storage_options)
            if self.direct:  # local stores: chunks read directly (storage/chunks.py, storage/h5chunks.py)
                self._files = (ChunkFiles.for_backend(self._backend, [*self.fields, DONE])
                               or H5ChunkFiles.open(self._backend, self.h5_index))
            self._pid = os.getpid()
        return self._backend

    def readahead(self, blocks) -> Future | None:
        """Start reading ``blocks`` of every field into the page cache (local stores; any process: the
        sampler calls it from the main process for the blocks DataLoader workers will read next).

        Returns at once: the kernel is asked from a background thread (asking costs a page-cache walk per
        chunk even when the pages are cached, time the loop should not wait for); the future says when."""
        if not self.direct or not is_local(self.url):
            return None
        if self._ahead_pid != os.getpid():
            self._ahead = ThreadPoolExecutor(1, thread_name_prefix="vlcache-readahead")
            self._ahead_pid = os.getpid()
        return self._ahead.submit(self._readahead_now, list(blocks))

    def _readahead_now(self, blocks) -> None:
        if self.h5_index is not None:
            self.h5_index.readahead(blocks)  # HDF5: the mapped arrays' chunk ranges (the rest are small)
        if self.url.rstrip("/").lower().endswith(HDF5_SUFFIXES):
            return
        root = local_path(self.url)
        readahead(os.path.join(root, chunk_key(f, b, len(spec.row_shape)))
                  for b in blocks for f, spec in self.specs.items() if spec.dtype != STR)

    def _load(self, path: str, b: int) -> np.ndarray:
        """Block ``b`` of ``path``: from its chunk file when the fast path reads it, else through the backend."""
        data = self._files.read_block(path, b) if self._files is not None else None
        return self._backend.read_block(path, b) if data is None else data

    def _decoded_bytes(self, path: str) -> int:
        """Bytes of one block of ``path`` that this process decodes on every read; 0 for blocks it maps
        (nothing to decode), strings and the done flags. Once per array and process (``_files`` is per process)."""
        got = self._block_bytes.get(path)
        if got is None:
            spec = self.specs.get(path)
            mapped = self._files is not None and self._files.maps(path)
            got = 0 if spec is None or spec.dtype == STR or mapped else \
                np.dtype(spec.dtype).itemsize * int(np.prod(spec.row_shape)) * self.block_size
            self._block_bytes[path] = got
        return got

    def _worth_threads(self, path: str) -> bool:
        """Whether reading ``path``'s blocks on threads pays: only where there is real decoding to overlap.
        A mapped chunk is one mmap call, and mapping calls serialise on the process's memory map; a small
        chunk (boxes, counts, flags) decodes in less time than a thread handoff takes (in a profile of
        bench/stream.py, threads made both slower)."""
        return self._decoded_bytes(path) >= 1 << 20

    def block(self, path: str, b: int) -> np.ndarray:
        return self.blocks(path, [b])[b]

    def blocks(self, path: str, wanted: list[int]) -> dict[int, np.ndarray]:
        """Decoded blocks of ``path``; the missing ones are read concurrently where that pays (Zarr's codecs
        release the GIL, so a new window's large compressed blocks decode on several cores)."""
        cache = self._cache.setdefault(path, OrderedDict())
        out, missing = {}, []
        for b in wanted:
            hit = cache.get(b)
            if hit is None:
                missing.append(b)
            else:
                cache.move_to_end(b)
                out[b] = hit
        backend = self.backend()
        if len(missing) > 1 and self.threads > 1 and backend.kind == "zarr" and self._worth_threads(path):
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="vlcache-read")
            loaded = list(self._pool.map(lambda b: self._load(path, b), missing))
        else:
            loaded = [self._load(path, b) for b in missing]
        limit = self._cache_limit(path)
        for b, data in zip(missing, loaded):
            data.flags.writeable = False  # handed out as views: a caller's write must not poison the cache
            cache[b] = out[b] = data
            while len(cache) > limit:
                cache.popitem(last=False)
        return out

    def _cache_limit(self, path: str) -> int:
        """Blocks of ``path`` kept: a window's worth (``cache_blocks``), or for small arrays that are decoded
        on every read (boxes, counts, flags: HDF5 reads them through h5py, a quarter of a read's time in a
        profile) as many as fit in ``SMALL_BLOCK_CACHE`` bytes -- bounded, whatever the dataset's size."""
        nbytes = self._decoded_bytes(path)
        return max(self.cache_blocks, SMALL_BLOCK_CACHE // nbytes) if nbytes else self.cache_blocks

    def check_done(self, rows: np.ndarray, blocks: np.ndarray, cuts: np.ndarray) -> None:
        """Every row is extracted (``rows`` grouped by block: ``blocks[cuts[i]:cuts[i+1]]`` is one block)."""
        for s0, s1 in zip(cuts[:-1].tolist(), cuts[1:].tolist()):
            b = int(blocks[s0])
            if b in self._done_blocks:
                continue
            flags = self.block(DONE, b)
            if flags.all():  # a done row stays done: the block needs no more checks in this process
                self._done_blocks.add(b)
                continue
            sel = rows[s0:s1]
            bad = sel[flags[sel - b * self.block_size] == 0]
            if bad.size:
                raise StoreError(f"store {self.url}: row {int(bad[0])} is not extracted yet (images/done is 0)")

    def gather(self, rows: np.ndarray) -> tuple[np.ndarray, dict]:
        """Rows of every field, regrouped by block (stable): returns (rows in output order, arrays).

        Grouping lets each block's rows be copied with one ``np.take`` straight into a contiguous slice
        of the batch array: one copy per field, no per-row work. Numeric fields come back as tensors;
        inside a DataLoader worker they are allocated in shared memory, so sending the batch to the main
        process copies nothing more (the same trick as torch's default collate).
        """
        if rows.size and (rows.min() < 0 or rows.max() >= self.num_rows):
            raise IndexError(f"store {self.url}: row index out of range [0, {self.num_rows})")
        rows = rows[np.argsort(rows // self.block_size, kind="stable")]
        blocks = rows // self.block_size
        cuts = np.flatnonzero(np.r_[True, blocks[1:] != blocks[:-1], True]) if rows.size else np.zeros(1, int)
        self.check_done(rows, blocks, cuts)
        worker = get_worker_info()
        # in a worker: shared memory (sent to the main process without a copy), in a reused slot when one is
        # free (storage/shared_batches.py); in the main process: a reused buffer
        slot = self.slots.acquire(worker.id) if worker is not None and self.slots is not None else None
        try:
            out = self._fill(rows, blocks, cuts, worker is not None, slot)
        except BaseException:
            if slot is not None:
                self.slots.release(slot)
            raise
        if slot is not None:
            out[SLOT_KEY] = slot
        return rows, out

    def _fill(self, rows, blocks, cuts, shared: bool, slot: int | None) -> dict:
        out = {}
        for f, spec in self.specs.items():
            shape = (rows.size, *spec.row_shape)
            if spec.dtype == STR:
                tensor, arr = None, np.empty(shape, dtype=object)
            else:
                dtype = np.dtype(spec.dtype)
                if slot is not None:
                    tensor = self.slots.tensor(slot, f, shape, dtype)
                else:
                    tensor = empty_tensor(shape, dtype, True) if shared else self.buffers.get(f, shape, dtype)
                arr = tensor.numpy()
            data = self.blocks(f, blocks[cuts[:-1]].tolist())
            for s0, s1 in zip(cuts[:-1].tolist(), cuts[1:].tolist()):
                b = int(blocks[s0])
                # mode="clip": the rows are in range (checked above); the default "raise" makes numpy copy
                # into a temporary and then into `out`, twice the copying (half a read's time in a profile)
                src, dst = data[b], arr[s0:s1]
                if not src.flags.aligned:  # a chunk at an odd offset in an HDF5 file: numpy would copy it
                    src, dst = _as_bytes(src), _as_bytes(dst)  # whole first; row bytes copy the same
                np.take(src, rows[s0:s1] - b * self.block_size, axis=0, out=dst, mode="clip")
            out[f] = arr if tensor is None else tensor
        return out


class BatchBuffers:
    """Batch tensors reused across batches, for reading in the process that trains (no DataLoader workers).

    A fresh batch tensor costs a page fault per 4 KiB page on its first write, as much as copying the rows
    into it. A batch is handed out as a view of a pooled buffer, and a buffer is reused only once nothing
    else holds its storage -- no batch, view or array of it is alive anywhere -- so reuse never overwrites
    data a caller still has. ``per_field`` buffers at most per field (a training loop holds one batch while
    the next is built; more in flight get fresh tensors): memory stays O(batch). ``pin``: page-locked
    buffers (when CUDA is available), so ``DataLoader(pin_memory=True)`` has nothing left to copy.
    """

    def __init__(self, per_field: int = 3, pin: bool = False):
        self.per_field, self.pin = int(per_field), bool(pin)
        self._pool: dict[str, list[tuple[torch.Tensor, int]]] = {}

    def __getstate__(self):
        return {"per_field": self.per_field, "pin": self.pin, "_pool": {}}

    def get(self, field: str, shape: tuple, dtype: np.dtype) -> torch.Tensor:
        tdtype = torch_dtype(dtype)
        pool = self._pool.setdefault(field, [])
        for buf, idle in pool:
            if buf.dtype == tdtype and buf.shape[1:] == shape[1:] and buf.shape[0] >= shape[0] \
                    and _storage_refs(buf) == idle:
                return buf[: shape[0]]
        pin = self.pin and torch.cuda.is_available()
        buf = torch.empty(shape, dtype=tdtype, pin_memory=pin)
        if len(pool) < self.per_field:
            pool.append((buf, _storage_refs(buf)))  # its count while only the pool holds it
        return buf[: shape[0]]


def _as_bytes(a: np.ndarray) -> np.ndarray:
    """A C-contiguous array as (rows, bytes per row) uint8, no copy."""
    return a.reshape(a.shape[0], -1).view(np.uint8)


def _storage_refs(t: torch.Tensor) -> int:
    """How many holders the storage of ``t`` has (tensors, views, numpy arrays over it)."""
    return torch._C._storage_Use_Count(t.untyped_storage()._cdata)
