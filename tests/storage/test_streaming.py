"""Block sampler (coverage, locality, sharding, resume) and the streaming datasets over real stores."""

import pickle

import numpy as np
import pytest
import torch
from torch.utils.data import BatchSampler, DataLoader

from vlcache.storage.errors import StoreError
from vlcache.storage.streaming import BlockSampler, StoreBatchDataset, StoreDataset, collate, stream_loader

torch.set_num_threads(2)
FIELDS = ["regions/feats", "regions/boxes", "regions/count", "captions/tokens", "grid/feats"]


def done_flags(n=103, seed=0):
    flags = (np.random.default_rng(seed).random(n) > 0.15).astype(np.uint8)
    flags[40:50] = 0  # a whole block missing
    return flags


def test_sampler_covers_done_rows_once_per_epoch():
    flags = done_flags()
    s = BlockSampler(flags, 10, seed=3, window_blocks=2)
    want = np.flatnonzero(flags).tolist()
    orders = []
    for epoch in range(3):
        s.set_epoch(epoch)
        order = list(s)
        assert sorted(order) == want and len(order) == len(s) == len(want)
        orders.append(order)
    assert orders[0] != orders[1] != orders[2]  # reshuffled per epoch
    s.set_epoch(1)
    assert list(s) == orders[1]  # and reproducible
    assert list(BlockSampler(flags, 10, seed=4, window_blocks=2)) != orders[0]
    assert list(BlockSampler(flags, 10, shuffle=False)) == want
    assert list(BlockSampler(np.array([5, 2, 9, 2]), 4, shuffle=False)) == [2, 5, 9]  # row-index form
    assert list(BlockSampler(7, 4, shuffle=False)) == list(range(7))


@pytest.mark.parametrize("window", [1, 3])
def test_sampler_windows_keep_blocks_together(window):
    flags = done_flags()
    order = np.array(list(BlockSampler(flags, 10, seed=1, window_blocks=window)))
    blocks = order // 10
    # Each window holds `window` whole blocks: every block's rows lie inside one span of at most
    # window * block_size positions, and any run of rows touches at most 2 windows' blocks.
    for b in np.unique(blocks):
        pos = np.flatnonzero(blocks == b)
        assert pos.max() - pos.min() < window * 10
    run = window * np.bincount(blocks)[np.unique(blocks)].min()  # fewest rows a window can hold
    for start in range(0, len(order), run):
        assert len(np.unique(blocks[start:start + run])) <= 2 * window
    if window == 1:  # rows within a block are still shuffled
        assert not np.all(np.diff(order[blocks == blocks[0]]) > 0)


