"""The streaming fast path (storage/chunks.py): same batches as Zarr, damage still caught, v1 stores read and
upgraded by `store copy`.

``tests/fixtures/v1_tiny.zarr`` is a real schema-v1 store (Blosc-LZ4 float16 features) written by the v1
code (commit 3c2523b) with ``make_tiny_store(n=10, block_size=4)``.
"""

import json
import mmap
import os
import shutil
import tracemalloc
from dataclasses import replace
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from vlcache.storage.errors import CorruptChunkError
from vlcache.storage.mapped import MAPS
from conftest import TINY_CAPS
from vlcache.storage.sharing import copy_store, diff_stores
from vlcache.storage.streaming import StoreBatchDataset, stream_loader

FIELDS = ["regions/feats", "regions/boxes", "regions/count", "grid/feats", "instances/masks", "captions/tokens"]
V1 = Path(__file__).parents[1] / "fixtures" / "v1_tiny.zarr"


def batches(url, direct, workers=0, epoch=1):
    loader, sampler = stream_loader(url, FIELDS, 3, seed=5, window_blocks=2, num_workers=workers, direct=direct)
    sampler.set_epoch(epoch)
    return [{k: (v.clone() if isinstance(v, torch.Tensor) else v.copy()) for k, v in b.items()} for b in loader]


def assert_same(a, b):
    assert len(a) == len(b) > 0
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            assert (torch.equal(x[k], y[k]) if isinstance(x[k], torch.Tensor) else np.array_equal(x[k], y[k])), k


def codecs(url, path):
    return [c["name"] for c in json.loads((Path(url) / path / "zarr.json").read_text())["codecs"]]


def test_fast_path_batches_equal_zarr_path(tiny_store_factory):
    ts = tiny_store_factory("fast.zarr", n=20, block_size=8)
    assert codecs(ts.url, "regions/feats") == ["bytes", "crc32c"]  # v2: memory-mapped
    ds = StoreBatchDataset(ts.url, FIELDS)
    ds[[0]]
    plans = ds.reader._files.plans  # the fast path is really taken, mapped and decompressed
    assert plans["regions/feats"].decompressor is None and plans["regions/boxes"].decompressor is not None
    assert "captions/tokens" not in plans  # strings go through Zarr
    fast = batches(ts.url, direct=True)
    assert_same(fast, batches(ts.url, direct=False))
    assert_same(fast, batches(ts.url, direct=True, workers=2))
    for b in fast:
        rows = b["row"].numpy()
        for f in FIELDS:
            got = b[f].numpy() if isinstance(b[f], torch.Tensor) else b[f]
            np.testing.assert_array_equal(got, ts.truth[f][rows])


def flip(file: Path, offset: int = 7) -> None:
    data = bytearray(file.read_bytes())
    data[offset] ^= 0x10
    file.write_bytes(bytes(data))


@pytest.mark.parametrize("array, chunk", [("regions/feats", "c/1/0/0"), ("regions/boxes", "c/1/0/0")])
def test_flipped_byte_is_caught_on_fast_path(tiny_store_factory, array, chunk):
    ts = tiny_store_factory("flip.zarr", n=20, block_size=8)
    flip(Path(ts.url) / array / chunk)
    ds = StoreBatchDataset(ts.url, [array])
    np.testing.assert_array_equal(ds[[0, 1]][array].numpy(), ts.truth[array][[0, 1]])  # block 0 is fine
    with pytest.raises(CorruptChunkError, match=rf"'{array}' chunk \(1, 0, 0\) failed its checksum \(crc32c\)"):
        ds[[9]]
    loader, _ = stream_loader(ts.url, [array], 4, num_workers=2)
    # torch re-raises a worker's exception as RuntimeError when its type takes more than a message
    with pytest.raises((CorruptChunkError, RuntimeError), match=rf"CorruptChunkError: .*'{array}' chunk \(1, 0, 0\)"):
        list(loader)


