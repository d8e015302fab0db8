"""Read-only memory maps of chunk files, kept for the life of the process (an LRU bounded by bytes mapped).

Mapping a chunk is cheap; *re*-mapping it is not. A profile of ``bench/stream.py`` (warm page cache, no
DataLoader workers) spent three times as long creating and tearing down the page tables of 9 MiB chunk
mappings -- once per chunk per shuffling window -- as copying their rows into batches. LMDB and a
memory-mapped ``.npy`` map their file once, and so does this cache: a chunk's mapping is made on its first
read in a process and reused by every later read, so from the second epoch on a warm read is a row copy
out of the page cache and nothing else.

Memory: the pages of a mapping are the kernel's page cache, shared by every process that maps or reads the
file and dropped by the kernel under memory pressure like any other cached file page (they are never
written). They do count in a process's resident set (``RssFile``) once touched, as with LMDB or an
``np.load(mmap_mode="r")`` array; the process's own memory (``RssAnon``) stays O(batch). ``budget``
bounds the bytes mapped at once (default: the machine's physical memory, beyond which pages cannot stay
cached anyway); the least recently used mappings are dropped first. A budget of 0 maps per read and keeps
nothing.

Entries are keyed by (file, byte offset) and remember the file's identity (inode, size, modification
time): a file replaced since (Zarr writes a chunk to a new file and renames it over the old) is mapped
afresh, so a mapping never serves bytes of a file version it was not made from.
"""

from __future__ import annotations

import mmap
import os
import threading
from collections import OrderedDict

import numpy as np

__all__ = ["MAPS", "MappedFiles", "file_identity", "map_range"]

MAX_MAPPINGS = 16384  # well below Linux's vm.max_map_count (65530 by default), which other libraries share


def file_identity(st: os.stat_result) -> tuple[int, int, int]:
    """(inode, size, modification time): changes when a file is replaced or rewritten."""
    return st.st_ino, st.st_size, st.st_mtime_ns


def map_range(fd: int, offset: int, nbytes: int, dtype: np.dtype) -> np.ndarray:
    """``nbytes`` at ``offset`` of the open file ``fd`` as a read-only array of ``dtype``, memory-mapped;
    the mapping lives as long as the array (or a view of it). Pages are faulted in on first touch (the
    kernel maps 16 neighbours per fault): faster, in a profile, than populating them all at once."""
    base = offset - offset % mmap.ALLOCATIONGRANULARITY  # mmap offsets must be page-aligned
    buf = mmap.mmap(fd, offset - base + nbytes, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ, offset=base)
    return np.frombuffer(buf, dtype=dtype, count=nbytes // dtype.itemsize, offset=offset - base)


def physical_memory() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 16 << 30


class MappedFiles:
    """An LRU of read-only mappings ``(file, offset) -> (identity, uint8 array)``, at most ``budget`` bytes."""

    def __init__(self, budget: int | None = None):
        self.budget = physical_memory() if budget is None else int(budget)
        self._maps: OrderedDict[tuple[str, int], tuple[tuple, np.ndarray]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._maps)

    @property
    def mapped_bytes(self) -> int:
        return self._bytes

    def get(self, file: str, offset: int, identity: tuple) -> np.ndarray | None:
        """The kept mapping of ``file`` at ``offset`` if it was made from the file version ``identity``."""
        with self._lock:
            hit = self._maps.get((file, offset))
            if hit is None:
                return None
            if hit[0] != identity:  # the file was replaced: its old mapping serves nobody any more
                self._drop((file, offset))
                return None
            self._maps.move_to_end((file, offset))
            return hit[1]

    def keep(self, file: str, offset: int, identity: tuple, data: np.ndarray) -> None:
        """Keep ``data`` (a mapping of ``file`` at ``offset``) for later reads, within the budget."""
        if data.nbytes > self.budget:
            return
        with self._lock:
            if (file, offset) in self._maps:
                self._drop((file, offset))
            self._maps[(file, offset)] = (identity, data)
            self._bytes += data.nbytes
            while self._maps and (self._bytes > self.budget or len(self._maps) > MAX_MAPPINGS):
                self._drop(next(iter(self._maps)))

    def set_budget(self, budget: int | None) -> None:
        with self._lock:
            self.budget = physical_memory() if budget is None else int(budget)
            while self._maps and self._bytes > self.budget:
                self._drop(next(iter(self._maps)))

    def clear(self) -> None:
        with self._lock:
            self._maps.clear()
            self._bytes = 0

    def _drop(self, key) -> None:
        # the mapping itself goes when the last array over it does (a batch being built may still read it)
        self._bytes -= self._maps.pop(key)[1].nbytes


MAPS = MappedFiles()  # one per process: every reader of every store shares it (forked workers inherit it)
