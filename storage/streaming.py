"""Streaming training data from a store: a block-aware sampler and map-style datasets.

Reading pattern (why it is fast and memory-flat): a store's arrays are chunked one *block* of rows per
chunk, and a chunk is decoded whole. :class:`BlockSampler` shuffles the order of blocks, then rows only
within a window of ``window_blocks`` consecutive blocks, so a batch touches at most a window's blocks.
The datasets keep a small per-process LRU of decoded blocks (``cache_blocks`` per array), so every
block is decoded once per window per worker, and memory is O(cache + batch), never O(dataset). With
``lanes`` the sampler deals whole windows to DataLoader workers, so each block is decoded by one worker.

Two datasets:

* :class:`StoreDataset` -- one row per ``__getitem__`` (use with :class:`BlockSampler` and
  :func:`collate`); simplest, works with any ``batch_size``.
* :class:`StoreBatchDataset` -- one *batch* per ``__getitem__`` (use with a ``BatchSampler`` and
  ``batch_size=None``): rows are gathered per block with one fancy-index copy per array into the batch
  array, no per-row Python work and no collate stacking. This is the fast path; :func:`stream_loader`
  builds it.

Both take *store row indices* (what :class:`BlockSampler` yields), open the backend lazily in the
process that reads (the process id is checked, so no file handle crosses a DataLoader fork), and give
identical batches for any ``num_workers`` because the order is fixed by the sampler.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from torch.utils.data import BatchSampler, DataLoader, Dataset, Sampler, get_worker_info

from .backends import HDF5_SUFFIXES, is_local, local_path, open_backend
from .chunks import ChunkFiles, readahead
from .zarr_backend import chunk_key
from .errors import StoreError
from .schema import DONE, STR, split_code

__all__ = ["BlockSampler", "StoreDataset", "StoreBatchDataset", "collate", "identity_collate", "stream_loader",
           "good_rows"]


def good_rows(backend, split: str | None = None) -> np.ndarray:
    """Row indices that are done and have no extraction error, optionally of one split."""
    keep = np.asarray(backend.read(DONE, slice(None))) == 1
    keep &= np.asarray(backend.read("images/error", slice(None)), dtype=object) == ""
    if split is not None:
        keep &= np.asarray(backend.read("images/split", slice(None))) == split_code(split)
    return np.flatnonzero(keep)


class BlockSampler(Sampler[int]):
    """Store row indices in block-shuffled, window-shuffled order, sharded across ranks.

    ``rows``: an int N (rows 0..N-1), a bool/uint8 array of done flags (as ``images/done``; rows whose
    flag is 1), or any other integer array of row indices. Per epoch, with ``rng = default_rng(seed +
    epoch)``: the blocks holding those rows are permuted, grouped into windows of ``window_blocks``
    consecutive blocks, and the rows of each window are permuted. The epoch's sequence is split into
    ``world_size`` contiguous equal parts (so ranks read mostly disjoint blocks); to make them equal it is
    padded by repeating its start (like ``DistributedSampler``), or with ``drop_last`` cut to a multiple
    of ``world_size``.

    Lanes (for DataLoader workers): with ``lanes=L > 1`` a rank's windows are dealt round-robin to ``L``
    lanes and the lanes are interleaved ``batch_size`` rows at a time. A DataLoader hands batch ``i`` to
    worker ``i % num_workers``, so with ``L == num_workers`` every worker reads only its own lane's
    blocks and decodes each block once, instead of every worker decoding every block. The order depends
    on ``lanes`` and ``batch_size`` only, never on how many workers actually read it.

    Resume: ``state_dict()`` gives ``{epoch, seed, position}`` where ``position`` counts indices this
    rank has yielded in the epoch; a DataLoader prefetches, so save the number of samples the loop has
    *consumed* instead: ``state_dict(position=batches_done * batch_size)``. ``load_state_dict`` makes the
    next iteration continue that epoch's exact order from ``position``.
    """

    def __init__(self, rows, block_size: int, *, shuffle: bool = True, seed: int = 0, window_blocks: int = 4,
                 rank: int = 0, world_size: int = 1, drop_last: bool = False, lanes: int = 1,
                 batch_size: int | None = None):
        if block_size < 1 or window_blocks < 1 or lanes < 1:
            raise ValueError(f"block_size, window_blocks and lanes must be >= 1, got {block_size}, "
                             f"{window_blocks}, {lanes}")
        if lanes > 1 and not batch_size:
            raise ValueError("lanes > 1 needs batch_size (the rows a lane contributes at a time)")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} not in [0, {world_size})")
        if isinstance(rows, (int, np.integer)):
            idx = np.arange(int(rows), dtype=np.int64)
        else:
            arr = np.asarray(rows)
            if arr.ndim != 1:
                raise ValueError(f"rows must be an int or a 1-D array, got shape {arr.shape}")
            idx = np.flatnonzero(arr == 1) if arr.dtype in (np.bool_, np.uint8) else np.unique(arr.astype(np.int64))
        if idx.size and idx[0] < 0:
            raise ValueError("row indices must be >= 0")
        self.rows = idx
        self.block_size, self.window_blocks = int(block_size), int(window_blocks)
        self.shuffle, self.seed, self.drop_last = shuffle, int(seed), drop_last
        self.rank, self.world_size = rank, world_size
        self.lanes, self.batch_size = int(lanes), int(batch_size or 0)
        blocks = idx // self.block_size
        starts = np.flatnonzero(np.r_[True, blocks[1:] != blocks[:-1]]) if idx.size else np.zeros(0, int)
        self._groups = np.split(idx, starts[1:]) if idx.size else []
        total = idx.size
        self.num_samples = total // world_size if drop_last else -(-total // world_size)
        self.epoch, self.position, self._start = 0, 0, 0
        self.readahead, self.readahead_rows = None, 0  # see stream_loader

    @classmethod
    def from_store(cls, url, *, split: str | None = None, storage_options: dict | None = None, **kw):
        """A sampler over the good (done, error-free) rows of the store at ``url`` (optionally one split)."""
        backend = open_backend(os.fspath(url), "r", storage_options=storage_options)
        try:
            return cls(good_rows(backend, split), backend.chunk_rows(), **kw)
        finally:
            backend.close()

    def _windows(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """All rows of ``epoch`` in global order, and the window number of each."""
        if not self._groups:
            return self.rows.copy(), np.zeros(0, np.int64)
        rng = np.random.default_rng(self.seed + epoch)
        perm = rng.permutation(len(self._groups)) if self.shuffle else np.arange(len(self._groups))
        out, wid = [], []
        for w in range(0, len(perm), self.window_blocks):
            window = np.concatenate([self._groups[b] for b in perm[w:w + self.window_blocks]])
            out.append(window[rng.permutation(window.size)] if self.shuffle else window)
            wid.append(np.full(window.size, w // self.window_blocks))
        return np.concatenate(out), np.concatenate(wid)

    def epoch_order(self, epoch: int) -> np.ndarray:
        """All rows of ``epoch`` in global order, before sharding (and before lanes)."""
        return self._windows(epoch)[0]

    def rank_order(self, epoch: int) -> np.ndarray:
        """This rank's rows of ``epoch``, in the order they are yielded."""
        order, wid = self._windows(epoch)
        need = self.num_samples * self.world_size
        if order.size:  # np.resize repeats from the start: the DistributedSampler-style padding
            order, wid = np.resize(order, need), np.resize(wid, need)
        part = slice(self.rank * self.num_samples, (self.rank + 1) * self.num_samples)
        order, wid = order[part], wid[part]
        if self.lanes == 1 or order.size == 0:
            return order
        # Pieces = runs of one window; piece j goes to lane j % lanes; lanes take turns, batch_size rows each.
        cuts = np.flatnonzero(np.r_[True, wid[1:] != wid[:-1], True])
        lanes = [[] for _ in range(self.lanes)]
        for j, (a, b) in enumerate(zip(cuts[:-1], cuts[1:])):
            lanes[j % self.lanes].append(order[a:b])
        streams = [np.concatenate(x) if x else order[:0] for x in lanes]
        k, out = self.batch_size, []
        for c in range(0, max(s.size for s in streams), k):
            out += [s[c:c + k] for s in streams if c < s.size]
        return np.concatenate(out)

    def __iter__(self):
        order = self.rank_order(self.epoch)
        start, self._start = self._start, 0
        self.position = start
        if self.readahead is None or not self.readahead_rows:
            for r in order[start:].tolist():
                self.position += 1
                yield r
            return
        # Announce the blocks of the next `readahead_rows` rows before yielding them (each block once).
        blocks, announced, horizon = order // self.block_size, set(), start
        for i, r in enumerate(order[start:].tolist(), start):
            if i >= horizon:
                ahead = set(np.unique(blocks[i:i + self.readahead_rows]).tolist()) - announced
                if ahead:
                    self.readahead(sorted(ahead))
                    announced |= ahead
                horizon = i + self.readahead_rows // 2
            self.position += 1
            yield r

    def __len__(self) -> int:
        return self.num_samples - self._start

    def set_epoch(self, epoch: int) -> None:
        """Use ``epoch``'s order next; a resumed position is kept only if ``epoch`` is the resumed one."""
        if int(epoch) != self.epoch:
            self._start = 0
        self.epoch = int(epoch)

    def state_dict(self, position: int | None = None) -> dict:
        return {"epoch": self.epoch, "seed": self.seed,
                "position": int(self.position if position is None else position)}

    def load_state_dict(self, state: dict) -> None:
        pos = int(state["position"])
        if not 0 <= pos <= self.num_samples:
            raise ValueError(f"sampler state position {pos} outside [0, {self.num_samples}]")
        self.epoch, self.seed, self._start, self.position = int(state["epoch"]), int(state["seed"]), pos, pos


