"""Streaming training data from a store: map-style datasets and the loader that reads them fast.

Reading pattern (why it is fast and memory-flat): :class:`~.sampler.BlockSampler` yields rows block- and
window-shuffled, :class:`~.block_reader.BlockReader` keeps the window's blocks and copies rows straight
into the batch, so every block is read once per window per worker and memory is O(cache + batch), never
O(dataset).

Two datasets:

* :class:`StoreDataset` -- one row per ``__getitem__`` (use with :class:`BlockSampler` and
  :func:`collate`); simplest, works with any ``batch_size``.
* :class:`StoreBatchDataset` -- one *batch* per ``__getitem__`` (use with a ``BatchSampler`` and
  ``batch_size=None``): rows are gathered per block with one fancy-index copy per array into the batch
  array, no per-row Python work and no collate stacking. This is the fast path; :func:`stream_loader`
  builds it.

Both take *store row indices* (what :class:`BlockSampler` yields) and give identical batches for any
``num_workers`` because the order is fixed by the sampler.
"""

from __future__ import annotations

import os

import numpy as np
import torch
from torch.utils.data import BatchSampler, DataLoader, Dataset, get_worker_info

from .backends import open_backend
from .block_reader import BlockReader
from .errors import StoreError
from .sampler import BlockSampler, good_rows
from .schema import DONE
from .shared_batches import SlotReleasingLoader, empty_tensor

__all__ = ["BlockSampler", "StoreDataset", "StoreBatchDataset", "collate", "identity_collate", "stream_loader",
           "good_rows"]


class StoreDataset(Dataset):
    """Map-style dataset: ``ds[row]`` -> ``{field: row array, "row": row}`` for a store row index.

    ``rows`` restricts the dataset to those rows (default: every good row of ``split``); ``len`` is
    their number and :meth:`sampler` builds the matching :class:`BlockSampler`. ``cache_blocks``: decoded
    blocks kept per array (match the sampler's ``window_blocks``); ``read_threads``: threads decoding a
    batch's missing blocks at once (Zarr); ``direct``: read a local store's chunks directly
    (:mod:`.chunks`, :mod:`.h5chunks`; False reads every block through the backend, same values);
    ``pin_memory``: batches built outside DataLoader workers go into page-locked buffers (with CUDA).
    Returned arrays are read-only views into the cached block; :func:`collate` stacks them.
    """

    def __init__(self, url, fields: list[str], *, rows=None, split: str | None = None, cache_blocks: int = 4,
                 read_threads: int = 2, storage_options: dict | None = None, direct: bool = True,
                 pin_memory: bool = False):
        self.reader = BlockReader(url, fields, storage_options, cache_blocks, read_threads, direct, pin_memory)
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
            t = empty_tensor((len(vals), *vals[0].shape), vals[0].dtype, shared)
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
    keywords go to the DataLoader (e.g. ``pin_memory=True``: batches land in pinned memory for GPU copies;
    without workers they are built there directly, in reused buffers).

    Without workers a batch's tensors are views of buffers that are reused once nothing holds them any
    more (:class:`~.block_reader.BatchBuffers`): keep a batch (or a view of it) and it stays intact.
    """
    # A worker sees ceil(lanes / workers) lanes' windows at a time (all of them without workers): cache them.
    per_reader = -(-lanes // num_workers) if num_workers else lanes
    ds = StoreBatchDataset(url, fields, rows=rows, split=split, cache_blocks=window_blocks * per_reader,
                           read_threads=read_threads, storage_options=storage_options, direct=direct,
                           pin_memory=bool(loader_kw.get("pin_memory")) and num_workers == 0)
    sampler = ds.sampler(shuffle=shuffle, seed=seed, window_blocks=window_blocks, rank=rank,
                         world_size=world_size, drop_last=drop_last, lanes=lanes, batch_size=batch_size)
    # The sampler runs ahead of the readers (DataLoader prefetching): it starts the page-cache reads of the
    # next windows' chunks, so on a cold cache disk reads overlap with batch building.
    sampler.readahead, sampler.readahead_rows = ds.reader.readahead, 2 * window_blocks * ds.block_size * lanes
    # Workers write batches into shared-memory slots they reuse once this process lets go of a batch
    # (storage/shared_batches.py).
    loader = SlotReleasingLoader(ds, batch_size=None, sampler=BatchSampler(sampler, batch_size, drop_last),
                                 num_workers=num_workers, collate_fn=identity_collate,
                                 persistent_workers=num_workers > 0, reader=ds.reader, **loader_kw)
    return loader, sampler
