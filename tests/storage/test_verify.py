"""Integrity and refusals: damaged chunks are named (never garbage), and bad stores are refused clearly."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import h5py
import numpy as np
import pytest
import zarr

from vlcache.storage.backends import CREATING, open_backend
from vlcache.storage.errors import (
    ConfigMismatchError,
    CorruptChunkError,
    ReadOnlyStoreError,
    SchemaVersionError,
    StoreError,
    StoreNotFoundError,
)
from vlcache.storage.schema import SCHEMA_VERSION, Capacities, Layout
from vlcache.storage.verify import DamagedChunk, format_info, info, verify
from vlcache.storage.writer import StoreWriter

_spec = importlib.util.spec_from_file_location("write_worker", Path(__file__).parents[1] / "helpers" / "write_worker.py")
ww = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(ww)
LAYOUT: Layout = ww.LAYOUT


def write(url, blocks=None, finalize=True):
    w = StoreWriter(url, LAYOUT, ww.ATTRS)
    for b in w.pending_blocks() if blocks is None else blocks:
        w.write_block(b, ww.block_arrays(LAYOUT, b))
    if finalize:
        assert w.finalize(ww.STATS)
    w.close()


def flip_byte(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x5A
    path.write_bytes(bytes(data))


def damage(url: str, array: str, block: int) -> None:
    """Flip one byte in the middle of a chunk's stored bytes (the chunk file, or the chunk inside the HDF5 file)."""
    if url.endswith(".h5"):
        with h5py.File(url) as f:
            ds = f[array]
            info_ = ds.id.get_chunk_info_by_coord((block * ds.chunks[0],) + (0,) * (ds.ndim - 1))
            offset = info_.byte_offset + info_.size // 2
        flip_byte(Path(url), offset)
    else:
        ndim = zarr.open_array(f"{url}/{array}", mode="r").ndim
        chunk = Path(url, array, "c", str(block), *["0"] * (ndim - 1))
        flip_byte(chunk, chunk.stat().st_size // 2)


@pytest.fixture(params=["zarr", "hdf5"])
def store(request, tmp_path):
    url = str(tmp_path / ("s.zarr" if request.param == "zarr" else "s.h5"))
    write(url)
    return url


def test_flipped_byte_is_named_by_verify_and_read(store):
    exp = ww.expected_arrays(LAYOUT)
    assert verify(store).ok
    damage(store, "regions/feats", 1)
    damage(store, "captions/text", 3)
    report = verify(store, progress=True)
    assert not report.ok and report.arrays_checked == len(LAYOUT.specs())
    assert report.chunks_checked == len(LAYOUT.specs()) * LAYOUT.num_blocks
    assert [(d.array, d.chunk) for d in report.damaged] == [("captions/text", (3, 0)), ("regions/feats", (1, 0, 0))]
    assert all("checksum" in d.reason for d in report.damaged)
    assert "regions/feats" in report.describe() and "(1, 0, 0)" in report.describe()
    array, chunk, reason = report.damaged[0]
    assert (array, chunk) == ("captions/text", (3, 0))
    with open_backend(store) as b:
        for rows in (5, slice(None), np.array([0, 6]), slice(4, 8)):
            with pytest.raises(CorruptChunkError) as e:
                b.read("regions/feats", rows)
            assert e.value.array == "regions/feats" and e.value.chunk == (1, 0, 0) and e.value.url == store
            assert "regions/feats" in str(e.value) and "vlcache store verify" in str(e.value)
        with pytest.raises(CorruptChunkError, match=r"'captions/text' chunk \(3, 0\)"):
            b.read_block("captions/text", 3)
        # undamaged chunks and other arrays still read exactly
        np.testing.assert_array_equal(b.read("regions/feats", slice(0, 4)), exp["regions/feats"][:4])
        np.testing.assert_array_equal(b.read("regions/feats", np.array([9, 3])), exp["regions/feats"][[9, 3]])
        np.testing.assert_array_equal(b.read("regions/boxes", 5), exp["regions/boxes"][5])
    assert info(store)["rows"]["done"] == LAYOUT.num_rows  # info still summarises a damaged store


def test_corrupt_done_chunk_and_missing_chunk(tmp_path):
    url = str(tmp_path / "m.zarr")
    write(url)
    Path(url, "instances", "masks", "c", "2", "0", "0", "0").unlink()  # a done block lost its chunk
    damage(url, "images/done", 4)
    report = verify(url)
    assert DamagedChunk("instances/masks", (2, 0, 0, 0), "is missing (its rows are done)") in report.damaged
    assert ("images/done", (4,)) in [(d.array, d.chunk) for d in report.damaged]
    assert any("marked complete" in p for p in report.problems)


def test_verify_and_info_on_hdf5_still_being_written(tmp_path):
    url = str(tmp_path / "p.h5")
    write(url, blocks=[0, 2], finalize=False)
    with pytest.raises(StoreNotFoundError, match=r"still being written \(2/6 blocks done"):
        open_backend(url)
    assert verify(url).ok
    i = info(url)
    assert i["state"] == "writing" and i["staging"].endswith("p.h5.partial.zarr") and not i["complete"]
    assert i["rows"] == {"total": 23, "done": 8, "with_errors": 2}  # rows 3 and 10
    assert i["blocks"] == {"total": 6, "done": 2, "block_size": 4}


def test_info(store):
    i = info(store)
    json.dumps(i)  # JSON-able
    assert i["complete"] and i["state"] == "complete" and i["schema_version"] == SCHEMA_VERSION
    assert i["dataset"] == "kill-test" and i["config"] == ww.ATTRS["config"]
    assert i["rows"] == {"total": 23, "done": 23, "with_errors": 3}  # rows 3, 10, 17
    assert i["first_errors"] == ["img0003: bad header — é", "img0010: bad header — é", "img0017: bad header — é"]
    assert i["done_per_split"] == {"train": 8, "val": 8, "test": 7}
    assert i["blocks"]["done"] == 6 and i["capacities"]["region_dim"] == 8
    assert set(i["group_bytes"]) >= {"images", "captions", "instances", "regions", "grid", "matches"}
    assert i["size_bytes"] == sum(i["group_bytes"].values()) and i["group_bytes"]["instances"] > 0
    on_disk = Path(store).stat().st_size if store.endswith(".h5") else sum(
        p.stat().st_size for p in Path(store).rglob("*") if p.is_file())
    assert i["size_bytes"] == on_disk
    # match statistics, recomputed here caption by caption
    exp = ww.expected_arrays(LAYOUT)
    objects, words, n = [], [], 0
    for row in range(LAYOUT.num_rows):
        for c in range(exp["captions/count"][row]):
            labels = [int(x) for x in exp["matches/label"][row, c] if x >= 0]
            objects.append(len(set(labels)))
            words.append(len(labels))
            n += 1
    m = i["matches"]
    assert m["captions"] == n and m["mean_matched_objects_per_caption"] == pytest.approx(np.mean(objects))
    assert m["mean_matched_words_per_caption"] == pytest.approx(np.mean(words)) and sum(words) > 0
    assert m["captions_with_match"] == pytest.approx(np.mean([w > 0 for w in words]))
    assert i["statistics"] == ww.STATS["statistics"]
    text = format_info(i)
    assert "rows       23/23 done, 3 with errors" in text and "img0010: bad header" in text
    assert "objects" in text and "score_threshold" in text


def test_complete_store_opens_read_only(store):
    with pytest.raises(ReadOnlyStoreError, match="complete and opens read-only"):
        open_backend(store, "r+")
    w = StoreWriter(store, LAYOUT, ww.ATTRS)
    assert w.pending_blocks() == [] and w.is_complete() and w.finalize()
    with pytest.raises(ReadOnlyStoreError):
        w.write_block(0, ww.block_arrays(LAYOUT, 0))
    w.close()
    with open_backend(store, "r+", force=True) as b:
        b.update_attrs(note="edited")
    assert open_backend(store).attrs()["note"] == "edited"


def test_config_and_layout_mismatch_refused(store):
    other = {**ww.ATTRS, "config": {**ww.ATTRS["config"], "score_threshold": 0.7}}
    with pytest.raises(ConfigMismatchError, match=r"score_threshold \(stored 0.5, given 0.7\)"):
        StoreWriter(store, LAYOUT, other)
    bigger = Layout(23, 4, Capacities(captions=3, instances=4, mask_size=6, regions=9, region_dim=8,
                                      grid_size=3, grid_dim=4, matches=2))
    with pytest.raises(ConfigMismatchError, match=r"layout.capacities.regions \(stored 5, given 9\)"):
        StoreWriter(store, bigger, ww.ATTRS)
    with pytest.raises(ValueError, match="only allowed on rank 0"):
        StoreWriter(store, LAYOUT, other, rank=1, world_size=2, overwrite=True)
    w = StoreWriter(store, LAYOUT, other, overwrite=True)  # recreate
    assert w.pending_blocks() == list(range(6)) and w.backend.attrs()["config"]["score_threshold"] == 0.7
    w.close()


def test_newer_schema_refused(store):
    with open_backend(store, "r+", force=True) as b:
        b.update_attrs(schema_version=SCHEMA_VERSION + 1)
    with pytest.raises(SchemaVersionError, match=f"schema_version {SCHEMA_VERSION + 1}, newer"):
        open_backend(store)


def test_not_a_store_refused(tmp_path):
    with pytest.raises(StoreNotFoundError, match="no vlcache store at .*nothing.zarr"):
        open_backend(tmp_path / "nothing.zarr")
    with pytest.raises(StoreNotFoundError, match="nothing.h5"):
        open_backend(tmp_path / "nothing.h5")
    (tmp_path / "empty").mkdir()
    with pytest.raises(StoreNotFoundError, match="empty"):
        open_backend(tmp_path / "empty")
    (tmp_path / "text.h5").write_text("hello")
    with pytest.raises(StoreNotFoundError, match="not a readable HDF5 file"):
        open_backend(tmp_path / "text.h5")
    zarr.create_group(str(tmp_path / "plain.zarr"), attributes={"format": "other"})
    with pytest.raises(StoreError, match="not a vlcache store .*'other'"):
        open_backend(tmp_path / "plain.zarr")
    with h5py.File(tmp_path / "plain.h5", "w") as f:
        f["x"] = np.zeros(3)
    with pytest.raises(StoreError, match="HDF5 file but not a vlcache store"):
        open_backend(tmp_path / "plain.h5")
    # a writer never deletes a directory that is not a store
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(StoreError, match="not a vlcache store; refusing to delete it"):
        StoreWriter(tmp_path / "mine", LAYOUT, ww.ATTRS)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


def test_interrupted_creation_is_redone(tmp_path):
    url = tmp_path / "half.zarr"
    zarr.create_group(str(url), attributes={CREATING: True})
    with pytest.raises(StoreNotFoundError, match="still being created"):
        open_backend(url)
    with pytest.raises(StoreNotFoundError, match="does not exist; pass layout"):
        StoreWriter(url)
    write(str(url))
    assert verify(url).ok and open_backend(url).attrs()["complete"]


def test_overwrite_never_deletes_foreign_data(tmp_path):
    zarr.create_group(str(tmp_path / "theirs.zarr"), attributes={"owner": "someone else"})
    with pytest.raises(StoreError, match="not a vlcache store; refusing to delete it"):
        StoreWriter(tmp_path / "theirs.zarr", LAYOUT, ww.ATTRS, overwrite=True)
    assert zarr.open_group(str(tmp_path / "theirs.zarr"), mode="r").attrs["owner"] == "someone else"
    with h5py.File(tmp_path / "theirs.h5", "w") as f:
        f["data"] = np.arange(3)
    with pytest.raises(StoreError, match="not a vlcache HDF5 store; refusing to delete it"):
        StoreWriter(tmp_path / "theirs.h5", LAYOUT, ww.ATTRS, overwrite=True)
    with h5py.File(tmp_path / "theirs.h5") as f:
        assert f["data"][2] == 2


def test_temporary_file_of_a_killed_writer_is_not_a_chunk(tiny_store_factory):
    """A writer killed while Zarr writes a chunk leaves '<block>.<uuid>.partial' next to the chunks (seen
    in the random-kill reliability test); verify and stored_blocks must not take it for a block."""
    from pathlib import Path

    from vlcache.storage.backends import open_backend
    from vlcache.storage.verify import verify

    ts = tiny_store_factory("partial.zarr", n=20, block_size=8)
    (Path(ts.url) / "images/done/c/2.5ab65156619345dba2454026ff14b486.partial").write_bytes(b"\0" * 3)
    with open_backend(ts.url) as b:
        assert b.stored_blocks("images/done") == {0, 1, 2}
    assert verify(ts.url).ok