def test_checked_once_per_file_version(tiny_store_factory):
    """A verified chunk is not re-checked while the file is unchanged; a replaced file is checked again."""
    ts = tiny_store_factory("once.zarr", n=20, block_size=8)
    chunk = Path(ts.url) / "regions/feats/c/0/0/0"
    reader = StoreBatchDataset(ts.url, ["regions/feats"], cache_blocks=1).reader
    reader.block("regions/feats", 0)
    bad = chunk.with_name("bad")
    shutil.copyfile(chunk, bad)
    flip(bad)
    os.replace(bad, chunk)  # a new file (new inode): must be checked again, even in this process
    reader._cache.clear()
    with pytest.raises(CorruptChunkError, match=r"chunk \(0, 0, 0\) failed its checksum"):
        reader.block("regions/feats", 0)
    truncated = Path(ts.url) / "regions/feats/c/1/0/0"
    truncated.write_bytes(truncated.read_bytes()[:-10])
    with pytest.raises(CorruptChunkError, match=r"chunk \(1, 0, 0\) has \d+ bytes, expected"):
        reader.block("regions/feats", 1)


def test_v1_store_is_read_and_upgraded_by_copy(tmp_path):
    v1 = tmp_path / "v1.zarr"
    shutil.copytree(V1, v1)
    assert json.loads((v1 / "zarr.json").read_text())["attributes"]["schema_version"] == 1
    assert codecs(v1, "regions/feats") == ["bytes", "blosc", "crc32c"]
    fast = batches(str(v1), direct=True)
    assert_same(fast, batches(str(v1), direct=False))
    ds = StoreBatchDataset(str(v1), FIELDS)
    ds[[0]]
    assert ds.reader._files.plans["regions/feats"].decompressor is not None  # Blosc decoded on the fast path

    v2 = tmp_path / "v2.zarr"
    report = copy_store(str(v1), str(v2), progress=False)
    assert report.complete and any("upgraded from schema v1 to v2" in n for n in report.notes), report.notes
    assert not any("modified" in n for n in report.notes), report.notes
    attrs = json.loads((v2 / "zarr.json").read_text())["attributes"]
    assert attrs["schema_version"] == 2 and attrs["copied_from"]["fingerprint"] == "26aabf0534415806"
    assert codecs(v2, "regions/feats") == ["bytes", "crc32c"]
    assert_same(fast, batches(str(v2), direct=True))
    d = diff_stores(str(v1), str(v2), progress=False)  # same values; only the schema version differs
    assert not any(d.arrays.values()) and d.rows_same and not d.missing and not d.config
    assert len(d.schema) == 1 and "schema_version" in d.schema[0], d.schema