@pytest.mark.parametrize("drop_last", [False, True])
def test_sampler_ranks_disjoint_and_cover(drop_last):
    flags = done_flags()
    want = set(np.flatnonzero(flags).tolist())
    world = 3
    parts = [list(BlockSampler(flags, 10, seed=5, rank=r, world_size=world, drop_last=drop_last))
             for r in range(world)]
    lens = {len(p) for p in parts}
    assert len(lens) == 1  # every rank the same number of rows
    per = lens.pop()
    union = [x for p in parts for x in p]
    assert set(union) <= want
    if drop_last:
        assert per == len(want) // world and len(set(union)) == len(union) == per * world
    else:
        assert per == -(-len(want) // world) and set(union) == want
        assert len(union) - len(set(union)) == per * world - len(want)  # only the padding repeats
    # Contiguous shards: ranks read mostly different blocks.
    blocks = [set(np.array(p) // 10) for p in parts]
    assert len(blocks[0] & blocks[2]) <= 2
    with pytest.raises(ValueError, match="rank 3 not in"):
        BlockSampler(flags, 10, rank=3, world_size=3)


def test_sampler_resume_mid_epoch():
    flags = done_flags()
    s = BlockSampler(flags, 10, seed=7, window_blocks=2, rank=1, world_size=2)
    s.set_epoch(4)
    full = list(s)
    it = iter(s)
    head = [next(it) for _ in range(13)]
    state = s.state_dict()
    assert state == {"epoch": 4, "seed": 7, "position": 13} and head == full[:13]
    fresh = BlockSampler(flags, 10, rank=1, world_size=2, window_blocks=2)
    fresh.load_state_dict(pickle.loads(pickle.dumps(state)))
    fresh.set_epoch(4)  # a training loop calls this again on resume: the position is kept
    assert len(fresh) == len(full) - 13
    assert list(fresh) == full[13:]
    assert list(fresh) == full  # the next pass of the same epoch starts from its beginning
    fresh.load_state_dict(state)
    fresh.set_epoch(5)  # a different epoch starts from 0
    assert len(list(fresh)) == len(full)
    with pytest.raises(ValueError, match="position"):
        fresh.load_state_dict({"epoch": 0, "seed": 7, "position": 10_000})


def test_sampler_lanes_deal_windows_to_workers():
    flags = done_flags(203)
    plain = BlockSampler(flags, 10, seed=9, window_blocks=2, rank=1, world_size=2)
    laned = BlockSampler(flags, 10, seed=9, window_blocks=2, rank=1, world_size=2, lanes=2, batch_size=8)
    a, b = list(plain), list(laned)
    assert sorted(a) == sorted(b) and a != b  # same rows of this rank, another order
    batches = [np.array(b[i:i + 8]) // 10 for i in range(0, len(b), 8)]
    even = set(np.concatenate(batches[0::2][:-2]))
    odd = set(np.concatenate(batches[1::2][:-2]))
    assert not even & odd  # away from the tail, worker 0's batches and worker 1's share no block
    with pytest.raises(ValueError, match="batch_size"):
        BlockSampler(flags, 10, lanes=2)
    laned.load_state_dict({"epoch": 0, "seed": 9, "position": 16})
    assert list(laned) == b[16:]


def loader_batches(loader):
    out = []
    for b in loader:
        out.append({k: (v.clone() if isinstance(v, torch.Tensor) else v.copy()) for k, v in b.items()})
    return out


def assert_same_batches(a, b):
    assert len(a) == len(b) > 0
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            if isinstance(x[k], torch.Tensor):
                assert torch.equal(x[k], y[k]), k
            else:
                assert np.array_equal(x[k], y[k]), k


def check_against_truth(batches, truth, fields=FIELDS):
    seen = []
    for b in batches:
        rows = np.asarray(b["row"])
        seen += rows.tolist()
        for f in fields:
            got = b[f].numpy() if isinstance(b[f], torch.Tensor) else b[f]
            np.testing.assert_array_equal(got, truth[f][rows])
    return seen


def test_row_dataset_workers_match(tiny_store):
    ds = StoreDataset(tiny_store.url, FIELDS)
    good = [r for r in range(20) if r not in tiny_store.error_rows]
    assert ds.rows.tolist() == good and len(ds) == 19
    item = ds[good[0]]  # the parent reads (opens a handle) before the workers fork
    assert item["regions/feats"].shape == (5, 16) and item["captions/tokens"].shape == (3,)
    runs = []
    for workers in (0, 2):
        sampler = ds.sampler(seed=11, window_blocks=2)
        sampler.set_epoch(1)
        loader = DataLoader(ds, batch_size=4, sampler=sampler, num_workers=workers, collate_fn=collate)
        runs.append(loader_batches(loader))
    assert_same_batches(*runs)
    assert runs[0][0]["regions/feats"].dtype == torch.float16
    assert runs[0][0]["captions/tokens"].dtype == object and runs[0][0]["captions/tokens"].shape == (4, 3)
    assert sorted(check_against_truth(runs[0], tiny_store.truth)) == good


def test_batch_dataset_workers_match(tiny_store):
    runs = []
    for workers in (0, 2):
        loader, sampler = stream_loader(tiny_store.url, FIELDS, 6, seed=2, window_blocks=2, num_workers=workers)
        sampler.set_epoch(3)
        runs.append(loader_batches(loader))
    assert_same_batches(*runs)
    good = [r for r in range(20) if r not in tiny_store.error_rows]
    assert sorted(check_against_truth(runs[0], tiny_store.truth)) == good
    assert [len(b["row"]) for b in runs[0]] == [6, 6, 6, 1]
    assert runs[0][0]["regions/feats"].dtype == torch.float16 and runs[0][0]["row"].dtype == torch.int64
    # A batch holds exactly the sampler's rows (grouped by block for one copy per block).
    sampler = BlockSampler(np.array(good), 8, seed=2, window_blocks=2, lanes=2, batch_size=6)
    sampler.set_epoch(3)
    for b, want in zip(runs[0], BatchSampler(sampler, 6, False)):
        assert sorted(b["row"].tolist()) == sorted(want)
        assert np.all(np.diff(b["row"].numpy() // 8) >= 0)


def test_split_rows_and_cache_bound(tiny_store):
    ds = StoreBatchDataset(tiny_store.url, ["regions/feats", "images/id"], split="train", cache_blocks=1)
    assert ds.rows.tolist() == [r for r in range(0, 20, 3) if r not in tiny_store.error_rows]
    out = ds[[0, 3, 18, 9]]
    assert out["row"].tolist() == [0, 3, 9, 18]
    assert out["images/id"].tolist() == ["img000", "img003", "img009", "img018"]
    assert len(ds.reader._cache) <= 1 * 3  # one block per field (+ done flags)
    clone = pickle.loads(pickle.dumps(ds))  # no handle, no cached blocks travel
    assert clone.reader._backend is None and not clone.reader._cache
    np.testing.assert_array_equal(clone[[18]]["regions/feats"], tiny_store.truth["regions/feats"][[18]])


def test_not_done_rows_and_bad_fields(tiny_store_factory):
    ts = tiny_store_factory("part.zarr", n=20, block_size=8, blocks=[1], finalize=False)
    ds = StoreDataset(ts.url, ["grid/feats"])
    assert ts.error_rows == [11]  # done, but extraction failed: not a training row
    assert ds.rows.tolist() == [8, 9, 10, 12, 13, 14, 15]
    np.testing.assert_array_equal(ds[9]["grid/feats"], ts.truth["grid/feats"][9])
    with pytest.raises(StoreError, match="row 3 is not extracted yet"):
        ds[3]
    bds = StoreBatchDataset(ts.url, ["grid/feats"])
    with pytest.raises(StoreError, match="row 17 is not extracted yet"):
        bds[[9, 17]]
    with pytest.raises(StoreError, match=r"no array\(s\) \['regions/nope'\]"):
        StoreDataset(ts.url, ["regions/nope"])
    assert list(BlockSampler.from_store(ts.url, shuffle=False)) == [8, 9, 10, 12, 13, 14, 15]
