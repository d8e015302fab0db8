"""Shared-memory batch buffers that DataLoader workers reuse once the main process has let go of a batch.

A DataLoader worker sends each batch to the main process in shared memory. Allocated afresh for every
batch (torch's default, and ``empty_tensor(..., shared=True)``), a batch's pages are created, zeroed and
faulted in one by one, then freed when the main process drops the batch: in a profile of
``bench/stream.py`` with two workers that cost more than reading the rows. Here each worker keeps a few
*slots* of shared buffers, one per field, and writes a batch into a free slot, so its pages are made once.

A slot is free only once the main process holds nothing of the batch last written into it: the main
process keeps a weak reference to each received tensor's storage (``StorageWeakRef``, which counts every
tensor and view over it) and clears the slot's flag, in a small array of shared flags, when all of them
have expired. A worker that finds no free slot (the training loop keeps batches, or prefetches deeper)
allocates a fresh batch as before, so reuse never waits and never overwrites a batch someone still holds.
"""

from __future__ import annotations

import functools

import numpy as np
import torch
from torch.multiprocessing.reductions import StorageWeakRef

__all__ = ["SLOT_KEY", "SharedBatchSlots", "SlotReleasingLoader", "empty_tensor", "torch_dtype",
           "transform_keeping_slot"]

SLOT_KEY = "_vlcache_slot"  # the slot a batch was written into; removed before the batch reaches the caller


class SharedBatchSlots:
    """``per_worker`` slots per worker; ``flags[s]`` is 1 while slot ``s``'s batch is out. Create it in the
    main process before the workers start (the flags are shared memory, inherited or pickled as such)."""

    def __init__(self, num_workers: int, per_worker: int):
        self.per_worker = int(per_worker)
        self.flags = torch.zeros(max(1, num_workers) * self.per_worker, dtype=torch.uint8).share_memory_()
        self._buffers: dict[int, dict[str, torch.Tensor]] = {}  # in a worker: slot -> field -> buffer

    def __getstate__(self):
        return {"per_worker": self.per_worker, "flags": self.flags, "_buffers": {}}

    def acquire(self, worker_id: int) -> int | None:
        """A free slot of worker ``worker_id``, now marked out; None when all are out."""
        flags = self.flags.numpy()
        first = worker_id * self.per_worker
        for s in range(first, min(first + self.per_worker, flags.size)):
            if flags[s] == 0:
                flags[s] = 1
                return s
        return None

    def tensor(self, slot: int, field: str, shape: tuple, dtype: np.dtype) -> torch.Tensor:
        """The batch tensor of ``field`` in ``slot`` (a view of its buffer; a larger buffer if needed)."""
        held = self._buffers.setdefault(slot, {})
        buf = held.get(field)
        if buf is None or buf.dtype != torch_dtype(dtype) or buf.shape[1:] != tuple(shape[1:]) \
                or buf.shape[0] < shape[0]:
            buf = held[field] = empty_tensor(tuple(shape), dtype, True)
        return buf[: shape[0]]

    def release(self, slot: int) -> None:
        self.flags[slot] = 0


class SlotReleasingLoader(torch.utils.data.DataLoader):
    """A DataLoader whose workers write batches into :class:`SharedBatchSlots`: with workers it makes the
    slots -- one per batch a worker may have in flight (``prefetch_factor``), one held here, one being
    built -- and gives them to ``reader`` (the :class:`~.block_reader.BlockReader` its dataset reads with).
    It takes each batch's slot number out of the batch and frees the slot once nothing in this process
    holds the batch's tensors. Pending slots live on the loader, not the iterator, so an epoch's last
    batches are freed in the next."""

    def __init__(self, dataset, *args, reader, **kw):
        super().__init__(dataset, *args, **kw)
        self.slots = SharedBatchSlots(self.num_workers, self.prefetch_factor + 2) if self.num_workers > 0 else None
        reader.slots = self.slots
        self._out: list[tuple[int, list[StorageWeakRef]]] = []

    def __iter__(self):
        it = super().__iter__()
        if self.slots is None:
            return it
        return _Releasing(it, self)

    def free_returned(self) -> None:
        """Free every slot whose batch nothing holds any more."""
        still = []
        for slot, refs in self._out:
            if all(r.expired() for r in refs):
                self.slots.release(slot)
            else:
                still.append((slot, refs))
        self._out = still

    def took(self, batch):
        if not isinstance(batch, dict):
            return batch
        slot = batch.pop(SLOT_KEY, None)
        if slot is not None:
            self._out.append((int(slot), [StorageWeakRef(t.untyped_storage()) for t in _tensors(batch)]))
        return batch


def _tensors(x):
    """Every tensor in a batch, however nested in dicts, lists and tuples (a transform may nest them)."""
    if isinstance(x, torch.Tensor):
        yield x
    elif isinstance(x, dict):
        for v in x.values():
            yield from _tensors(v)
    elif isinstance(x, (list, tuple)):
        for v in x:
            yield from _tensors(v)


def transform_keeping_slot(transform, batch: dict) -> dict:
    """``transform(batch)`` for a store batch, with the batch's slot number moved onto the result (the
    transform never sees it): the loader frees the slot only once nothing holds the transformed batch,
    which may pass tensors of the slot through unchanged."""
    slot = batch.pop(SLOT_KEY, None)
    out = transform(batch)
    if slot is not None:
        out[SLOT_KEY] = slot
    return out


class _Releasing:
    """The DataLoader's own iterator, with slot bookkeeping around each batch."""

    def __init__(self, it, loader: SlotReleasingLoader):
        self._it, self._loader = it, loader

    def __iter__(self):
        return self

    def __next__(self):
        self._loader.free_returned()
        return self._loader.took(next(self._it))

    def __len__(self):
        return len(self._it)

    def __getattr__(self, name):
        return getattr(self._it, name)


@functools.lru_cache(maxsize=None)
def torch_dtype(dtype: np.dtype) -> torch.dtype:
    return torch.from_numpy(np.empty(0, dtype)).dtype


def empty_tensor(shape: tuple, dtype: np.dtype, shared: bool) -> torch.Tensor:
    tdtype = torch_dtype(dtype)
    if not shared:
        return torch.empty(shape, dtype=tdtype)
    storage = torch.UntypedStorage._new_shared(int(np.prod(shape)) * dtype.itemsize)
    return torch.empty(0, dtype=tdtype).set_(storage, 0, shape)