def test_sampler_reads_ahead_before_rows_are_yielded(tiny_store_factory, monkeypatch):
    """stream_loader's sampler announces each block (once) before yielding its first row; order unchanged."""
    ts = tiny_store_factory("ahead.zarr", n=40, block_size=4)
    loader, sampler = stream_loader(ts.url, ["regions/feats"], 3, seed=1, window_blocks=2, lanes=2)
    assert sampler.readahead_rows == 2 * 2 * 4 * 2
    plain = list(sampler)
    calls = []
    sampler.readahead = calls.append
    announced = []
    for r in sampler:
        announced += [b for c in calls for b in c]
        calls.clear()
        assert r // 4 in announced
    assert len(announced) == len(set(announced)) == len({r // 4 for r in plain})
    assert list(sampler) != [] and [r for r in sampler] == plain
    loader.dataset.reader.readahead([]).result()  # one thread, in order: the sampler's requests are done
    files = []
    monkeypatch.setattr("vlcache.storage.block_reader.readahead", lambda paths: files.extend(paths))
    loader.dataset.reader.readahead([3]).result()  # asked from a background thread
    assert sorted(Path(f).relative_to(ts.url).as_posix() for f in files) == ["regions/feats/c/3/0/0"]
    assert all(Path(f).is_file() for f in files)


def mapped(a: np.ndarray) -> bool:
    while isinstance(a, (np.ndarray, memoryview)):
        a = a.obj if isinstance(a, memoryview) else a.base
    return isinstance(a, mmap.mmap)


def test_hdf5_fast_path_maps_checked_chunks(tiny_store_factory):
    """HDF5: a raw chunk is read through h5py (fletcher32) the first time, memory-mapped after; same batches."""
    ts = tiny_store_factory("fast.h5", n=20, block_size=8)
    ds = StoreBatchDataset(ts.url, FIELDS, cache_blocks=1)
    assert sorted(ds.reader.h5_index.arrays) == ["grid/feats", "regions/feats"]  # raw float16 only
    first = ds.reader.block("regions/feats", 1)
    assert not mapped(first)
    ds.reader._cache.clear()
    again = ds.reader.block("regions/feats", 1)
    assert mapped(again) and not again.flags.writeable
    np.testing.assert_array_equal(again, first)
    fast = batches(ts.url, direct=True)
    assert_same(fast, batches(ts.url, direct=False))
    assert_same(fast, batches(ts.url, direct=True, workers=2))
    for b in fast:
        np.testing.assert_array_equal(b["regions/feats"].numpy(), ts.truth["regions/feats"][b["row"].numpy()])


def test_hdf5_flipped_byte_is_caught_on_fast_path(tiny_store_factory):
    ts = tiny_store_factory("flip.h5", n=20, block_size=8)
    with h5py.File(ts.url, "r") as f:
        info = f["regions/feats"].id.get_chunk_info_by_coord((8, 0, 0))
    flip(Path(ts.url), info.byte_offset + 7)
    ds = StoreBatchDataset(ts.url, ["regions/feats"])
    np.testing.assert_array_equal(ds[[0, 1]]["regions/feats"].numpy(), ts.truth["regions/feats"][[0, 1]])
    with pytest.raises(CorruptChunkError, match=r"'regions/feats' chunk \(1, 0, 0\) failed its checksum \(fletcher32\)"):
        ds[[9]]


def test_batches_reuse_buffers_only_when_released(tiny_store_factory):
    """Without workers a batch is built in a pooled buffer, reused only once nothing holds the last one."""
    ts = tiny_store_factory("pool.zarr", n=20, block_size=8)
    ds = StoreBatchDataset(ts.url, ["regions/feats"])
    held = ds[[0, 1, 2]]
    kept = held["regions/feats"][1:]  # a view keeps the storage alive
    del held
    other = ds[[8, 9, 10]]
    np.testing.assert_array_equal(kept.numpy(), ts.truth["regions/feats"][[1, 2]])  # not overwritten
    ptr = other["regions/feats"].data_ptr()
    del other
    again = ds[[16, 17]]
    assert again["regions/feats"].data_ptr() == ptr  # released: reused, no new allocation
    np.testing.assert_array_equal(again["regions/feats"].numpy(), ts.truth["regions/feats"][[16, 17]])


def test_gather_copies_rows_once(tiny_store_factory):
    """Rows go straight into the batch: no temporary the size of the batch (numpy's np.take with the
    default mode='raise' buffers `out`, copying every row twice)."""
    ts = tiny_store_factory("once.zarr", n=16, block_size=8, caps=replace(TINY_CAPS, region_dim=1024))
    reader = StoreBatchDataset(ts.url, ["regions/feats"]).reader
    rows = np.arange(8)
    reader.gather(rows)  # blocks cached, buffers allocated
    tracemalloc.start()
    try:
        _, out = reader.gather(rows)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    np.testing.assert_array_equal(out["regions/feats"].numpy(), ts.truth["regions/feats"][rows])
    assert peak < out["regions/feats"].numpy().nbytes / 2, peak


def kept_mapping(file: Path):
    hit = MAPS._maps.get((str(file), 0))
    return None if hit is None else hit[1]


def test_a_chunk_is_mapped_once_per_process_and_a_replaced_file_afresh(tiny_store_factory):
    """Kept mappings (storage/mapped.py): a later epoch reuses the very mapping of the first; a chunk file
    replaced since is mapped again and its new bytes are read, never the old mapping's."""
    ts = tiny_store_factory("kept.zarr", n=24, block_size=8)
    feats = Path(ts.url) / "regions/feats/c"
    first = batches(ts.url, direct=True, epoch=1)
    maps = [kept_mapping(feats / f"{b}/0/0") for b in range(3)]
    assert all(m is not None for m in maps)
    again = batches(ts.url, direct=True, epoch=1)
    assert_same(first, again)
    assert all(kept_mapping(feats / f"{b}/0/0") is m for b, m in enumerate(maps))  # not mapped again
    # block 0's file replaced by a valid copy of block 2's (a rewrite): its rows now hold block 2's values
    staged = feats / "0/0/staged"
    shutil.copyfile(feats / "2/0/0", staged)
    os.replace(staged, feats / "0/0/0")
    reader = StoreBatchDataset(ts.url, ["regions/feats"], cache_blocks=1).reader
    np.testing.assert_array_equal(reader.block("regions/feats", 0), ts.truth["regions/feats"][16:24])
    assert kept_mapping(feats / "0/0/0") is not maps[0]


def test_the_mapping_budget_bounds_what_a_process_keeps_mapped(tiny_store_factory):
    ts = tiny_store_factory("budget.zarr", n=40, block_size=8)
    chunk_bytes = (Path(ts.url) / "regions/feats/c/0/0/0").stat().st_size
    old = MAPS.budget
    MAPS.set_budget(2 * chunk_bytes)
    try:
        fast = batches(ts.url, direct=True)
        assert MAPS.mapped_bytes <= 2 * chunk_bytes
        assert sum(kept_mapping(Path(ts.url) / f"regions/feats/c/{b}/0/0") is not None for b in range(5)) <= 2
        assert_same(fast, batches(ts.url, direct=False))
        MAPS.set_budget(0)  # nothing kept: every read maps afresh
        assert MAPS.mapped_bytes == 0 and len(MAPS) == 0
        assert_same(fast, batches(ts.url, direct=True))
        assert len(MAPS) == 0
    finally:
        MAPS.set_budget(old)


def test_small_decoded_blocks_are_kept_beyond_the_window(tiny_store_factory):
    """Boxes, counts and flags decode on every read: a reader keeps up to SMALL_BLOCK_CACHE bytes of them,
    large mapped arrays only a window's worth (cache_blocks)."""
    ts = tiny_store_factory("small.zarr", n=40, block_size=4)
    reader = StoreBatchDataset(ts.url, ["regions/feats", "regions/boxes"], cache_blocks=2).reader
    reader.gather(np.arange(40))
    assert len(reader._cache["regions/feats"]) == 2
    assert len(reader._cache["regions/boxes"]) == 10


def shm_inode(t: torch.Tensor) -> int:
    fd, _ = t.untyped_storage()._share_fd_cpu_()  # a received batch keeps the fd of its shared memory
    return os.fstat(fd).st_ino


def test_workers_reuse_released_batch_memory_and_never_a_held_batch(tiny_store_factory):
    """DataLoader workers write batches into shared-memory slots (storage/shared_batches.py) and reuse a
    slot once this process holds nothing of its last batch: dropped batches' memory comes back, and a
    batch (or a view of one) kept by the caller is never written over."""
    ts = tiny_store_factory("slots.zarr", n=48, block_size=4)
    truth = ts.truth["regions/feats"]
    loader, sampler = stream_loader(ts.url, ["regions/feats", "regions/count"], 3, seed=2, num_workers=2, lanes=2)
    kept, inodes, seen = [], [], 0
    for epoch in range(3):
        sampler.set_epoch(epoch)
        for i, b in enumerate(loader):
            assert "_vlcache_slot" not in b
            np.testing.assert_array_equal(b["regions/feats"].numpy(), truth[b["row"].numpy()])
            inodes.append(shm_inode(b["regions/feats"]))
            seen += 1
            if epoch == 0 and i in (0, 3):  # held: a view of the features, with the rows they should hold
                kept.append((b["regions/feats"][1:], truth[b["row"].numpy()][1:]))
    # slots really reused: no more memory than the slots, plus a fresh batch or two while all are out
    assert len(set(inodes)) <= 2 * loader.slots.per_worker + len(kept) + 2 < seen, (len(set(inodes)), seen)
    for view, expected in kept:  # nothing held was overwritten by a later batch
        np.testing.assert_array_equal(view.numpy(), expected)
    out = loader.slots.flags.numpy()
    assert out.sum() <= len(kept) + 2 * loader.slots.per_worker  # held slots stay out; the rest come back
