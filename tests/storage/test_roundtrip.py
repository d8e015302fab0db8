"""Round trip of every array of the schema through both backends (zarr dir, zarr memory://, HDF5)."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import pickle
import uuid
from pathlib import Path

import fsspec
import numpy as np
import pytest

from vlcache.storage.backends import backend_kind, create_backend, open_backend
from vlcache.storage.errors import ReadOnlyStoreError, StoreError
from vlcache.storage.provenance import base_attrs, sha256_file, software_versions
from vlcache.storage.schema import DONE, SCHEMA_VERSION, STR, Layout, array_specs
from vlcache.storage.writer import StoreWriter, done_mask

_spec = importlib.util.spec_from_file_location("write_worker", Path(__file__).parents[1] / "helpers" / "write_worker.py")
ww = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(ww)
LAYOUT: Layout = ww.LAYOUT


@pytest.fixture(params=["zarr-dir", "zarr-memory", "hdf5"])
def url(request, tmp_path):
    if request.param == "zarr-dir":
        yield str(tmp_path / "store.zarr")
    elif request.param == "zarr-memory":
        u = f"memory://vlcache-test-{uuid.uuid4().hex}/store.zarr"
        yield u
        fs, path = fsspec.core.url_to_fs(u)
        if fs.exists(path):
            fs.rm(path, recursive=True)
    else:
        yield str(tmp_path / "store.h5")


def write_full(url, **kw) -> None:
    w = StoreWriter(url, LAYOUT, ww.ATTRS, **kw)
    for b in w.pending_blocks():
        w.write_block(b, ww.block_arrays(LAYOUT, b))
    assert w.finalize(ww.STATS)
    w.close()


def test_every_array_round_trips(url):
    write_full(url)
    expected = ww.expected_arrays(LAYOUT)
    assert set(expected) == {s.path for s in array_specs(LAYOUT.capacities)}  # the test covers every spec
    with open_backend(url) as b:
        assert b.kind == backend_kind(url)
        assert b.arrays() == [s.path for s in LAYOUT.specs()]
        assert b.chunk_rows() == LAYOUT.block_size
        rng = np.random.default_rng(0)
        for spec in LAYOUT.specs():
            e = expected[spec.path]
            assert b.shape(spec.path) == e.shape
            whole = b.read(spec.path, slice(None))
            if spec.dtype == STR:
                assert whole.dtype == object and all(type(x) is str for x in whole.ravel())
            else:
                assert whole.dtype == np.dtype(spec.dtype)
            np.testing.assert_array_equal(whole, e, err_msg=spec.path)
            for row in (0, 5, LAYOUT.num_rows - 1, -1):
                np.testing.assert_array_equal(b.read(spec.path, row), e[row], err_msg=f"{spec.path} row {row}")
            idx = rng.integers(0, LAYOUT.num_rows, 7)  # unsorted, may repeat
            np.testing.assert_array_equal(b.read(spec.path, idx), e[idx], err_msg=spec.path)
            np.testing.assert_array_equal(b.read(spec.path, np.array([], np.int64)), e[:0])
            np.testing.assert_array_equal(b.read(spec.path, slice(3, 17, 3)), e[3:17:3])
            np.testing.assert_array_equal(b.read(spec.path, slice(6, 10)), e[6:10])
            for block in range(LAYOUT.num_blocks):
                r = LAYOUT.block_rows(block)
                np.testing.assert_array_equal(b.read_block(spec.path, block), e[r.start : r.stop])
        assert b.read_block(DONE, LAYOUT.num_blocks - 1).shape == (LAYOUT.num_rows % LAYOUT.block_size,)
        attrs = b.attrs()
        assert attrs["format"] == "vlcache" and attrs["schema_version"] == SCHEMA_VERSION
        assert attrs["complete"] is True and Layout.from_attrs(attrs["layout"]) == LAYOUT
        assert attrs["config"] == ww.ATTRS["config"] and attrs["statistics"] == ww.STATS["statistics"]
        with pytest.raises(IndexError, match="out of range"):
            b.read("images/id", LAYOUT.num_rows)
        with pytest.raises(StoreError, match="no array 'images/nope'"):
            b.read("images/nope", 0)
        with pytest.raises(ReadOnlyStoreError):
            b.update_attrs(note="x")


def test_unicode_float16_and_padding(url):
    """Missing arrays become padding (labels -1, zeros, ''), rows not done read as padding too."""
    w = StoreWriter(url, LAYOUT, ww.ATTRS)
    n = len(LAYOUT.block_rows(1))
    text = np.array([["😀 ß ñ 中文", "", "x" * 300]] * n, dtype=object)
    feats = np.full((n, 5, 8), 65504.0, np.float16)  # float16 max survives exactly
    w.write_block(1, {"captions/text": text, "regions/feats": feats, "images/id": [f"ü{i}" for i in range(n)]})
    b = w.backend
    assert done_mask(b).tolist() == [r in LAYOUT.block_rows(1) for r in range(LAYOUT.num_rows)]
    np.testing.assert_array_equal(b.read_block("captions/text", 1), text)
    got = b.read("regions/feats", slice(4, 8))
    assert got.dtype == np.float16 and np.array_equal(got, feats)
    assert (b.read_block("regions/labels", 1) == -1).all() and (b.read_block("instances/labels", 1) == -1).all()
    assert (b.read_block("matches/label", 1) == -1).all() and (b.read_block("instances/masks", 1) == 0).all()
    assert (b.read_block("regions/count", 1) == 0).all() and (b.read_block("images/path", 1) == "").all()
    # a block never written reads as padding and is not done
    assert (b.read_block("regions/labels", 0) == -1).all() and (b.read_block(DONE, 0) == 0).all()
    assert w.pending_blocks() == [0, 2, 3, 4, 5] and not w.is_complete() and not w.finalize()
    w.close()


def test_write_block_validation_names_the_array(tmp_path):
    url = str(tmp_path / "v.zarr")
    w = StoreWriter(url, LAYOUT, ww.ATTRS)
    good = ww.block_arrays(LAYOUT, 0)

    def bad(**change):
        return {**good, **change}

    with pytest.raises(ValueError, match=r"'regions/feats' has shape \(4, 5, 7\), expected \(4, 5, 8\)"):
        w.write_block(0, bad(**{"regions/feats": np.zeros((4, 5, 7), np.float16)}))
    with pytest.raises(TypeError, match="'instances/labels' has dtype float64, expected int16"):
        w.write_block(0, bad(**{"instances/labels": np.zeros((4, 4))}))
    nan = good["grid/feats"].copy()
    nan[2, 0, 0] = np.nan
    with pytest.raises(ValueError, match=r"'grid/feats' has non-finite values .* rows \[2\]"):
        w.write_block(0, bad(**{"grid/feats": nan}))
    with pytest.raises(ValueError, match="'regions/feats' has non-finite"):  # overflows float16
        w.write_block(0, bad(**{"regions/feats": np.full((4, 5, 8), 1e6)}))
    with pytest.raises(ValueError, match="'instances/labels' has values outside the int16 range"):
        w.write_block(0, bad(**{"instances/labels": np.full((4, 4), 40000)}))
    with pytest.raises(TypeError, match="'images/id' must hold str"):
        w.write_block(0, bad(**{"images/id": np.array([1, 2, 3, 4], dtype=object)}))
    with pytest.raises(KeyError, match="images/done is written by the writer"):
        w.write_block(0, bad(**{DONE: np.ones(4, np.uint8)}))
    with pytest.raises(KeyError, match="unknown arrays"):
        w.write_block(0, bad(**{"regions/featz": good["regions/feats"]}))
    # nothing above was written: the block is still pending and all padding
    assert w.pending_blocks() == list(range(LAYOUT.num_blocks))
    assert (w.backend.read_block("images/id", 0) == "").all()
    # safe casts are accepted (python ints -> int16, float64 -> float32)
    w.write_block(0, bad(**{"instances/count": [1, 2, 3, 4], "instances/scores": good["instances/scores"].astype(float)}))
    np.testing.assert_array_equal(w.backend.read_block("instances/count", 0), [1, 2, 3, 4])
    assert w.pending_blocks() == list(range(1, LAYOUT.num_blocks))
    w.close()
    w1 = StoreWriter(url, LAYOUT, ww.ATTRS, rank=1, world_size=2)
    assert w1.pending_blocks() == [1, 3, 5]
    with pytest.raises(ValueError, match="block 2 is not owned by rank 1 of 2 \\(rank 0 owns it\\)"):
        w1.write_block(2, ww.block_arrays(LAYOUT, 2))
    w1.close()


def test_rewriting_a_done_block_replaces_it(tmp_path):
    url = str(tmp_path / "r.zarr")
    w = StoreWriter(url, LAYOUT, ww.ATTRS)
    w.write_block(0, {"images/id": ["a", "b", "c", "d"]})
    w.write_block(0, ww.block_arrays(LAYOUT, 0))
    exp = ww.expected_arrays(LAYOUT)
    np.testing.assert_array_equal(w.backend.read_block("images/id", 0), exp["images/id"][:4])
    assert w.backend.read_block(DONE, 0).tolist() == [1, 1, 1, 1]
    w.close()


def test_backend_write_rows_must_be_block_aligned(tmp_path):
    b = create_backend(tmp_path / "a.zarr", LAYOUT, {})
    with pytest.raises(ValueError, match="not block-aligned"):
        b.write_rows("images/hw", 2, np.zeros((4, 2), np.int32))
    with pytest.raises(ValueError, match="not block-aligned"):
        b.write_rows("images/hw", 0, np.zeros((3, 2), np.int32))
    b.write_rows("images/hw", 20, np.ones((3, 2), np.int32))  # the short last block
    b.write_rows("images/hw", 0, np.ones((8, 2), np.int32))  # two whole blocks at once
    assert b.read("images/hw", slice(None)).sum() == 2 * 11
    with pytest.raises(StoreError, match="already exists"):
        create_backend(tmp_path / "a.zarr", LAYOUT, {})
    b.close()


def test_backend_pickles_as_url_and_reopens(url):
    write_full(url)
    b = open_backend(url)
    state = b.__getstate__()
    assert set(state) == {"url", "mode", "storage_options", "force"}
    b2 = pickle.loads(pickle.dumps(b))
    b.close()
    assert b2.layout == LAYOUT and b2.read("images/id", 7) == "img0007"
    b2.close()


def test_zarr_metadata_is_consolidated(tmp_path):
    url = tmp_path / "c.zarr"
    write_full(str(url))
    root = json.loads((url / "zarr.json").read_text())
    consolidated = root["consolidated_metadata"]["metadata"]
    assert {s.path for s in LAYOUT.specs()} <= set(consolidated)
    assert root["attributes"]["complete"] is True and root["attributes"]["statistics"]["rows"] == 23
    codecs = [c["name"] for c in consolidated["regions/feats"]["codecs"]]
    assert codecs == ["bytes", "crc32c"]  # schema v2: float16 features raw (memory-mapped when streamed)
    assert [c["name"] for c in consolidated["instances/masks"]["codecs"]] == ["bytes", "zstd", "crc32c"]
    assert [c["name"] for c in consolidated["captions/text"]["codecs"]] == ["vlen-utf8", "zstd", "crc32c"]
    assert consolidated["regions/feats"]["chunk_grid"]["configuration"]["chunk_shape"] == [4, 5, 8]


@pytest.mark.parametrize("compression", ["gzip", "lzf"])
def test_hdf5_file_layout(tmp_path, compression):
    import h5py

    url = tmp_path / "f.h5"
    write_full(str(url), hdf5_compression=compression)
    assert not (tmp_path / "f.h5.partial.zarr").exists() and sorted(p.name for p in tmp_path.iterdir()) == ["f.h5"]
    with h5py.File(url) as f:
        ds = f["regions/feats"]
        assert ds.chunks == (4, 5, 8) and ds.fletcher32 and ds.compression is None  # v2: float16 raw
        assert f["instances/masks"].fletcher32 and f["instances/masks"].compression == compression
        assert f["captions/text"].fletcher32 and h5py.check_string_dtype(f["captions/text"].dtype).encoding == "utf-8"
        assert json.loads(f.attrs["vlcache_attrs"])["complete"] is True
    ww.assert_same(ww.read_all(str(url)), ww.expected_arrays(LAYOUT), where=compression)
    with pytest.raises(ValueError, match="hdf5_compression must be 'gzip' or 'lzf'"):
        StoreWriter(tmp_path / "g.h5", LAYOUT, ww.ATTRS, hdf5_compression="szip")


def test_provenance(tmp_path):
    src = tmp_path / "captions.json"
    src.write_bytes(b'{"images": []}' * 1000)
    attrs = base_attrs("coco", {"train": 3, "val": np.int64(1)}, [src], {"sizes": (1, 2), "t": np.float32(0.5)}, ["dog"])
    assert attrs["sources"] == [
        {"path": str(src), "sha256": hashlib.sha256(src.read_bytes()).hexdigest(), "bytes": 14000}
    ]
    assert sha256_file(src) == attrs["sources"][0]["sha256"]
    assert attrs["config"] == {"sizes": [1, 2], "t": 0.5} and attrs["splits"] == {"train": 3, "val": 1}
    assert attrs["created"].endswith("+00:00") and attrs["classes"] == ["dog"]
    versions = software_versions()
    assert {"python", "numpy", "torch", "torchvision", "zarr", "h5py", "vlcache", "platform"} <= set(versions)
    assert versions["zarr"].startswith("3.")
    with pytest.raises(TypeError, match="config: value of type object"):
        base_attrs("x", {}, [], {"bad": object()})
    with pytest.raises(FileNotFoundError, match="missing.json"):
        base_attrs("x", {}, [tmp_path / "missing.json"], {})


def test_hdf5_over_fsspec_and_in_place_edits(tmp_path):
    url = str(tmp_path / "e.h5")
    write_full(url)
    remote = f"memory://vlcache-test-{uuid.uuid4().hex}/e.h5"
    fs, path = fsspec.core.url_to_fs(remote)
    fs.pipe(path, Path(url).read_bytes())
    try:
        with open_backend(remote) as b:  # h5py reads through an fsspec file object
            ww.assert_same({p: b.read(p, slice(None)) for p in b.arrays()}, ww.expected_arrays(LAYOUT), where=remote)
        with pytest.raises(StoreError, match="can only be opened read-only"):
            open_backend(remote, "r+", force=True)
    finally:
        fs.rm(path)
    with open_backend(url, "r+", force=True) as b:  # strings are fixed-width UTF-8 in the file
        width = len("img0000")
        b.write_rows("images/id", 0, np.array(["ä" * (width // 2)] * 4, dtype=object))
        assert b.read("images/id", 2) == "ä" * (width // 2)
        with pytest.raises(StoreError, match="'images/id': a string of 8 UTF-8 bytes exceeds the file's fixed width 7"):
            b.write_rows("images/id", 4, np.array(["ä" * 4] * 4, dtype=object))


def test_every_known_group_round_trips(url):
    """Groups beyond the default ones (the text cache) go through the same code paths."""
    from vlcache.storage.schema import CORE_GROUPS, OPTIONAL_GROUPS, TEXT_GROUP, Capacities

    cap = Capacities(captions=2, instances=2, mask_size=3, regions=2, region_dim=3, grid_size=2, grid_dim=2,
                     matches=2, text_len=3, text_dim=4)
    groups = CORE_GROUPS + OPTIONAL_GROUPS + (TEXT_GROUP,)
    layout = Layout(num_rows=5, block_size=2, capacities=cap, groups=groups)
    rng = np.random.default_rng(3)
    truth = {}
    w = StoreWriter(url, layout, {"config": {"k": 1}})
    for b in range(layout.num_blocks):
        n = len(layout.block_rows(b))
        arrays = {}
        for s in layout.specs():
            if s.path == DONE:
                continue
            shape = (n, *s.row_shape)
            if s.dtype == STR:
                arrays[s.path] = np.array([f"ß{b}-{i}" for i in range(int(np.prod(shape)))], dtype=object).reshape(shape)
            elif np.dtype(s.dtype).kind == "f":
                arrays[s.path] = rng.standard_normal(shape).astype(s.dtype)
            else:
                arrays[s.path] = rng.integers(0, 100, shape).astype(s.dtype)
            truth.setdefault(s.path, []).append(arrays[s.path])
        w.write_block(b, arrays)
    assert w.finalize()
    w.close()
    with open_backend(url) as b:
        assert set(b.arrays()) == {s.path for s in layout.specs()}
        for path, parts in truth.items():
            np.testing.assert_array_equal(b.read(path, slice(None)), np.concatenate(parts), err_msg=path)
