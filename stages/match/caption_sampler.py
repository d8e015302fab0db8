"""Caption-level matching epochs, streamed: every caption of every image once per epoch (METHODS §6).

SCAN and VSE++ iterate over captions (5 per COCO/Flickr image), shuffled at caption level, and their
learning-rate schedules count those epochs. Shuffling every caption of the split at once would read
images in random order, one block decode per caption; instead the rows come in the store sampler's
block/window order (:class:`~vlcache.storage.streaming.BlockSampler`), are cut into groups of at most
``window_blocks`` blocks, and each group's (row, caption) pairs are shuffled together. A batch then holds
B captions whose images are drawn from a window of blocks, so memory stays O(batch + window), as for
row-level epochs, and an image's captions are spread over the window's batches, not kept together.

Under DDP each rank expands its own rows; ranks may hold different numbers of captions, so every rank
stops at the smallest count (all ranks take the same number of steps).
"""

from __future__ import annotations

import copy

import numpy as np

from ...storage.sampler import ReadAhead
from ...storage.streaming import BlockSampler


def block_groups(order: np.ndarray, block_size: int, max_blocks: int) -> list[np.ndarray]:
    """Cut ``order`` into consecutive runs that touch at most ``max_blocks`` distinct blocks."""
    groups, start, seen = [], 0, set()
    for i, b in enumerate((order // block_size).tolist()):
        if b not in seen and len(seen) == max_blocks:
            groups.append(order[start:i])
            start, seen = i, set()
        seen.add(b)
    if start < len(order):
        groups.append(order[start:])
    return groups


class CaptionBatchSampler:
    """Yields ``(epoch, pairs)`` with ``pairs (n, 2)`` = (store row, caption index), ``batch_size`` pairs
    a batch (the last one shorter unless ``drop_last``). Resume as :class:`BlockSampler`: ``state_dict(
    position=pairs consumed)``, ``load_state_dict``; ``set_epoch`` before each epoch."""

    def __init__(self, rows: BlockSampler, counts: np.ndarray, batch_size: int, drop_last: bool = False):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.rows, self.batch_size, self.drop_last = rows, int(batch_size), drop_last
        self.count_of = dict(zip(rows.rows.tolist(), np.asarray(counts, np.int64).tolist()))
        self.epoch, self._start, self._cache = 0, 0, (None, None)

    def _rank_pairs(self, sampler: BlockSampler, epoch: int) -> np.ndarray:
        order = sampler.rank_order(epoch)
        rng = np.random.default_rng([sampler.seed, epoch, 0xCA9])  # its own stream: row order is untouched
        out = []
        for group in block_groups(order, sampler.block_size, sampler.window_blocks):
            cnt = np.array([self.count_of[r] for r in group.tolist()], np.int64)
            pairs = np.stack([np.repeat(group, cnt), np.concatenate([np.arange(c) for c in cnt])], 1)
            out.append(pairs[rng.permutation(len(pairs))] if sampler.shuffle else pairs)
        return np.concatenate(out) if out else np.zeros((0, 2), np.int64)

    def epoch_pairs(self, epoch: int) -> np.ndarray:
        """This rank's (row, caption) pairs of ``epoch`` in order (cut to the smallest rank's count)."""
        if self._cache[0] == epoch:
            return self._cache[1]
        pairs = self._rank_pairs(self.rows, epoch)
        if self.rows.world_size > 1:
            others = []
            for r in range(self.rows.world_size):
                s = copy.copy(self.rows)
                s.rank = r
                others.append(len(self._rank_pairs(s, epoch)))
            pairs = pairs[:min(others)]
        if self.drop_last:
            pairs = pairs[:len(pairs) // self.batch_size * self.batch_size]
        self._cache = (epoch, pairs)
        return pairs

    def rank_order(self, epoch: int) -> np.ndarray:
        """The store rows this rank reads in ``epoch`` (its shard), in row-sampler order."""
        return self.rows.rank_order(epoch)

    def __iter__(self):
        pairs = self.epoch_pairs(self.epoch)
        start, self._start = self._start, 0
        # the row sampler's readahead hook, if set, hears of each block before a batch needs it
        ahead = ReadAhead(pairs[:, 0], self.rows.block_size, self.rows.readahead,
                          max(self.rows.readahead_rows, 2 * self.batch_size))
        for s in range(start, len(pairs), self.batch_size):
            ahead.at(s)
            yield self.epoch, pairs[s:s + self.batch_size]

    def __len__(self) -> int:
        n = len(self.epoch_pairs(self.epoch)) - self._start
        return -(-n // self.batch_size) if n > 0 else 0

    @property
    def num_samples(self) -> int:
        return len(self.epoch_pairs(self.epoch))

    def set_epoch(self, epoch: int) -> None:
        if int(epoch) != self.epoch:
            self._start = 0
        self.epoch = int(epoch)
        self.rows.set_epoch(epoch)

    def state_dict(self, position: int | None = None) -> dict:
        return {"epoch": self.epoch, "seed": self.rows.seed, "position": int(self._start if position is None
                                                                              else position), "unit": "caption"}

    def load_state_dict(self, state: dict) -> None:
        if state.get("unit") != "caption":
            raise ValueError("sampler state is from row-level epochs (captions 'one'/'all'); resume with the "
                             "same captions setting")
        self.epoch, self._start = int(state["epoch"]), int(state["position"])
        if not 0 <= self._start <= self.num_samples:
            raise ValueError(f"sampler state position {self._start} outside [0, {self.num_samples}]")
        self.rows.seed = int(state["seed"])