class _BlockReader:
    """Per-process lazy backend plus an LRU of decoded blocks; pickles without handle or cache."""

    def __init__(self, url, fields, storage_options=None, cache_blocks: int = 4, threads: int = 2,
                 direct: bool = True):
        if not fields:
            raise ValueError("fields must name at least one store array, e.g. ['regions/feats']")
        self.url = os.fspath(url)
        self.fields = list(fields)
        self.storage_options = storage_options
        self.cache_blocks = max(1, int(cache_blocks))
        self.threads = max(1, int(threads))
        self.direct = bool(direct)
        backend = open_backend(self.url, "r", storage_options=storage_options)  # validate now, in the parent
        try:
            missing = [f for f in self.fields if not backend.has(f)]
            if missing:
                raise StoreError(f"store {self.url} has no array(s) {missing}; arrays: {backend.arrays()}")
            self.block_size = backend.chunk_rows()
            self.num_rows = backend.layout.num_rows
            self.specs = {f: backend.spec(f) for f in self.fields}
        finally:
            backend.close()
        self._reset()

    def _reset(self):
        self._backend, self._files, self._pid, self._cache, self._pool = None, None, None, OrderedDict(), None

    def __getstate__(self):
        state = self.__dict__.copy()
        state.update(_backend=None, _files=None, _pid=None, _cache=OrderedDict(), _pool=None)
        return state

    def backend(self):
        if self._pid != os.getpid():  # first use in this process (or a forked copy): open our own handle
            self._reset()
            self._backend = open_backend(self.url, "r", storage_options=self.storage_options)
            if self.direct:  # local Zarr: chunk files read directly (storage/chunks.py)
                self._files = ChunkFiles.for_backend(self._backend, [*self.fields, DONE])
            self._pid = os.getpid()
        return self._backend

    def readahead(self, blocks) -> None:
        """Start reading ``blocks`` of every field into the page cache (local Zarr stores; any process: the
        sampler calls it from the main process for the blocks DataLoader workers will read next)."""
        if not self.direct or not is_local(self.url) or self.url.rstrip("/").lower().endswith(HDF5_SUFFIXES):
            return
        root = local_path(self.url)
        readahead(os.path.join(root, chunk_key(f, b, len(spec.row_shape)))
                  for b in blocks for f, spec in self.specs.items() if spec.dtype != STR)

    def _load(self, path: str, b: int) -> np.ndarray:
        """Block ``b`` of ``path``: from its chunk file when the fast path reads it, else through the backend."""
        data = self._files.read_block(path, b) if self._files is not None else None
        return self._backend.read_block(path, b) if data is None else data

    def block(self, path: str, b: int) -> np.ndarray:
        return self.blocks(path, [b])[b]

    def blocks(self, path: str, wanted: list[int]) -> dict[int, np.ndarray]:
        """Decoded blocks of ``path``; the missing ones are read concurrently (Zarr's codecs release the
        GIL, so a new window's blocks decode on several cores; HDF5 reads serialise in h5py anyway)."""
        out, missing = {}, []
        for b in wanted:
            hit = self._cache.get((path, b))
            if hit is None:
                missing.append(b)
            else:
                self._cache.move_to_end((path, b))
                out[b] = hit
        backend = self.backend()
        if len(missing) > 1 and self.threads > 1 and backend.kind == "zarr":
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="vlcache-read")
            loaded = list(self._pool.map(lambda b: self._load(path, b), missing))
        else:
            loaded = [self._load(path, b) for b in missing]
        limit = self.cache_blocks * (len(self.fields) + 1)
        for b, data in zip(missing, loaded):
            data.flags.writeable = False  # handed out as views: a caller's write must not poison the cache
            self._cache[(path, b)] = out[b] = data
            while len(self._cache) > limit:
                self._cache.popitem(last=False)
        return out

    def check_done(self, rows: np.ndarray) -> None:
        for b in np.unique(rows // self.block_size).tolist():
            sel = rows[rows // self.block_size == b]
            flags = self.block(DONE, b)[sel - b * self.block_size]
            if not flags.all():
                bad = int(sel[np.flatnonzero(flags == 0)[0]])
                raise StoreError(f"store {self.url}: row {bad} is not extracted yet (images/done is 0)")

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
        self.check_done(rows)
        blocks = rows // self.block_size
        cuts = np.flatnonzero(np.r_[True, blocks[1:] != blocks[:-1], True]) if rows.size else np.zeros(1, int)
        shared = get_worker_info() is not None
        out = {}
        for f, spec in self.specs.items():
            shape = (rows.size, *spec.row_shape)
            if spec.dtype == STR:
                tensor, arr = None, np.empty(shape, dtype=object)
            else:
                tensor = _empty_tensor(shape, np.dtype(spec.dtype), shared)
                arr = tensor.numpy()
            data = self.blocks(f, blocks[cuts[:-1]].tolist())
            for s0, s1 in zip(cuts[:-1].tolist(), cuts[1:].tolist()):
                b = int(blocks[s0])
                np.take(data[b], rows[s0:s1] - b * self.block_size, axis=0, out=arr[s0:s1])
            out[f] = arr if tensor is None else tensor
        return rows, out


def _empty_tensor(shape: tuple, dtype: np.dtype, shared: bool) -> torch.Tensor:
    tdtype = torch.from_numpy(np.empty(0, dtype)).dtype
    if not shared:
        return torch.empty(shape, dtype=tdtype)
    storage = torch.UntypedStorage._new_shared(int(np.prod(shape)) * dtype.itemsize)
    return torch.empty(0, dtype=tdtype).set_(storage, 0, shape)


class StoreDataset(Dataset):
    """Map-style dataset: ``ds[row]`` -> ``{field: row array, "row": row}`` for a store row index.

    ``rows`` restricts the dataset to those rows (default: every good row of ``split``); ``len`` is
    their number and :meth:`sampler` builds the matching :class:`BlockSampler`. ``cache_blocks``: decoded
    blocks kept per array (match the sampler's ``window_blocks``); ``read_threads``: threads decoding a
    batch's missing blocks at once (Zarr); ``direct``: read a local Zarr store's chunk files directly
    (:mod:`.chunks`; False reads every block through Zarr, same values). Returned arrays are read-only
    views into the cached block; :func:`collate` stacks them.
    """

    def __init__(self, url, fields: list[str], *, rows=None, split: str | None = None, cache_blocks: int = 4,
                 read_threads: int = 2, storage_options: dict | None = None, direct: bool = True):
        self.reader = _BlockReader(url, fields, storage_options, cache_blocks, read_threads, direct)
        if rows is None:
            backend = open_backend(os.fspath(url), "r", storage_options=storage_options)
            try:
                rows = good_rows(backend, split)
            finally:
                backend.close()
        self.rows = np.unique(np.asarray(rows, dtype=np.int64))

    @property
    def block_size(self) -> int:
        return self.reader.block_size

    def __len__(self) -> int:
        return int(self.rows.size)

    def sampler(self, **kw) -> BlockSampler:
        return BlockSampler(self.rows, self.block_size, **kw)

    def __getitem__(self, row) -> dict:
        r = int(row)
        if not 0 <= r < self.reader.num_rows:
            raise IndexError(f"store {self.reader.url}: row {r} out of range [0, {self.reader.num_rows})")
        b, off = divmod(r, self.block_size)
        if not self.reader.block(DONE, b)[off]:
            raise StoreError(f"store {self.reader.url}: row {r} is not extracted yet (images/done is 0)")
        out = {f: self.reader.block(f, b)[off] for f in self.reader.fields}
        out["row"] = r
        return out


class StoreBatchDataset(StoreDataset):
    """Batch-level dataset: ``ds[[r0, r1, ...]]`` -> ``{field: tensor (B, ...), "row": tensor (B,)}``
    (string fields: object arrays (B, ...)).

    The batch holds exactly the rows asked for, ordered by block (stable within a block; ``"row"`` says
    which is which), so each block is copied in one piece. Use with ``DataLoader(ds, batch_size=None,
    sampler=BatchSampler(block_sampler, B, drop_last), collate_fn=identity_collate)``
    (:func:`stream_loader` does this): one worker builds a whole batch, one copy per array per block.
    """

    def __getitem__(self, rows) -> dict:
        idx, out = self.reader.gather(np.asarray(rows, dtype=np.int64).reshape(-1))
        out["row"] = torch.from_numpy(idx)
        return out


def identity_collate(batch):
    """For ``batch_size=None`` loaders over :class:`StoreBatchDataset`: batches are already built."""
    return batch


def collate(items: list[dict]) -> dict:
    """Stack per-row dicts: numeric fields -> tensors (B, ...), string fields -> object arrays (B, ...).

    In a DataLoader worker the tensors are stacked straight into shared memory (no copy on sending).
    """
    if not items:
        raise ValueError("collate got an empty batch")
    shared = get_worker_info() is not None
    out = {}
    for key in items[0]:
        vals = [np.asarray(it[key]) for it in items]
        if vals[0].dtype == object:
            out[key] = np.stack(vals)
        else:
            t = _empty_tensor((len(vals), *vals[0].shape), vals[0].dtype, shared)
            np.stack(vals, out=t.numpy())
            out[key] = t
    return out


def stream_loader(url, fields: list[str], batch_size: int, *, split: str | None = None, rows=None,
                  shuffle: bool = True, seed: int = 0, window_blocks: int = 4, rank: int = 0, world_size: int = 1,
                  drop_last: bool = False, num_workers: int = 0, lanes: int = 2, read_threads: int = 2,
                  storage_options: dict | None = None, direct: bool = True,
                  **loader_kw) -> tuple[DataLoader, BlockSampler]:
    """The fast path: a DataLoader of batches ``{field: tensor (B, ...) | object array, "row": tensor}``
    over :class:`StoreBatchDataset`, and its :class:`BlockSampler`.

    Call ``sampler.set_epoch(e)`` each epoch; save ``sampler.state_dict(position=batches * batch_size)``
    to resume mid-epoch. Workers each open the store themselves. The batches depend on the sampler
    settings (``lanes`` included), never on ``num_workers``; ``lanes == num_workers`` is fastest. Other
    keywords go to the DataLoader (e.g. ``pin_memory=True``: batches land in pinned memory for GPU copies).
    """
    # A worker sees ceil(lanes / workers) lanes' windows at a time (all of them without workers): cache them.
    per_reader = -(-lanes // num_workers) if num_workers else lanes
    ds = StoreBatchDataset(url, fields, rows=rows, split=split, cache_blocks=window_blocks * per_reader,
                           read_threads=read_threads, storage_options=storage_options, direct=direct)
    sampler = ds.sampler(shuffle=shuffle, seed=seed, window_blocks=window_blocks, rank=rank,
                         world_size=world_size, drop_last=drop_last, lanes=lanes, batch_size=batch_size)
    # The sampler runs ahead of the readers (DataLoader prefetching): it starts the page-cache reads of the
    # next windows' chunks, so on a cold cache disk reads overlap with batch building.
    sampler.readahead, sampler.readahead_rows = ds.reader.readahead, 2 * window_blocks * ds.block_size * lanes
    loader = DataLoader(ds, batch_size=None, sampler=BatchSampler(sampler, batch_size, drop_last),
                        num_workers=num_workers, collate_fn=identity_collate,
                        persistent_workers=num_workers > 0, **loader_kw)
    return loader, sampler
