"""Which store rows to read, in what order: the block-aware sampler of the streaming reader.

A store's arrays are chunked one *block* of rows per chunk, and a chunk is read whole. :class:`BlockSampler`
shuffles the order of blocks, then rows only within a window of ``window_blocks`` consecutive blocks, so a
batch touches at most a window's blocks and each block is read once per window (:mod:`.block_reader`
keeps that window's blocks). With ``lanes`` it deals whole windows to DataLoader workers, so each block
is read by one worker. Its optional ``readahead`` hook announces the blocks of the rows it is about to
yield, so their files are read into the page cache before a reader needs them.
"""

from __future__ import annotations

import os

import numpy as np
from torch.utils.data import Sampler

from .backends import open_backend
from .schema import DONE, split_code

__all__ = ["BlockSampler", "ReadAhead", "good_rows"]


def good_rows(backend, split: str | None = None) -> np.ndarray:
    """Row indices that are done and have no extraction error, optionally of one split."""
    keep = np.asarray(backend.read(DONE, slice(None))) == 1
    keep &= np.asarray(backend.read("images/error", slice(None)), dtype=object) == ""
    if split is not None:
        keep &= np.asarray(backend.read("images/split", slice(None))) == split_code(split)
    return np.flatnonzero(keep)


class ReadAhead:
    """Announces blocks before their rows are read: :meth:`at` ``(i)`` calls ``hook(blocks)`` with the blocks
    of ``order[i : i + rows]`` not announced yet this epoch, each time position ``i`` passes half of the last
    announced stretch (so a block is announced about ``rows / 2`` rows before its first row is needed).
    ``hook`` None or ``rows`` 0: nothing is announced."""

    def __init__(self, order: np.ndarray, block_size: int, hook, rows: int):
        self.blocks, self.hook, self.rows = np.asarray(order) // block_size, hook, int(rows or 0)
        self.announced: set[int] = set()
        self.horizon = -1

    def at(self, i: int) -> None:
        if self.hook is None or not self.rows or i < self.horizon:
            return
        new = set(np.unique(self.blocks[i:i + self.rows]).tolist()) - self.announced
        if new:
            self.hook(sorted(new))
            self.announced |= new
        self.horizon = i + max(1, self.rows // 2)


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
        ahead = ReadAhead(order, self.block_size, self.readahead, self.readahead_rows)
        for i, r in enumerate(order[start:].tolist(), start):
            ahead.at(i)
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
